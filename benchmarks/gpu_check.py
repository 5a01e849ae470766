"""The first thing to run when a CUDA GPU is at hand: does training work and how fast, per precision.

    python benchmarks/gpu_check.py              # on the GPU: about 2-3 minutes on a T4
    python benchmarks/gpu_check.py --dry-run    # the same code path, tiny, on the CPU (the tests run this)

For float32, float16 (with loss scaling) and bfloat16 (only where the GPU has it natively,
compute capability 8.0+), it trains the homework's model (32 px, batch 32 x 2, dim 16,
T = 50) on synthetic images in memory, and reports:
- whether the loss is finite and falls (mean of the last 10 steps below the first 10);
- training steps per second, after a warm-up;
- the time to sample 512 images with the full 50-step chain;
- a resume on the GPU: steps 1..N+M in one go against N, a checkpoint, and M more from it,
  compared weight for weight (bitwise, or the largest difference).
It also prints what --amp auto picks on this GPU, and one table to paste into an issue.
"""
import argparse
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion import Diffusion  # noqa: E402
from hw2.checkpoint import load_checkpoint  # noqa: E402
from hw2.config import Config  # noqa: E402
from hw2 import fast  # noqa: E402
from hw2.precision import amp_dtype, cuda_has_native_bf16, describe_precision  # noqa: E402
from hw2.sampling import generate  # noqa: E402
from trainer import Trainer  # noqa: E402
from unet import Unet  # noqa: E402

FULL = dict(image_size=32, unet_dim=16, unet_dim_mults=(1, 2, 4, 8), time_steps=50, batch_size=32,
            steps=120, samples=512, images=512, resume=(10, 10))
DRY = dict(image_size=16, unet_dim=8, unet_dim_mults=(1, 2), time_steps=5, batch_size=4,
           steps=20, samples=8, images=32, resume=(2, 2))


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


def trainer_for(settings, device, dtype, folder, seed=0):
    config = Config(image_size=settings["image_size"], unet_dim=settings["unet_dim"],
                    unet_dim_mults=settings["unet_dim_mults"], time_steps=settings["time_steps"],
                    batch_size=settings["batch_size"], save_folder=str(folder), seed=seed, wandb="disabled")
    torch.manual_seed(seed)
    model = fast.speed_up(Unet(config.unet_dim, dim_mults=config.unet_dim_mults))  # as main.py runs it
    diffusion = Diffusion(model, image_size=config.image_size, timesteps=config.time_steps).to(device)
    side = int(config.image_size * 1.12)
    return Trainer(diffusion, config, synthetic_images(settings["images"], side), amp_dtype=dtype)


def check(settings, device, dtype, workdir):
    """One precision's row: loss, speed, sampling time, resume."""
    trainer = trainer_for(settings, device, dtype, workdir / "train")
    losses, times = [], []
    for i in range(settings["steps"]):
        sync(device)
        start = time.perf_counter()
        losses.append(trainer.train_step())
        sync(device)
        times.append(time.perf_counter() - start)
    warm = times[len(times) // 4:]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    sync(device)
    start = time.perf_counter()
    images = generate(trainer.sampler, settings["samples"], seed=1, amp_dtype=dtype)
    sync(device)
    sample_s = time.perf_counter() - start

    n, m = settings["resume"]
    straight = trainer_for(settings, device, dtype, workdir / "straight")
    for _ in range(n + m):
        straight.train_step()
    part = trainer_for(settings, device, dtype, workdir / "part")
    for _ in range(n):
        part.train_step()
    part.save(part.folder.latest)
    resumed = trainer_for(settings, device, dtype, workdir / "resumed", seed=123)  # other weights until loaded
    resumed.load(load_checkpoint(part.folder.latest), part.folder.latest)
    for _ in range(m):
        resumed.train_step()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return {
        "loss": f"{first:.3f} -> {last:.3f}",
        "finite and falls": "yes" if all(map(math.isfinite, losses)) and last < first else "NO",
        "steps/s": f"{len(warm) / sum(warm):.2f}",
        f"sample {settings['samples']}": f"{sample_s:.1f} s",
        "resume": "bitwise" if diff == 0 else f"max diff {diff:.2e}",
        "_ok": all(map(math.isfinite, losses)) and last < first and bool(torch.isfinite(images).all()),
    }


def precisions(device, dry_run):
    """The precisions to check here: float32 and float16 always, bfloat16 where it is native."""
    found = [("float32", None), ("float16", torch.float16)]
    if device.type == "cuda" and cuda_has_native_bf16(device):
        found.append(("bfloat16", torch.bfloat16))
    elif dry_run:
        found.append(("bfloat16", torch.bfloat16))  # the CPU runs bf16 autocast too: the code path is the same
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny settings on the CPU, to check the script runs")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, settings = torch.device("cpu"), DRY
    elif torch.cuda.is_available():
        device, settings = torch.device("cuda"), FULL
    else:
        print("no CUDA GPU here: run it on one (Colab: Runtime > Change runtime type > T4 GPU), or use --dry-run")
        return 2
    if device.type == "cuda":
        fast.tune_process()  # as main.py does
    auto = amp_dtype("auto", device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"device: {name}; torch {torch.__version__}; --amp auto gives {describe_precision('auto', device, auto)}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, dtype in precisions(device, args.dry_run):
            started = time.perf_counter()
            rows[label] = check(settings, device, dtype, Path(tmp) / label)
            print(f"{label}: done in {time.perf_counter() - started:.0f} s", flush=True)
    columns = [c for c in next(iter(rows.values())) if not c.startswith("_")]
    print()
    print("| precision | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(row[c] for c in columns) + " |")
    return 0 if all(row["_ok"] for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
