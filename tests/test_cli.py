"""The command line: flags, a real training run and every file it writes, resume, bad input."""
import dataclasses
import json
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import main
from conftest import ROOT
from hw2.config import Config
from hw2.runlog import read_metrics
from wandb_records import logged

TINY = ["--image_size", "16", "--unet_dim", "8", "--unet_dim_mults", "1", "2", "--time_steps", "5",
        "--batch_size", "4", "--num_samples", "4", "--device", "cpu"]


def tiny_args(image_root, tmp_path, *extra):
    return [*TINY, "--data_path", str(image_root), "--save_folder", str(tmp_path / "results"),
            "--cache_dir", str(tmp_path / "cache"), *extra]


def test_defaults_are_the_homework_command():
    config, _ = main.parse_config([])
    assert (config.time_steps, config.train_steps, config.image_size, config.batch_size) == (50, 10000, 32, 32)
    assert (config.learning_rate, config.unet_dim, config.unet_dim_mults) == (1e-3, 16, (1, 2, 4, 8))
    assert (config.save_and_sample_every, config.data_path, config.data_class) == (1000, "./data/train", "cat")
    assert (config.seed, config.gradient_accumulate_every, config.fid, config.visualize) == (2024, 2, False, False)


def test_the_readme_documents_exactly_the_flags_there_are():
    documented = re.findall(r"^\| `--(\w+)` \|", (ROOT / "docs" / "flags.md").read_text(), flags=re.MULTILINE)
    assert len(documented) == len(set(documented))
    assert set(documented) == {f.name for f in dataclasses.fields(Config)}
    assert all(f.metadata["help"] for f in dataclasses.fields(Config))


@pytest.mark.parametrize("args,expected", [([], False), (["--fid"], True), (["--fid", "True"], True),
                                           (["--fid", "False"], False), (["--fid", "false"], False)])
def test_boolean_flags_take_the_homework_forms(args, expected):
    assert main.parse_config(args)[0].fid is expected


def test_flag_values_reach_the_config():
    c, _ = main.parse_config(["--unet_dim_mults", "1", "2", "4", "--image_size", "64", "--learning_rate", "2e-4",
                           "--data_class", "all", "--load_path", "x.pt"])
    assert c.unet_dim_mults == (1, 2, 4) and c.image_size == 64 and c.learning_rate == 2e-4
    assert c.data_class == "all" and c.load_path == "x.pt"


@pytest.mark.parametrize("args,message", [
    (["--image_size", "36"], "--image_size 36 must be divisible by 8"),
    (["--image_size", "18", "--unet_dim_mults", "1", "2", "4"], "--image_size 18 must be divisible by 4"),
    (["--train_steps", "0"], "--train_steps must be a positive integer"),
    (["--batch_size", "-3"], "--batch_size must be a positive integer"),
    (["--time_steps", "0"], "--time_steps must be a positive integer"),
    (["--save_and_sample_every", "0"], "--save_and_sample_every must be a positive"),
    (["--learning_rate", "0"], "--learning_rate must be positive"),
    (["--learning_rate", "nan"], "--learning_rate must be positive"),
    (["--data_class", "horse"], "--data_class must be one of all, cat, dog, wild"),
    (["--unet_dim", "12"], "--unet_dim must be a multiple of 8"),
    (["--unet_dim_mults", "1", "0"], "--unet_dim_mults must be positive"),
    (["--fid", "maybe"], "expected True or False"),
    (["--batch_size", "many"], "invalid int value"),
    (["--visualize"], "--visualize needs a trained model"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda, cuda:N or mps"),
    (["--keep_checkpoints", "-1"], "--keep_checkpoints must be 0"),
    (["--wandb", "maybe"], "--wandb must be one of"),
    (["--fid", "--fid_num_samples", "1"], "--fid_num_samples must be at least 2"),
    (["--num_samples", "0"], "--num_samples must be a positive integer"),
    (["--gradient_accumulate_every", "0"], "--gradient_accumulate_every must be a positive"),
    (["--image_size", "0"], "--image_size must be a positive"),
    (["--seed", "x"], "invalid int value"),
    (["--ema_decay", "1"], "--ema_decay must be in [0, 1)"),
    (["--sampling_timesteps", "51"], "--sampling_timesteps must be between 1 and --time_steps 50"),
    (["--sampling_timesteps", "0"], "--sampling_timesteps must be between 1"),
    (["--heldout_images", "-1"], "--heldout_images must be 0"),
    (["--amp", "fp8"], "--amp must be one of"),
])
def test_bad_values_are_rejected_in_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main.parse_config(args)
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)


def test_by_default_the_startup_line_says_device_and_precision_alone(capsys):
    from hw2.distributed import Processes

    config, _ = main.parse_config([])
    main.print_config(config, [], None, torch.device("cpu"), None, Processes(), main.build_unet(config))
    assert capsys.readouterr().out.strip().splitlines()[-1] == "  (running on cpu, float32: this CPU has no native bf16)"


@pytest.mark.parametrize("device,plain,kernel", [
    ("cpu", False, True), ("cpu", False, False), ("cpu", True, True), ("meta", False, True)])
def test_the_startup_line_says_whether_the_network_is_fast(capsys, monkeypatch, device, plain, kernel):
    """hw2.fast's line: the levers, the compiled kernel where it is built (on a CPU), else why not;
    with --plain, that the homework's network runs as written."""
    from hw2.distributed import Processes
    from hw2.fast import kernel as compiled

    monkeypatch.setattr(compiled, "_built", {"lib": print if kernel else None, "why": "no C compiler (cc) found"})
    config, _ = main.parse_config(["--verbose", *(["--plain"] if plain else [])])
    main.print_config(config, [], None, torch.device(device), None, Processes(), main.build_unet(config))
    startup = capsys.readouterr().out.strip().splitlines()[-1]
    assert startup.startswith(f"  (running on {device}")
    assert ("no speed levers (--plain)" in startup) == plain, startup
    assert ("speed levers on" in startup) == (not plain), startup
    assert ("its linear attention in a compiled kernel" in startup) == (kernel and device == "cpu" and not plain)
    assert ("no compiled kernel (no C compiler (cc) found)" in startup) == (not kernel and device == "cpu")


def test_training_run_writes_every_file(image_root, tmp_path):
    """A real subprocess run, in the homework's `--fid False` form, with wandb offline."""
    args = tiny_args(image_root, tmp_path, "--train_steps", "4", "--save_and_sample_every", "2", "--fid", "False",
                     "--wandb", "offline", "--verbose")
    proc = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "training completed" in proc.stdout
    assert "  unet_dim: 8" in proc.stdout and "  fid: False" in proc.stdout
    assert "steps" in proc.stderr  # the tqdm bar
    startup = next(line for line in proc.stdout.splitlines() if line.startswith("  (running on cpu"))
    assert "images per pass" in startup
    assert ("freed memory kept for reuse" in startup) == (platform.libc_ver()[0] == "glibc"), startup

    out = tmp_path / "results"
    samples = {f"sample_ddpm_{m}/{i:05d}.png" for m in (1, 2) for i in range(4)}
    expected = {"model-1.pt", "model-2.pt", "model-latest.pt", "sample-1.png", "sample-2.png", "sample-final.png",
                "sample_ddpm_1", "sample_ddpm_2", "metrics.csv", "loss.png", "wandb", "wandb-run-id"} | samples
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.relative_to(out).parts[0] != "wandb"} | {"wandb"}
    assert (out / "wandb").is_dir()
    assert written == expected
    for name in samples:
        assert Image.open(out / name).size == (16, 16)
    for name in ("sample-1.png", "sample-final.png"):
        assert Image.open(out / name).size == (2 + 2 * 18, 2 + 2 * 18)  # 2x2 grid, 2 px padding
    assert Image.open(out / "loss.png").size[0] > 300
    ckpt = torch.load(out / "model-2.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["unet_dim"] == 8
    assert set(ckpt) >= {"model", "optimizer", "data", "rng", "config"}
    latest = torch.load(out / "model-latest.pt", weights_only=True)
    assert all(torch.equal(latest["model"][k], v) for k, v in ckpt["model"].items())

    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["fid"] is None and r["elapsed_s"] >= 0 for r in rows)

    run, history = logged(next(out.glob("wandb/offline-run-*/run-*.wandb")))
    assert run.project == "DDPM_AFHQ" and run.display_name == "results"
    assert [h["loss"] for h in history if "loss" in h] == pytest.approx([r["loss"] for r in rows])
    assert [h["_step"] for h in history if "samples/_type" in h] == [2, 4]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert {f.name for f in dataclasses.fields(Config)} <= set(config)


def test_resume_continues_exactly(image_root, tmp_path):
    """N steps, then M more after a restart, give the same weights as N + M in one run."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    base = [*TINY, "--data_path", str(image_root), "--cache_dir", str(tmp_path / "cache"), "--save_and_sample_every", "2"]
    assert main.main([*base, "--save_folder", str(one), "--train_steps", "4"]) == 0
    assert main.main([*base, "--save_folder", str(two), "--train_steps", "2"]) == 0
    assert main.main([*base, "--save_folder", str(two), "--train_steps", "4",
                      "--load_path", str(two / "model-latest.pt")]) == 0
    a = torch.load(one / "model-latest.pt", weights_only=True)
    b = torch.load(two / "model-latest.pt", weights_only=True)
    assert b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    fresh = torch.load(two / "model-1.pt", weights_only=True)
    assert any(not torch.equal(v, b["model"][k]) for k, v in fresh["model"].items())


def run_expecting_error(args, capsys):
    """main() must exit with 1 and print one 'error: ' line (beside any progress bar), no traceback."""
    assert main.main(args) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_missing_data_folder(image_root, tmp_path, capsys):
    args = [*TINY, "--data_path", str(tmp_path / "missing"), "--save_folder", str(tmp_path / "r")]
    assert "data folder" in run_expecting_error(args, capsys)


def test_missing_class_folder(image_root, tmp_path, capsys):
    shutil.rmtree(image_root / "wild")
    args = [*TINY, "--data_path", str(image_root), "--data_class", "wild", "--save_folder", str(tmp_path / "r")]
    assert "wild does not exist (subfolders of" in run_expecting_error(args, capsys)


def test_too_few_images_for_a_batch(image_root, tmp_path, capsys):
    args = [*TINY, "--data_path", str(image_root), "--data_class", "wild", "--batch_size", "8",
            "--save_folder", str(tmp_path / "r"), "--cache_dir", str(tmp_path / "c")]
    assert "4 usable images, fewer than one batch of 8" in run_expecting_error(args, capsys)


def test_resuming_another_model_names_the_fields(image_root, tmp_path, capsys):
    base = [*TINY, "--data_path", str(image_root), "--cache_dir", str(tmp_path / "c"), "--save_folder", str(tmp_path / "r")]
    assert main.main([*base, "--train_steps", "1"]) == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "r" / "model-latest.pt")
    assert main.main([*base, "--unet_dim", "16", "--time_steps", "7", "--load_path", ckpt]) == 1
    err = capsys.readouterr().err
    assert "--unet_dim 16 here but 8 in the checkpoint" in err and "--time_steps 7 here but 5" in err


def test_the_readme_is_a_students_first_screen_and_every_link_resolves():
    """README.md under 10 KB (what a student needs); its links and those of docs/ lead to files
    (and headings) that exist."""
    readme = ROOT / "README.md"
    assert readme.stat().st_size < 10_000
    pages = [readme, *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), (page.name, target)
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)
                slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
                assert anchor in slugs, (page.name, target)
    linked_docs = set(re.findall(r"\(docs/(\w+\.md)", readme.read_text()))
    assert linked_docs == {p.name for p in (ROOT / "docs").glob("*.md")}  # every page reachable from the README


def test_a_resume_takes_the_training_settings_from_the_checkpoint_and_the_machines_from_this_command(tmp_path):
    """A checkpoint from a T4 run (--amp fp16, --cuda_graph False, --plain, --device cuda) resumed
    on a laptop: the way of computing is this command's, the training's settings the file's."""
    stored = Config(amp="fp16", device="cuda", plain=True, cuda_graph=False, channels_last=True, verbose=True,
                    batch_size=12, learning_rate=5e-4, num_samples=9).to_dict()
    settled, taken = main.settle_config(Config(), set(), {"config": stored, "model": {}}, tmp_path / "model-latest.pt")
    assert (settled.amp, settled.device, settled.plain, settled.cuda_graph, settled.channels_last, settled.verbose) \
        == ("auto", "auto", False, None, None, False)
    assert (settled.batch_size, settled.learning_rate, settled.num_samples) == (12, 5e-4, 9)
    assert not {"amp", "device", "plain", "cuda_graph", "channels_last", "verbose"} & set(taken)
