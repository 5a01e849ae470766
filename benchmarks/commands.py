"""How long the homework's commands take here, as a student runs them: wall-clock seconds of
`python main.py` commands, process start included, with the homework's settings.

    python benchmarks/commands.py                  # this CPU as it is (about 4 minutes on 2 cores)
    python benchmarks/commands.py --without-avx512 # as on a CPU with AVX2 but no AVX-512 or bf16

--without-avx512 tells PyTorch's own kernels (ATEN_CPU_CAPABILITY=avx2) and oneDNN's
(ONEDNN_MAX_CPU_ISA=AVX2) to use no more than AVX2, which also turns off the bf16 default
(--amp auto picks float32 there, as on such a CPU). It approximates such a machine: the
compiled attention kernel is still built for this CPU, and memory and caches stay this one's.

It prints, for the homework model (32 px, batch 32 x 2, dim 16, T = 50):
- a training step, median seconds, from metrics.csv's elapsed time over steps 6-20;
- --sample 64 (what a 64-image milestone grid costs, plus the process start);
- --visualize;
- the process start alone (python main.py --help).
"""
import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_check import synthetic_images  # noqa: E402

WITHOUT_AVX512 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
STEPS = 20


def image_folder(folder, count=64, side=36):
    """count synthetic JPEGs in folder/cat: the data the commands train on."""
    from PIL import Image

    cat = folder / "cat"
    cat.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(synthetic_images(count, side)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(cat / f"{i:03d}.jpg")
    return folder


def timed(args, env):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"main.py {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--without-avx512", action="store_true", help="as on a CPU with AVX2 only (see above)")
    args = parser.parse_args()
    env = dict(os.environ, WANDB_MODE="disabled", **(WITHOUT_AVX512 if args.without_avx512 else {}))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, run = image_folder(tmp / "data"), tmp / "run"
        common = ["--data_path", str(data), "--cache_dir", str(tmp / "cache"), "--wandb", "disabled"]
        start_s, _ = timed(["--help"], env)
        train_s, out = timed([*common, "--save_folder", str(run), "--train_steps", str(STEPS),
                              "--save_and_sample_every", "1000", "--num_samples", "1"], env)
        precision = next(line.strip() for line in out.splitlines() if line.strip().startswith("(running on"))
        with open(run / "metrics.csv") as f:
            elapsed = [float(row["elapsed_s"]) for row in csv.DictReader(f)]
        step_s = statistics.median(b - a for a, b in zip(elapsed[5:], elapsed[6:]))
        sample_s, _ = timed(["--load_path", str(run), "--sample", "64", "--wandb", "disabled"], env)
        visualize_s, _ = timed(["--load_path", str(run), "--visualize", *common], env)
    label = "AVX2 only (emulated)" if args.without_avx512 else "this CPU"
    print(f"{label}: {precision}")
    print(f"| command | {label} |")
    print("| --- | --- |")
    print(f"| training step (median, steps 6-{STEPS}) | {step_s:.2f} s |")
    print(f"| `--sample 64` | {sample_s:.1f} s |")
    print(f"| `--visualize` | {visualize_s:.1f} s |")
    print(f"| process start (`--help`) | {start_s:.1f} s |")


if __name__ == "__main__":
    main()
