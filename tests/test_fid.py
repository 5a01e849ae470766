"""FID through clean-fid's real pipeline, offline, with small stand-in feature extractors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import main
from hw2 import fid as fidmod
from hw2.data import decode, find_images
from hw2.errors import UserError
from hw2.fid import FID, load_inception, locate_inception
from hw2.runlog import read_metrics

from conftest import make_images, write_standin
from test_cli import TINY


def pooled(x):
    return F.adaptive_avg_pool2d(x / 255.0, 2).flatten(1)


@pytest.fixture
def real_folder(tmp_path):
    return make_images(tmp_path / "data" / "cat", 40, size=48, seed=3)


def write_generated(real_files, folder, size, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(real_files):
        arr = decode(f, size).astype(np.float64) + rng.normal(0, noise, (size, size, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
    return folder


def test_fid_is_near_zero_for_the_same_images_and_grows_with_perturbation(real_folder, tmp_path):
    files = find_images(real_folder.parent, "cat")
    fid = FID(pooled, files, 16, tmp_path / "cache", "cpu", extractor_name="pooled")
    scores = [fid(write_generated(files, tmp_path / f"gen{n}", 16, noise=n)) for n in (0, 20, 60, 120)]
    assert abs(scores[0]) < 1e-3
    assert scores[0] < scores[1] < scores[2] < scores[3]


def test_fid_leaves_the_training_randomness_where_it_was(real_folder, tmp_path):
    """clean-fid's DataLoader draws a seed from torch's generator: a run would train on other t and
    noise after each FID (and with a cold statistics cache than a warm one) were it not forked."""
    files = sorted(real_folder.iterdir())
    fid = FID(pooled, files, 16, tmp_path / "cache", "cpu", extractor_name="pooled")
    torch.manual_seed(0)
    fid.prepare()
    fid(real_folder)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_real_statistics_are_computed_once(real_folder, tmp_path):
    files = find_images(real_folder.parent, "cat")
    calls = []

    def counting(x):
        calls.append(x.shape[0])
        return pooled(x)

    first = FID(counting, files, 16, tmp_path / "cache", "cpu", extractor_name="pooled").prepare()
    assert sum(calls) == 40 and len(list((tmp_path / "cache").glob("fid-real-16px-*.npz"))) == 1
    calls.clear()
    second = FID(counting, files, 16, tmp_path / "cache", "cpu", extractor_name="pooled").prepare()
    assert calls == [] and np.array_equal(first.real_mu, second.real_mu)
    other = FID(counting, files, 32, tmp_path / "cache", "cpu", extractor_name="pooled").prepare()
    assert sum(calls) == 40 and not np.array_equal(other.real_sigma, first.real_sigma)


def test_features_equal_clean_fids_own_path(real_folder, tmp_path):
    """The oracle is clean-fid itself: its InceptionV3W loads the same weights file and its
    get_folder_features reads the same images; the real side is the training images brought
    to the model's size by torchvision's own Resize + CenterCrop (the homework's pipeline)."""
    import torchvision.transforms as T
    from cleanfid import fid as cleanfid
    from cleanfid.inception_torchscript import InceptionV3W

    weights = write_standin(tmp_path / "weights" / fidmod.INCEPTION_FILE)
    theirs = InceptionV3W(str(weights.parent), download=False).eval()
    files = find_images(real_folder.parent, "cat")[:12]
    ours = FID(load_inception(weights, "cpu"), files, 16, tmp_path / "cache", "cpu")

    def their_features(folder):
        return cleanfid.get_folder_features(str(folder), model=theirs, num_workers=0, batch_size=8, device="cpu",
                                            mode="clean", verbose=False)

    generated = write_generated(files[:6], tmp_path / "generated", 16, noise=30)
    assert np.allclose(ours.features(sorted(str(p) for p in generated.iterdir())), their_features(generated), atol=1e-5)

    prepared = tmp_path / "real-as-trained"
    prepared.mkdir()
    for i, f in enumerate(files):
        T.CenterCrop(16)(T.Resize(16)(Image.open(f).convert("RGB"))).save(prepared / f"{i:05d}.png")
    assert np.allclose(ours.real_features(), their_features(prepared), atol=1e-5)


def test_the_standin_sees_pixel_scale_and_resolution(real_folder, tmp_path):
    features = load_inception(write_standin(tmp_path / "standin.pt"), "cpu")
    x = torch.from_numpy(np.array(Image.open(next(real_folder.iterdir())).convert("RGB").resize((299, 299))))
    x = x.permute(2, 0, 1)[None].float()
    blurred = F.interpolate(F.interpolate(x, size=16, mode="bilinear", antialias=True), size=299, mode="bicubic")
    base = features(x)
    assert base.shape == (1, 2048)
    assert (features(x * 255 / 256 * 0.5) - base).abs().max() > 0.05  # the pixels' scale
    assert (features(blurred) - base).abs().max() > 0.05  # the resolution the image had


def test_a_truncated_weights_file_is_detected(standin_file):
    data = standin_file.read_bytes()
    standin_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated: delete it and download inception-2015-12-05.pt again"):
        load_inception(standin_file, "cpu")


def test_locating_the_weights(tmp_path, monkeypatch, standin_file):
    monkeypatch.delenv(fidmod.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(fidmod.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert locate_inception(standin_file, tmp_path / "cache") == standin_file
    with pytest.raises(UserError, match="--inception_path points at .*not a file"):
        locate_inception(tmp_path / "missing.pt", tmp_path / "cache")
    monkeypatch.setenv(fidmod.INCEPTION_ENV, str(standin_file))
    assert locate_inception(None, tmp_path / "cache") == standin_file
    monkeypatch.delenv(fidmod.INCEPTION_ENV)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / fidmod.INCEPTION_FILE).write_bytes(b"x")
    assert locate_inception(None, tmp_path / "cache") == tmp_path / "cache" / fidmod.INCEPTION_FILE


def test_without_weights_and_network_the_run_stops_before_training(image_root, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(fidmod.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(fidmod.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(fidmod, "INCEPTION_URL", "http://127.0.0.1:9/inception-2015-12-05.pt")
    out = tmp_path / "results"
    args = [*TINY, "--data_path", str(image_root), "--save_folder", str(out), "--cache_dir", str(tmp_path / "c"),
            "--fid", "True", "--train_steps", "2"]
    assert main.main(args) == 1
    err = capsys.readouterr().err
    assert "inception-2015-12-05.pt" in err and "--inception_path" in err and "Traceback" not in err
    assert not list(out.glob("model-*.pt"))
    assert not (tmp_path / "c").exists()  # the refused start created no cache folder for the weights


def test_training_with_fid(image_root, tmp_path, standin_file):
    """The whole --fid path, with the stand-in network where Inception would be."""
    out = tmp_path / "results"
    args = [*TINY, "--data_path", str(image_root), "--save_folder", str(out), "--cache_dir", str(tmp_path / "c"),
            "--fid", "--fid_num_samples", "6", "--train_steps", "4", "--save_and_sample_every", "2",
            "--inception_path", str(standin_file)]
    assert main.main(args) == 0
    assert len(list((out / "sample_ddpm_2").glob("*.png"))) == 6
    fids = [(r["step"], r["fid"]) for r in read_metrics(out) if r["fid"] is not None]
    assert [s for s, _ in fids] == [2, 4] and all(np.isfinite(v) and v >= 0 for _, v in fids)
    assert (out / "fid.png").is_file() and (out / "loss.png").is_file()


def test_frechet_distance_matches_clean_fid_and_closed_form():
    from cleanfid.fid import frechet_distance as theirs

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(0.5, 2.0, size=(300, 6))
    (mu1, s1), (mu2, s2) = fidmod._stats(a), fidmod._stats(b)
    assert fidmod.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(theirs(mu1, s1, mu2, s2), rel=1e-9)
    # from features, with fewer samples than dimensions (the milestone's case: 512 of 2048): exact without sqrtm
    mix = rng.normal(size=(64, 64))
    for n in (40, 64, 200):
        gen, real = rng.normal(size=(n, 64)) @ mix, rng.normal(0.3, 1.0, size=(150, 64)) @ mix
        mu, sigma = fidmod._stats(real)
        assert fidmod.fid_from_features(gen, mu, sigma) == pytest.approx(theirs(*fidmod._stats(gen), mu, sigma),
                                                                          rel=1e-6)
    # diagonal covariances: sum (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2
    m1, m2, v1, v2 = np.zeros(3), np.ones(3), np.full(3, 4.0), np.ones(3)
    assert fidmod.frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(3 + 3 * 1.0)
