"""Drills for benchmarks/gpu_check.py: edits of unet.py that a CUDA graph cannot hold, each run
through main.py in a process of its own on a copy of the project, as a student runs it, with
--cuda_graph True (by default an edited unet.py is not captured at all).

    EDITS          name: (a line of unet.py as shipped, the same line edited, what should happen)
    project_copy   the project's code in a folder, with unet.py (or diffusion.py) edited (the tests use it too)
    run(...)       one drill: its exit status, notes, error line and the run's last lines
    all_drills     every drill, as gpu_check.py reports them
"""
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = "        x = self.proj(x)\n        x = self.norm(x)"


def in_block(*lines):
    """Block.forward as shipped, and with `lines` after its convolution."""
    return BLOCK, "        x = self.proj(x)\n" + "".join(f"        {line}\n" for line in lines) + "        x = self.norm(x)"


EDITS = {
    "a read in backward": (*in_block("if x.requires_grad:", "    x.register_hook(lambda grad: [grad.sum().item()] and None)"),
                           "the step eager with a note, sampling captured, exit 0"),
    "a read in forward": (*in_block("x.float().mean().item()"),
                          "the step and sampling eager, one note, exit 0"),
    "a read only while sampling": (*in_block("if not torch.is_grad_enabled():", "    x.float().mean().item()"),
                                   "the step captured, sampling eager with a note, exit 0"),
    "a read only inside a capture": (*in_block("if __import__('hw2.fast.cuda').fast.cuda.calls().is_capturing(x.device):",
                                               "    x.float().mean().item()"),
                                     "the capture fails: where torch recovers, eager with a note and exit 0; "
                                     "where it does not (2.11 and older), exit 1 with one line"),
}
FLAGS = ["--image_size", "16", "--unet_dim", "8", "--unet_dim_mults", "1", "2", "--time_steps", "5", "--batch_size",
         "4", "--num_samples", "4", "--train_steps", "6", "--save_and_sample_every", "5", "--amp", "off", "--wandb",
         "disabled", "--cuda_graph", "True"]


def project_copy(folder, old=None, new=None, edited="unet.py"):
    """The project's code in folder, with one piece of unet.py (or of the file `edited`) replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("main.py", "diffusion.py", "trainer.py", "unet.py"):
        shutil.copy(ROOT / name, folder / name)
    shutil.copytree(ROOT / "hw2", folder / "hw2", ignore=shutil.ignore_patterns("__pycache__"))
    if old is not None:
        source = (folder / edited).read_text()
        assert source.count(old) == 1, old
        (folder / edited).write_text(source.replace(old, new))
    return folder


def visible(text):
    """Lines as a terminal shows them (a progress bar redrawn after a carriage return, or a line up)."""
    return [re.split(r"\r|\x1b\[A", line)[-1] for line in text.splitlines()]


def run(name, workdir, data, dry):
    """One drill in workdir/NAME: a copy of the project with EDITS[name], trained through main.py on
    the images in data (a folder with a cat/ folder of images). dry: on the fake CUDA device,
    failing as torch 2.11 and older do (python -m hw2.fast.fake_cuda --old main.py ...)."""
    old, new, expected = EDITS[name]
    folder = project_copy(workdir / re.sub(r"\W+", "-", name), old, new)
    launcher = ["-m", "hw2.fast.fake_cuda", "--old", "main.py"] if dry else ["main.py"]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, *launcher, *FLAGS, "--data_path", str(data), "--save_folder",
                           str(folder / "run"), "--cache_dir", str(folder / "cache")],
                          cwd=folder, capture_output=True, text=True, timeout=600)
    err, out = visible(proc.stderr), visible(proc.stdout)
    return {
        "expected": expected,
        "exit": proc.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "notes": [line for line in err if line.startswith("note:")],
        "error": next((line for line in err if line.startswith("error:")), None),
        "paths": [line.strip() for line in out if line.startswith(("  the training step", "  sampling captured",
                                                                   "  sampling eager"))],
        "traceback": "Traceback" in proc.stderr,
        "tail": proc.stderr[-1500:] if "Traceback" in proc.stderr else None,
    }


def all_drills(workdir, dry):
    """(lines, ok, results) for benchmarks/gpu_check.py: every drill on synthetic images, one line each."""
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from hw2.check import synthetic_images

    data = workdir / "data" / "cat"
    data.mkdir(parents=True)
    for k, image in enumerate(synthetic_images(24, 20)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(data / f"{k:03d}.png")
    lines, results, ok = [], {}, True
    for name in EDITS:
        result = results[name] = run(name, workdir, data.parent, dry)
        said = "; ".join(result["notes"] + ([result["error"]] if result["error"] else []) + result["paths"])
        lines.append(f"{name} (expected: {result['expected']}): exit {result['exit']} in {result['seconds']} s"
                     f"{', A TRACEBACK' if result['traceback'] else ''}; {said}")
        ok &= not result["traceback"] and (result["exit"] == 0 or (result["exit"] == 1 and bool(result["error"])))
    return lines, ok, results
