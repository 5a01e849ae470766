"""This project against denoising-diffusion-pytorch, side by side, in one run.

    pip install -r benchmarks/requirements.txt
    python benchmarks/bench.py                    # the homework configuration, on the best device
    python benchmarks/bench.py --quick            # fewer repetitions and images, for a first look

Both sides train the homework configuration (32 px, batch 32, unet_dim 16, mults 1 2 4 8,
T = 50, cosine schedule, Adam 1e-3, 2 gradient accumulation steps; their loss is MSE, ours
the homework's L1, which costs the same). The
measurements alternate between the two sides within each repetition, and the table reports
medians. What is measured:

1. model-only training step (random tensors, one forward/backward of a batch + Adam);
2. end-to-end training throughput from a folder of 512 px JPEGs, data loading included
   (ours: the trainer with its decode-once cache, whose one-time build is reported apart;
   theirs: their Trainer, which decodes and resizes every image at every step);
3. sampling time for --samples images at T = 50;
4. FID evaluation per milestone: featurizing the generated images only (our cached real
   side) against featurizing both sides (the homework trainer's way). Inception's weights
   cannot be downloaded here, so an Inception v3 of the same architecture with random
   weights stands in: the time is the same, the score is meaningless and not reported;
5. peak memory of a training process of each side (on the CPU, the growth of the resident
   set while training, after imports and model construction; on CUDA, max allocated).

It also prints parameter counts, FLOPs per training step (torch's FLOP counter), the
achieved GFLOP/s, and the machine's float32 matrix-multiply rate for scale, plus what
each of our levers (fused Adam, channels-last) buys on the model-only step.
"""
import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion import Diffusion  # noqa: E402
from hw2.config import Config  # noqa: E402
from hw2.data import training_data  # noqa: E402
from hw2.precision import amp_dtype, autocast  # noqa: E402
from trainer import Trainer, make_adam  # noqa: E402
from unet import Unet  # noqa: E402

SIZE, BATCH, DIM, MULTS, T, LR, ACCUMULATE = 32, 32, 16, (1, 2, 4, 8), 50, 1e-3, 2


# the two sides

def ours(channels_last=False):
    model = Unet(DIM, dim_mults=MULTS)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Diffusion(model, image_size=SIZE, timesteps=T)


def theirs():
    from denoising_diffusion_pytorch import GaussianDiffusion
    from denoising_diffusion_pytorch import Unet as TheirUnet

    # Their defaults otherwise; they train with an MSE loss, ours with the homework's L1:
    # the same work for the clock.
    return GaussianDiffusion(TheirUnet(DIM, dim_mults=MULTS), image_size=SIZE, timesteps=T, sampling_timesteps=T,
                             objective="pred_noise", beta_schedule="cosine")


# helpers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns, reps, device, warmup=1):
    """{name: median seconds}, alternating the callables within each repetition."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def train_step_fn(diffusion, device, x, fused=True, dtype=None):
    opt = make_adam(diffusion.parameters(), LR) if fused else torch.optim.Adam(diffusion.parameters(), lr=LR)

    def step():
        for _ in range(ACCUMULATE):
            with autocast(device, dtype):
                loss = diffusion(x) / ACCUMULATE
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def flops_per_step(diffusion, x):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        diffusion(x).backward()
    diffusion.zero_grad(set_to_none=True)
    return counter.get_total_flops() * ACCUMULATE


def matmul_gflops(device, n=2048, reps=5):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = min(timed(lambda: a @ b, device) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def build_jpeg_folder(source, folder, count, seed=0):
    """count 512 px JPEGs made from the images in source by flips, crops and rotations."""
    from PIL import Image, ImageOps

    folder = Path(folder) / "cat"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) >= count:
        return folder.parent
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no images in {source} to build the benchmark folder from (use --source)")
    rng = random.Random(seed)
    for i in range(count):
        img = Image.open(rng.choice(files)).convert("RGB")
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        w, h = img.size
        crop = rng.uniform(0.8, 1.0)
        cw, ch = int(w * crop), int(h * crop)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = img.crop((x, y, x + cw, y + ch)).rotate(rng.uniform(-10, 10)).resize((512, 512), Image.BICUBIC)
        img.save(folder / f"img_{i:05d}.jpg", quality=95)
    return folder.parent


def default_dtype(device):
    """What --amp auto picks on this device: our default, as a user gets it."""
    return amp_dtype("auto", device)


# the measurements

def model_only(device, reps):
    torch.manual_seed(0)
    x = torch.rand(BATCH, 3, SIZE, SIZE, device=device) * 2 - 1
    a, b = ours().to(device), theirs().to(device)
    params = (sum(p.numel() for p in a.model.parameters()), sum(p.numel() for p in b.model.parameters()))
    flops = (flops_per_step(a, x), flops_per_step(b, x))
    dtype = default_dtype(device)
    fns = {
        "ours": train_step_fn(a, device, x, dtype=dtype),
        "theirs": train_step_fn(b, device, x),
        "ours, float32": train_step_fn(ours().to(device), device, x),
        "ours, float32, plain Adam": train_step_fn(ours().to(device), device, x, fused=False),
        "ours, channels-last": train_step_fn(ours(channels_last=True).to(device), device, x, dtype=dtype),
    }
    return params, flops, interleaved(fns, reps, device)


def end_to_end(device, folder, steps, reps, workdir):
    cfg = Config(data_path=str(folder), data_class="cat", cache_dir=str(workdir / "cache"), save_folder=str(workdir / "o"),
                 device=str(device), wandb="disabled")
    start = time.perf_counter()
    _, images = training_data(cfg, progress=False)
    cold = time.perf_counter() - start
    torch.manual_seed(0)
    trainer = Trainer(ours().to(device), cfg, images, amp_dtype=default_dtype(device))

    from denoising_diffusion_pytorch import Trainer as TheirTrainer

    their_trainer = TheirTrainer(theirs(), str(folder / "cat"), train_batch_size=BATCH, train_lr=LR, train_num_steps=0,
                                 gradient_accumulate_every=ACCUMULATE, save_and_sample_every=10**9, calculate_fid=False,
                                 amp=False, results_folder=str(workdir / "t"))

    def run_ours():
        for _ in range(steps):
            trainer.train_step()

    def run_theirs():
        their_trainer.train_num_steps = their_trainer.step + steps
        their_trainer.train()

    medians = interleaved({"ours": run_ours, "theirs": run_theirs}, reps, device)
    return cold, {k: steps / v for k, v in medians.items()}


def sampling(device, count, reps):
    torch.manual_seed(0)
    a, b = ours().to(device).eval(), theirs().to(device).eval()

    def run_ours():
        with autocast(device, default_dtype(device)):
            a.sample(count)

    def run_theirs():
        with torch.inference_mode():
            b.sample(batch_size=count)

    return interleaved({"ours": run_ours, "theirs": run_theirs}, reps, device, warmup=0)


def fid_times(device, count, real_folder, reps, workdir):
    """Featurize `count` generated PNGs (ours) vs those plus every real image (the homework's way)."""
    import torchvision
    from cleanfid import fid as cleanfid
    from PIL import Image

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval().to(device)
    net.fc = torch.nn.Identity()

    @torch.no_grad()
    def features(x):
        return net((x - 128) / 128)

    gen = workdir / "generated"
    gen.mkdir(exist_ok=True)
    for i in range(count):
        Image.fromarray(torch.randint(0, 255, (SIZE, SIZE, 3), dtype=torch.uint8).numpy()).save(gen / f"{i:05d}.png")
    gen_files = sorted(str(p) for p in gen.iterdir())
    real_files = sorted(str(p) for p in Path(real_folder).rglob("*.jpg"))
    workers = min(8, os.cpu_count() or 1)

    def feats(files):
        return cleanfid.get_files_features(files, features, num_workers=workers, batch_size=64, device=device,
                                           mode="clean", verbose=False)

    medians = interleaved({"ours": lambda: feats(gen_files), "theirs": lambda: (feats(gen_files), feats(real_files))},
                          reps, device, warmup=0)
    return medians, len(real_files)


MEMORY_CHILD = """
import sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
import bench
device = torch.device({device!r})
x = torch.rand(bench.BATCH, 3, bench.SIZE, bench.SIZE, device=device) * 2 - 1
d = (bench.ours() if {side!r} == "ours" else bench.theirs()).to(device)
step = bench.train_step_fn(d, device, x, dtype=bench.default_dtype(device) if {side!r} == "ours" else None)
before = bench.rss()
open("/proc/self/clear_refs", "w").write("5")  # restart the peak-RSS count from here
for _ in range(3):
    step()
peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else bench.peak_rss() - before
print(peak)
"""


def _status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def rss():
    return _status("VmRSS")


def peak_rss():
    return _status("VmHWM")


def peak_memory(device, side):
    code = MEMORY_CHILD.format(root=str(ROOT), bench=str(Path(__file__).parent), device=str(device), side=side)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


# the report

def row(name, a, b, unit, better="lower"):
    ratio = (b / a) if better == "lower" else (a / b)
    return f"| {name} | {a:.4g} {unit} | {b:.4g} {unit} | {ratio:.2f}x |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per measurement (medians are reported)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per end-to-end repetition")
    parser.add_argument("--images", type=int, default=2000, help="512 px JPEGs in the end-to-end folder")
    parser.add_argument("--samples", type=int, default=512, help="images per sampling measurement")
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "afhq_sample"), help="images to build the folder from")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "ddpm-bench"))
    parser.add_argument("--quick", action="store_true", help="3 repetitions, 500 images, 64 samples")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.images, args.samples = 3, 500, 64
    device = torch.device(args.device)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"denoising-diffusion-pytorch {version('denoising-diffusion-pytorch')}; our default precision on this "
          f"device: {default_dtype(device) or 'float32'}")
    results = {}

    mm = matmul_gflops(device)
    (p_ours, p_theirs), (f_ours, f_theirs), steps = model_only(device, args.reps)
    results.update(matmul_gflops=mm, params=[p_ours, p_theirs], flops_per_step=[f_ours, f_theirs], model_step_s=steps)
    print("model-only step done", flush=True)

    folder = build_jpeg_folder(args.source, workdir / "jpegs", args.images)
    cold, throughput = end_to_end(device, folder, args.steps, args.reps, workdir)
    results.update(cache_build_s=cold, steps_per_s=throughput)
    print("end-to-end done", flush=True)

    sample_s = sampling(device, args.samples, max(1, args.reps // 2))
    results["sampling_s"] = sample_s
    print("sampling done", flush=True)

    fid_s, n_real = fid_times(device, args.samples, folder, max(1, args.reps // 2), workdir)
    results.update(fid_s=fid_s, fid_real_images=n_real)
    mem = {side: peak_memory(device, side) for side in ("ours", "theirs")}
    results["peak_memory_bytes"] = mem

    print()
    print(f"| measurement | this project | denoising-diffusion-pytorch | ours vs theirs |")
    print(f"| --- | --- | --- | --- |")
    print(f"| parameters | {p_ours:,} | {p_theirs:,} | {p_ours / p_theirs:.3f} |")
    print(f"| FLOPs per training step | {f_ours / 1e9:.2f} G | {f_theirs / 1e9:.2f} G | {f_ours / f_theirs:.3f} |")
    print(row("model-only training step", steps["ours"], steps["theirs"], "s"))
    print(f"| achieved (of {mm:.0f} GFLOP/s matmul) | {f_ours / steps['ours'] / 1e9:.1f} GFLOP/s | "
          f"{f_theirs / steps['theirs'] / 1e9:.1f} GFLOP/s | |")
    print(row(f"end-to-end training ({args.images} JPEGs)", throughput["ours"], throughput["theirs"], "steps/s", better="higher"))
    print(f"| one-time decode cache build | {cold:.1f} s | none | |")
    print(row(f"sampling {args.samples} images, T={T}", sample_s["ours"], sample_s["theirs"], "s"))
    print(row(f"FID features per milestone ({args.samples} gen. + {n_real} real)", fid_s["ours"], fid_s["theirs"], "s"))
    label = "peak memory allocated, training" if device.type == "cuda" else "peak RSS growth while training"
    print(row(label, mem["ours"] / 2**20, mem["theirs"] / 2**20, "MiB"))
    print()
    print("our levers, model-only step (median s, speed-up over float32 with plain Adam):")
    base = steps["ours, float32, plain Adam"]
    for name in ("ours, float32, plain Adam", "ours, float32", "ours", "ours, channels-last"):
        print(f"  {name:27s} {steps[name]:.4f}  {base / steps[name]:.2f}x")
    print(f"  (fused Adam: 'float32' vs 'float32, plain Adam'; autocast: 'ours' vs 'float32'; 'ours' = our defaults)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
