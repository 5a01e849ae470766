"""A training run and `python -m hw2.check` on one CPU, each alone and side by side: how much
each slows the other, with the check's threads as torch sets them and as hw2/check.py sets them.

    python benchmarks/side_by_side.py              # about 6 minutes on a 2-core CPU

The run is the homework's recommended one (main.py's defaults: 32 px, batch 32 x 2, dim 16) on
synthetic images, its speed read from metrics.csv, a row of which is appended as each step ends:
steps per second over a window alone, and over the window in which a check runs beside it. The
check is timed alone and beside the run, as shipped (one thread, hw2.check.THREADS, and a lower
priority, NICENESS), with one thread at the usual priority, and with torch's default threads (as
before). Each figure is the median of --repeats runs.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHECK = {  # the command line of each way to run the check
    "as shipped (python -m hw2.check): 1 thread, niceness +4": ["-m", "hw2.check"],
    "1 thread, the usual priority": ["-c", "import sys, hw2.check as c; sys.exit(c.main())"],
    "torch's default threads, the usual priority (before)": ["-c", "import sys, hw2.check as c; c.THREADS = None; "
                                                             "sys.exit(c.main())"],
}


def images(folder, n=64, side=36):
    from PIL import Image

    from hw2.check import synthetic_images

    folder.mkdir(parents=True)
    for k, image in enumerate(synthetic_images(n, side)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{k:03d}.png")


def rows(metrics):
    return max(0, len(metrics.read_text().splitlines()) - 1) if metrics.is_file() else 0


def steps_per_second(metrics, seconds):
    """Steps the run ends per second over the next `seconds`."""
    n0, t0 = rows(metrics), time.perf_counter()
    time.sleep(seconds)
    return (rows(metrics) - n0) / (time.perf_counter() - t0)


def check(way, env):
    """Seconds one `python -m hw2.check` takes (start-up included)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, *CHECK[way]], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the check failed: {proc.stdout[-500:]}{proc.stderr[-1500:]}")
    return time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images(tmp / "data" / "cat")
        alone = {way: statistics.median(check(way, env) for _ in range(args.repeats)) for way in CHECK}
        run = subprocess.Popen([sys.executable, "main.py", "--data_path", str(tmp / "data"), "--save_folder",
                                str(tmp / "run"), "--cache_dir", str(tmp / "cache"), "--train_steps", "1000000",
                                "--save_and_sample_every", "1000000", "--wandb", "disabled"],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            metrics = tmp / "run" / "metrics.csv"
            while rows(metrics) < 5:
                if run.poll() is not None:
                    raise RuntimeError("the training run ended")
                time.sleep(0.5)
            figures = {}
            for way in CHECK:
                beside, rates = [], []
                for _ in range(args.repeats):
                    solo = steps_per_second(metrics, alone[way])
                    n0, t0 = rows(metrics), time.perf_counter()
                    beside.append(check(way, env))
                    rates.append(solo / ((rows(metrics) - n0) / (time.perf_counter() - t0)))
                figures[way] = (statistics.median(beside), statistics.median(rates))
            run_alone = steps_per_second(metrics, 10)
        finally:
            run.terminate()
            run.wait()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"### A training run and python -m hw2.check side by side ({os.cpu_count()} CPUs, {cpu}; medians of "
          f"{args.repeats})\n")
    print(f"training alone: {run_alone:.2f} steps/s\n")
    print("| the check's threads | check alone, s | check beside the run, s (x alone) | the run while the check "
          "runs, slower by |")
    print("| --- | --- | --- | --- |")
    for way, (beside, slower) in figures.items():
        print(f"| {way} | {alone[way]:.1f} | {beside:.1f} (x{beside / alone[way]:.1f}) | x{slower:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
