"""Where a training step and a sampling pass go: data, forward, backward, optimizer, per precision.

    python benchmarks/profile_step.py            # the homework model, 2 x 32 images per step
    python benchmarks/profile_step.py --ops 12   # also the 12 most expensive operators of each

It times the phases of the training step (hw2/step.py) one by one (medians over the steps), the forward
pass of sampling, and what each U-Net block costs in that forward pass, with malloc set as
main.py sets it on a CPU (hw2/fast/memory.py), the model as main.py runs it (hw2.fast). The table it prints is the one in benchmarks/README.md.
"""
import argparse
import collections
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from diffusion import Diffusion  # noqa: E402
from gpu_check import synthetic_images  # noqa: E402
from hw2.data import Batches  # noqa: E402
from hw2 import fast  # noqa: E402
from hw2.fast.memory import keep_freed_memory  # noqa: E402
from hw2.precision import autocast  # noqa: E402
from hw2.step import TrainStep  # noqa: E402
from unet import Unet  # noqa: E402

SIZE, BATCH, ACCUMULATE, T = 32, 32, 2, 50


def phases(dtype, steps):
    """{phase: median seconds per optimizer step}: the training step (hw2/step.py) with each of
    its phases timed, and the data pipeline's batches into its buffers."""
    torch.manual_seed(0)
    diffusion = Diffusion(fast.speed_up(Unet(16)), image_size=SIZE, timesteps=T)
    step = TrainStep(diffusion, fast.make_adam(diffusion.model, 1e-3), batch_size=BATCH, passes=ACCUMULATE,
                     amp_dtype=dtype)
    batches = Batches(synthetic_images(512, int(SIZE * 1.12)), SIZE, BATCH, seed=0)
    times = collections.defaultdict(list)
    for i in range(steps + 2):
        spent = collections.defaultdict(float)

        @contextlib.contextmanager
        def timed(name):
            start = time.perf_counter()
            yield
            spent[name] += time.perf_counter() - start

        with timed("data"):
            step.load(next(batches) for _ in range(ACCUMULATE))
        step(phase=timed)
        if i >= 2:  # warm-up
            for k, v in spent.items():
                times[k].append(v)
    return {k: statistics.median(v) for k, v in times.items()}


def blocks(dtype, reps):
    """{U-Net block: median seconds} in one sampling forward pass, and that pass's total."""
    torch.manual_seed(0)
    model = fast.speed_up(Unet(16)).eval()
    n = fast.images_per_pass(model, "cpu", SIZE, dtype)
    x, t = torch.randn(n, 3, SIZE, SIZE), torch.full((n,), 25)
    spent, starts = collections.defaultdict(list), {}
    names = ["init_conv", "time_mlp", "mid_block1", "mid_attn", "mid_block2", "final_res_block", "final_conv"]
    names += [f"{part}.{i}.{j}" for part in ("downs", "ups") for i in range(4) for j in range(4)]
    modules = dict(model.named_modules())
    for name in names:
        modules[name].register_forward_pre_hook(lambda m, a, name=name: starts.__setitem__(name, time.perf_counter()))
        modules[name].register_forward_hook(lambda m, a, o, name=name: spent[name].append(time.perf_counter() - starts[name]))
    totals = []
    with fast.sampling(model), autocast("cpu", dtype):
        for i in range(reps + 2):
            start = time.perf_counter()
            model(x, t)
            totals.append(time.perf_counter() - start)
    median = {k: statistics.median(v[2:]) for k, v in spent.items()}
    return n, statistics.median(totals[2:]), median


def operators(dtype, count):
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    diffusion = Diffusion(fast.speed_up(Unet(16)), image_size=SIZE, timesteps=T)
    x = torch.rand(BATCH, 3, SIZE, SIZE) * 2 - 1
    for _ in range(2):
        with autocast("cpu", dtype):
            diffusion(x).backward()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            with autocast("cpu", dtype):
                diffusion(x).backward()
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=count,
                                                              max_name_column_width=32, max_shapes_column_width=80)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ops", type=int, default=0, help="also list this many top operators per precision")
    args = parser.parse_args()
    precisions = {"float32": None, "bf16": torch.bfloat16}
    memory = keep_freed_memory()  # as main.py runs on a CPU
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one step = {ACCUMULATE} x {BATCH} images; "
          f"malloc: {memory or 'as the system set it'}")
    print()
    print("| phase of a training step | " + " | ".join(precisions) + " |")
    print("| --- |" + " --- |" * len(precisions))
    measured = {name: phases(dtype, args.steps) for name, dtype in precisions.items()}
    for phase in ("data", "forward", "backward", "optimizer"):
        print(f"| {phase} | " + " | ".join(f"{measured[p][phase] * 1e3:.0f} ms" for p in precisions) + " |")
    print("| total | " + " | ".join(f"{sum(measured[p].values()) * 1e3:.0f} ms" for p in precisions) + " |")
    for name, dtype in precisions.items():
        n, total, per_block = blocks(dtype, args.steps)
        print(f"\nsampling forward pass, {name}, {n} images: {total * 1e3:.1f} ms; the costliest blocks:")
        for block, seconds in sorted(per_block.items(), key=lambda kv: -kv[1])[:8]:
            print(f"  {block:16s} {seconds * 1e3:6.2f} ms  {seconds / total:5.1%}")
        if args.ops:
            print(operators(dtype, args.ops))


if __name__ == "__main__":
    main()
