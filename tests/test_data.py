"""Finding, decoding, caching and batching training images."""
import os

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from hw2 import data
from hw2.data import Batches, decode, find_images, load_images, resized_side
from hw2.errors import UserError

from conftest import AFHQ_SAMPLE, make_images


def test_find_images_one_class_and_all(image_root):
    assert len(find_images(image_root, "cat")) == 12
    assert len(find_images(image_root, "all")) == 22
    assert all(p.parent.name == "dog" for p in find_images(image_root, "dog"))


def test_find_images_takes_any_case_and_skips_hidden_folders(tmp_path):
    make_images(tmp_path / "cat", 2, suffix=".JPG")
    make_images(tmp_path / "cat" / ".thumbs", 3)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    assert len(find_images(tmp_path, "cat")) == 2


def test_missing_folder_says_how_to_get_data(tmp_path):
    with pytest.raises(UserError, match="does not exist.*hw2.afhq"):
        find_images(tmp_path / "nope", "cat")
    with pytest.raises(UserError, match=r"^data folder \./nope does not exist"):  # the path as the user typed it
        find_images("./nope", "cat")


def test_missing_class_names_the_classes_there(image_root):
    (image_root / "wild").rename(image_root / "fox")
    with pytest.raises(UserError, match=r"wild does not exist \(subfolders of .*: cat, dog, fox\)"):
        find_images(image_root, "wild")


def test_empty_class_folder(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(UserError, match="no .jpg, .jpeg or .png images"):
        find_images(tmp_path, "cat")


def test_decode_resizes_like_the_homework_transform(tmp_path):
    path = make_images(tmp_path, 1, size=64)
    file = next(path.iterdir())
    side = resized_side(32)
    assert side == 35
    expected = np.asarray(T.Resize(side)(Image.open(file).convert("RGB")))
    assert np.array_equal(decode(file, side), expected)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA"])
def test_decode_converts_other_modes_to_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
        assert img.mode.startswith("I")
    else:
        img = rgb.convert(mode)
    file = tmp_path / ("x.jpg" if mode in ("L", "CMYK") else "x.png")
    img.save(file)
    out = decode(file, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    if mode == "I;16":  # 16-bit values are scaled, not clipped to white
        assert 40 < out.mean() < 215


def test_decode_crops_non_square_images_to_a_square(tmp_path):
    Image.new("RGB", (90, 40), (10, 200, 30)).save(tmp_path / "wide.png")
    assert decode(tmp_path / "wide.png", 20).shape == (20, 20, 3)


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    folder = make_images(tmp_path / "cat", 3)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "garbage.png").write_bytes(os.urandom(500))
    good = (folder / "img_000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    files = find_images(tmp_path, "cat")
    images, skipped = load_images(files, 20)
    assert images.shape == (3, 3, 20, 20) and images.dtype == torch.uint8
    assert sorted(p.name for p in skipped) == ["garbage.png", "truncated.jpg", "zero.jpg"]


def test_no_readable_file_is_an_error(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(UserError, match="none of the 1 image files could be read"):
        load_images(find_images(tmp_path, "cat"), 20)


def test_cache_is_reused_and_invalidated_by_changes(image_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    files = find_images(image_root, "cat")
    first, _ = load_images(files, 20, cache)
    assert len(list(cache.glob("images-20px-*.pt"))) == 1

    def fail(*args):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(data, "decode", fail)
    again, _ = load_images(files, 20, cache)
    assert torch.equal(first, again)

    monkeypatch.undo()
    make_images(image_root / "cat", 1, seed=99)  # rewrites img_000.jpg with other pixels
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed, _ = load_images(files, 20, cache)
    assert not torch.equal(changed[0], first[0]) and torch.equal(changed[1:], first[1:])
    other_size, _ = load_images(files, 24, cache)
    assert other_size.shape[-1] == 24
    assert len(list(cache.glob("*.pt"))) == 3


def test_an_unwritable_cache_is_only_a_note(image_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    images, _ = load_images(find_images(image_root, "cat"), 20, blocker / "cache")
    assert images.shape[0] == 12
    assert "could not write the image cache" in capsys.readouterr().out


def test_batches_crop_flip_and_cover_each_epoch():
    n, r, s, b = 10, 12, 8, 5
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, r, r).contiguous()
    images[:, :, :, : r // 2] += 100  # left half brighter: a flip is visible
    batches = Batches(images, s, b, seed=0)
    seen, flipped = [], 0
    for _ in range(2):  # one epoch = two batches
        batch = next(batches)
        assert batch.shape == (b, 3, s, s) and batch.dtype == torch.uint8
        seen += [int(batch[k].min()) for k in range(b)]  # image i holds the values i and i + 100
    assert sorted(seen) == list(range(n))
    for _ in range(40):
        batch = next(batches).int()
        flipped += int((batch[:, 0, 0, 0] < batch[:, 0, 0, -1]).sum())
    assert 0.3 < flipped / (40 * b) < 0.7
    assert batches.epoch >= 20


def test_batches_resume_exactly_from_their_state():
    images = torch.randint(0, 255, (9, 3, 10, 10), dtype=torch.uint8)
    a = Batches(images, 8, 4, seed=3)
    for _ in range(5):
        next(a)
    b = Batches(images, 8, 4, seed=123)
    b.load_state_dict(a.state_dict())
    for _ in range(6):
        assert torch.equal(next(a), next(b))


def test_to_model_maps_to_minus_one_one():
    x = Batches.to_model(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2), "cpu")
    assert x.dtype == torch.float32 and x.flatten().tolist() == [-1.0, 1.0]


def test_fewer_images_than_a_batch():
    with pytest.raises(UserError, match="3 usable images, fewer than one batch of 4"):
        Batches(torch.zeros(3, 3, 10, 10, dtype=torch.uint8), 8, 4, seed=0)


@pytest.mark.skipif(not AFHQ_SAMPLE.is_dir(), reason="shared AFHQ sample not present")
def test_real_afhq_images_load(tmp_path):
    images, skipped = load_images(find_images(AFHQ_SAMPLE, "cat"), 35, tmp_path)
    assert images.shape == (22, 3, 35, 35) and not skipped
    assert 30 < images.float().mean() < 220


def test_decompression_bombs_are_skipped(tmp_path, monkeypatch):
    folder = make_images(tmp_path / "cat", 2)
    Image.new("RGB", (60, 60)).save(folder / "big.png")  # over our limit
    Image.new("RGB", (100, 100)).save(folder / "bomb.png")  # over twice the limit: PIL refuses it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # the 48 px images pass
    images, skipped = load_images(find_images(tmp_path, "cat"), 20)
    assert images.shape[0] == 2
    assert sorted(p.name for p in skipped) == ["big.png", "bomb.png"]


def test_the_cache_key_changes_when_a_file_is_rewritten(image_root):
    """A file rewritten in place (same name, maybe the same size) gets a new modification time,
    and with it a new key: the cache of the old pixels is never served for the new ones."""
    from hw2.data import files_key

    files = find_images(image_root, "cat")
    before = files_key(files, "tag")
    assert files_key(files, "tag") == before and files_key(files, "other") != before
    st = files[3].stat()
    os.utime(files[3], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert files_key(files, "tag") != before
    assert files_key(files[:-1], "tag") != files_key(files, "tag")


@pytest.mark.parametrize("readable,error", [
    (3, "error: the dataset has 3 usable images, fewer than one batch of 4: add images or lower --batch_size"),
    (0, "error: none of the 3 image files could be read (first: {first})"),
])
def test_an_error_after_the_decoding_bar_starts_a_line_of_its_own(tmp_path, capsys, readable, error):
    """Too few readable images for a batch, or none: the bar is closed and the error is on its own
    line, also where the bar's carriage returns are not obeyed (a log file, a notebook's captured
    output)."""
    import main

    root = tmp_path / "data"
    make_images(root / "cat", readable)
    for i in range(3):
        (root / "cat" / f"broken_{i}.jpg").write_bytes(b"not a jpeg")
    assert main.main(["--data_path", str(root), "--batch_size", "4", "--save_folder", str(tmp_path / "out"),
                      "--cache_dir", str(tmp_path / "cache"), "--device", "cpu", "--wandb", "disabled"]) == 1
    err = capsys.readouterr().err
    assert "decoding images" in err
    assert error.format(first=root / "cat" / "broken_0.jpg") in err.split("\n")
