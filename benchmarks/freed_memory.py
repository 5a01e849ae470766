"""What keeping freed memory (hw2/fast/memory.py, as main.py does on a CPU) buys this project.

    python benchmarks/freed_memory.py            # about 3 minutes on 2 CPU cores

malloc's settings hold for a whole process, so each measurement is a fresh process, the
two settings alternating; the table gives medians of their per-process medians. Measured:
a training step of the homework model (2 x 32 images, float32 and bf16 autocast) and a
sampling pass (as many images as hw2.fast.images_per_pass draws at once), with the page
faults each takes and the process's peak memory.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, resource, statistics, sys, time
sys.path[:0] = [{root!r}, {root!r} + "/benchmarks"]
from hw2.fast.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "kept" else None
import torch
from bench import ours, train_step_fn
from hw2 import fast
from hw2.precision import autocast

dtype = None if sys.argv[2] == "float32" else torch.bfloat16
torch.manual_seed(0)
diffusion = ours()
train_step = train_step_fn(diffusion, "cpu", torch.rand(32, 3, 32, 32) * 2 - 1, dtype=dtype)

n = fast.images_per_pass(diffusion.model, "cpu", 32, dtype)
noise, t = torch.randn(n, 3, 32, 32), torch.full((n,), 25)

def sampling_pass():
    with fast.sampling(diffusion.model), autocast("cpu", dtype):
        diffusion.model(noise, t)

def measure(fn, reps):
    fn(), fn()
    faults, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / reps

train = measure(train_step, {reps})
diffusion.model.eval()
sample = measure(sampling_pass, {reps})
print(json.dumps({{"kept": kept, "train": train, "sample": sample, "images": n,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per setting and precision")
    parser.add_argument("--reps", type=int, default=6, help="timed repetitions inside each process")
    args = parser.parse_args()
    code = WORKER.format(root=str(ROOT), reps=args.reps)
    runs = {}
    for _ in range(args.processes):
        for precision in ("float32", "bf16"):
            for setting in ("kept", "returned"):
                out = subprocess.run([sys.executable, "-c", code, setting, precision], capture_output=True, text=True,
                                     check=True).stdout
                runs.setdefault((precision, setting), []).append(json.loads(out))
    print("| precision | measurement | freed memory returned (glibc's default) | kept (main.py on a CPU) | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for precision in ("float32", "bf16"):
        returned, kept = runs[precision, "returned"], runs[precision, "kept"]
        for what, unit in (("train", "training step, 2 x 32 images"), ("sample", f"sampling pass, {kept[0]['images']} images")):
            a = statistics.median(r[what][0] for r in returned)
            b = statistics.median(r[what][0] for r in kept)
            fa = statistics.median(r[what][1] for r in returned)
            fb = statistics.median(r[what][1] for r in kept)
            print(f"| {precision} | {unit} | {a * 1e3:.0f} ms, {fa:,.0f} page faults | {b * 1e3:.0f} ms, {fb:,.0f} page faults "
                  f"| {a / b:.2f}x |")
        pa = statistics.median(r["peak_mib"] for r in returned)
        pb = statistics.median(r["peak_mib"] for r in kept)
        print(f"| {precision} | peak memory of the process | {pa:,.0f} MiB | {pb:,.0f} MiB | |")


if __name__ == "__main__":
    main()
