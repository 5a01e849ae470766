"""The first thing to run when a CUDA GPU is at hand: does training work and how fast, per precision.

    python benchmarks/gpu_check.py          # on the GPU: under 3 minutes on an H200
    python benchmarks/gpu_check.py --dry    # the same code path, tiny, on the CPU (the tests run this)

For float32, bfloat16 (where the GPU has it natively, compute capability 8.0+) and float16
(with loss scaling), it trains the homework's model (32 px, batch 32 x 2, dim 16, T = 50)
through the Trainer, as main.py does, on synthetic images in memory, and reports per
precision:
- ms per optimizer step (median, host work included) for the step as it ran before it was
  captured (eager, two passes), eager with its passes joined where memory allows, and
  captured in a CUDA graph (hw2/fast/step.py); float16's loss scaling is never captured;
- kernels per step (torch.profiler, over a few steps);
- whether the loss is finite and falls (mean of the last 10 steps below the first 10);
- the time to sample 512 images over the full 50-step chain, with each network evaluation
  eager and replayed from a CUDA graph (captured_sampling, hw2/fast/replay.py), and how far
  the two ways' images differ;
- the homework's two runs projected from these: 10,000 steps with 11 grids of 64, and the
  FID experiment, 1,000 steps with 10 x 512 images and a grid (Inception's features left out);
- a resume: steps 1..N+M in one go against N, a checkpoint and M more from it, weight for
  weight (bitwise, or the largest difference).
It prints what --amp auto picks on this device, and one table to paste into an issue.
"""
import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion import Diffusion  # noqa: E402
from hw2 import fast  # noqa: E402
from hw2.checkpoint import load_checkpoint  # noqa: E402
from hw2.config import Config  # noqa: E402
from hw2.precision import amp_dtype, cuda_has_native_bf16, describe_precision  # noqa: E402
from hw2.sampling import generate  # noqa: E402
from trainer import Trainer  # noqa: E402
from unet import Unet  # noqa: E402

FULL = dict(image_size=32, unet_dim=16, unet_dim_mults=(1, 2, 4, 8), time_steps=50, batch_size=32,
            eager_steps=30, captured_steps=150, samples=512, images=512, resume=(10, 10), profiled=3)
DRY = dict(image_size=16, unet_dim=8, unet_dim_mults=(1, 2), time_steps=5, batch_size=4,
           eager_steps=12, captured_steps=12, samples=8, images=32, resume=(2, 2), profiled=1)
RUNS = {"10,000-step run": (10_000, 11 * 64), "FID experiment": (1_000, 10 * 512 + 64)}  # (steps, images drawn)


def synthetic_images(n, side, seed=0):
    """n smooth RGB images (N, 3, side, side) uint8: gradients and a disc, easy to learn."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    c = torch.rand(n, 3, 3, generator=g)
    disc = (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.1).float()
    img = c[..., 0, None, None] * xx + c[..., 1, None, None] * yy + c[..., 2, None, None] * disc
    img = img / img.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return (img * 255).round().to(torch.uint8)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def trainer_for(settings, device, dtype, folder, seed=0, capture=None, join=True):
    """A Trainer as main.py builds it; capture False and join False give the step as it ran
    before it was captured (eager, one pass per accumulation step)."""
    config = Config(image_size=settings["image_size"], unet_dim=settings["unet_dim"],
                    unet_dim_mults=settings["unet_dim_mults"], time_steps=settings["time_steps"],
                    batch_size=settings["batch_size"], save_folder=str(folder), seed=seed, wandb="disabled",
                    cuda_graph=capture)
    torch.manual_seed(seed)
    model = fast.for_run(Unet(config.unet_dim, dim_mults=config.unet_dim_mults), config)
    diffusion = Diffusion(model, image_size=config.image_size, timesteps=config.time_steps).to(device)
    side = int(config.image_size * 1.12)
    trainer = Trainer(diffusion, config, synthetic_images(settings["images"], side), amp_dtype=dtype)
    step = trainer.one_step
    if hasattr(step, "join"):  # CUDA: decided after the first step
        step.join = join
    else:  # a CPU joins under bf16 only: the dry run exercises both ways in every precision all the same
        step.joined = join and step.passes > 1
    return trainer


def kernels_per_step(trainer, steps):
    """Device kernels (CUDA) or operators (elsewhere) launched per training step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.train_step()
        sync(trainer.device)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    return round(sum(1 for e in prof.events() if e.device_type == kind) / steps)


def train(trainer, steps):
    """(median seconds per step, losses) over `steps` steps, after the warm-up (and capture)."""
    losses, times = [], []
    for _ in range(steps):
        sync(trainer.device)
        start = time.perf_counter()
        losses.append(trainer.train_step())
        sync(trainer.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[8:] if len(times) > 16 else times), losses


def sample_seconds(trainer, settings, dtype, captured):
    """(seconds, images) to sample settings["samples"] images, with the captured_sampling lever on
    or off (hw2/fast/replay.py); the first draw of each way captures or warms up, the second is timed."""
    model = trainer.model
    levers = model.levers
    model.levers = levers if captured else levers - {"captured_sampling"}
    try:
        for _ in range(2):
            sync(trainer.device)
            start = time.perf_counter()
            images = generate(trainer.sampler, settings["samples"], seed=1, amp_dtype=dtype)
            sync(trainer.device)
        return time.perf_counter() - start, images
    finally:
        model.levers = levers


def resume_check(settings, device, dtype, workdir, capture):
    n, m = settings["resume"]
    straight = trainer_for(settings, device, dtype, workdir / "straight", capture=capture)
    for _ in range(n + m):
        straight.train_step()
    part = trainer_for(settings, device, dtype, workdir / "part", capture=capture)
    for _ in range(n):
        part.train_step()
    part.save(part.folder.latest)
    resumed = trainer_for(settings, device, dtype, workdir / "resumed", seed=123, capture=capture)  # other weights
    resumed.load(load_checkpoint(part.folder.latest), part.folder.latest)
    for _ in range(m):
        resumed.train_step()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return "bitwise" if diff == 0 else f"max diff {diff:.1e}"


def check(settings, device, dtype, workdir):
    """One precision's row."""
    capturable = fast.step_plan(device, dtype, None, Config())[0]
    variants = {"before": dict(capture=False, join=False), "eager": dict(capture=False, join=True)}
    if capturable:
        variants["captured"] = dict(capture=None, join=True)
    row, losses = {}, None
    for name, options in variants.items():
        trainer = trainer_for(settings, device, dtype, workdir / name, **options)
        steps = settings["captured_steps" if name == "captured" else "eager_steps"]
        seconds, losses = train(trainer, steps)
        row[name] = (seconds, kernels_per_step(trainer, settings["profiled"]))
    best = row.get("captured") or row["eager"]
    window = min(10, len(losses) // 2)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    falls = all(map(math.isfinite, losses)) and last < first

    eager_s, eager_images = sample_seconds(trainer, settings, dtype, captured=False)
    sample_s, images = sample_seconds(trainer, settings, dtype, captured=True)
    same = (images - eager_images).abs().max().item()
    per_image = sample_s / settings["samples"]
    projected = {run: steps * best[0] + images_drawn * per_image for run, (steps, images_drawn) in RUNS.items()}
    if settings is DRY:  # the dry run's tiny model says nothing of the homework's runs
        projected = {run: float("nan") for run in projected}
    return {
        "eager before, ms (kernels)": f"{row['before'][0] * 1e3:.1f} ({row['before'][1]})",
        "eager, ms (kernels)": f"{row['eager'][0] * 1e3:.1f} ({row['eager'][1]})",
        "captured, ms (kernels)": (f"{row['captured'][0] * 1e3:.1f} ({row['captured'][1]})" if "captured" in row
                                   else "not captured"),
        "loss falls": "yes" if falls else "NO",
        f"{settings['samples']} images, eager / captured": f"{eager_s:.2f} / {sample_s:.2f} s (differ by {same:.0e})",
        **{run: f"{s / 60:.1f} min" for run, s in projected.items()},
        "resume": resume_check(settings, device, dtype, workdir / "resume", capture=None),
        "_best": best[0],
        "_before": row["before"][0],
        "_ok": falls and bool(torch.isfinite(images).all()),
    }


def precisions(device, dry):
    """The precisions to check here: float32 and float16 always, bfloat16 where it is native."""
    found = [("float32", None), ("float16", torch.float16)]
    if dry or (device.type == "cuda" and cuda_has_native_bf16(device)):
        found.append(("bfloat16", torch.bfloat16))  # on the CPU bf16 autocast runs the same code path
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", "--dry-run", action="store_true", help="tiny settings on the CPU, to check it runs")
    args = parser.parse_args(argv)
    if args.dry:
        device, settings = torch.device("cpu"), DRY
    elif torch.cuda.is_available():
        device, settings = torch.device("cuda"), FULL
    else:
        print("no CUDA GPU here: run it on one (Colab: Runtime > Change runtime type > T4 GPU), or use --dry")
        return 2
    if device.type == "cuda":
        fast.tune_process()  # as main.py does (a dry run in the tests' process leaves the process alone)
    auto = amp_dtype("auto", device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"device: {name}; torch {torch.__version__}; --amp auto gives {describe_precision('auto', device, auto)}")
    rows = {}
    started_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for label, dtype in precisions(device, args.dry):
            started = time.perf_counter()
            rows[label] = check(settings, device, dtype, Path(tmp) / label)
            print(f"{label}: done in {time.perf_counter() - started:.0f} s", flush=True)
    columns = [c for c in next(iter(rows.values())) if not c.startswith("_")]
    print(f"\nall in {time.perf_counter() - started_all:.0f} s\n")
    print("| precision | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(row[c] for c in columns) + " |")
    fastest = min(rows, key=lambda k: rows[k]["_best"])
    if "bfloat16" in rows:  # what --amp auto picked before: bf16 where native, eager
        print(f"\nfastest: {fastest}; its best step against the eager bf16 step of before: "
              f"x{rows['bfloat16']['_before'] / rows[fastest]['_best']:.1f}")
    return 0 if all(row["_ok"] for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
