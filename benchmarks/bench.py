"""This project against denoising-diffusion-pytorch, side by side, in one run.

    pip install -r benchmarks/requirements.txt
    python benchmarks/bench.py --quick     # every row, fewer repetitions (about 8 minutes on 2 CPU cores)
    python benchmarks/bench.py             # the same rows with more repetitions, steps and images
    python benchmarks/bench.py --sampling_only --reps 5   # the sampling rows alone, every repetition shown
    python benchmarks/bench.py --sampling_only --separate_processes --keep_freed_memory  # each in a fresh process

Both sides train the homework configuration (32 px, batch 32 x 2 accumulation steps, dim 16,
mults 1 2 4 8, T = 50, cosine schedule, Adam 1e-3; their loss is MSE, ours the homework's
L1, which costs the same). Measurements alternate between the sides within each
repetition; the table reports medians. Rows in equal precision (float32 against float32,
bf16 autocast against bf16 autocast) stand beside the default-against-default rows: our
default is what --amp auto picks here, theirs is their Trainer's default (float32).

1. model-only training step (random tensors: forward and backward of 2 x 32 images, Adam);
2. end-to-end training from a folder of 512 px JPEGs, data loading included, each side as
   its user runs it (ours: the Trainer with its decode-once cache, whose one-time build is
   reported apart; theirs: their Trainer, which decodes every image at every step);
3. sampling 32 images over the 50 steps (ours as the tool samples: hw2.sampling.generate);
4. the homework's recommended run (10,000 steps, a grid of 64 samples every 1,000 and at
   the end), projected from rows 2 and 3;
5. learning: both sides trained the same number of steps on the same images, then the L1
   and MSE of their noise predictions on held-out images, at fixed t and noise;
6. FID features per milestone (an Inception v3 of the same cost with random weights: the
   real weights cannot be downloaded here) and peak memory while training.

Both sides share one process, so malloc's settings hold for both: by default the system's
(glibc returns freed blocks to the kernel), not main.py's on a CPU (hw2/fast/memory.py keeps them);
--keep_freed_memory gives both sides main.py's. benchmarks/freed_memory.py measures what
that setting buys this project alone.
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

from diffusion import Diffusion, normalize  # noqa: E402
from hw2.config import Config  # noqa: E402
from hw2.data import decode, resized_side, training_data  # noqa: E402
from hw2 import fast  # noqa: E402
from hw2.fast.memory import keep_freed_memory  # noqa: E402
from hw2.precision import amp_dtype, autocast  # noqa: E402
from hw2.sampling import generate  # noqa: E402
from hw2.step import TrainStep  # noqa: E402
from trainer import Trainer  # noqa: E402
from unet import Unet  # noqa: E402

SIZE, BATCH, DIM, MULTS, T, LR, ACCUMULATE = 32, 32, 16, (1, 2, 4, 8), 50, 1e-3, 2
HOMEWORK_STEPS, HOMEWORK_MILESTONES, GRID = 10_000, 11, 64  # 10 milestones and the final grid
HELDOUT_SOURCES = 8  # source images kept out of the training folder, for row 5
TARGETS = {"e2e": 3.0, "train float32": 1.5, "train bf16": 1.5, "sample float32": 2.5, "sample bf16": 2.5}


# the two sides

def ours(channels_last=False):
    model = fast.speed_up(Unet(DIM, dim_mults=MULTS), channels_last=True if channels_last else None)  # as main.py
    return Diffusion(model, image_size=SIZE, timesteps=T)


def theirs():
    from denoising_diffusion_pytorch import GaussianDiffusion
    from denoising_diffusion_pytorch import Unet as TheirUnet

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


def interleaved(fns, reps, device, warmup=1, times=None):
    """{name: median seconds}, alternating the callables within each repetition; times, a
    dict, if given, gets every repetition's seconds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {} if times is None else times
    times.update({k: [] for k in fns})
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def train_step_fn(diffusion, device, x, fused=True, dtype=None):
    """The training step (hw2/step.py) of ACCUMULATE passes over the images x (B, C, S, S) in [-1, 1]."""
    opt = fast.make_adam(diffusion.model, LR) if fused else torch.optim.Adam(diffusion.parameters(), lr=LR)
    step = TrainStep(diffusion, opt, batch_size=x.shape[0], passes=ACCUMULATE, amp_dtype=dtype)
    step.inputs.copy_(x.expand_as(step.inputs))
    return step


def their_step_fn(diffusion, device, x, dtype=None):
    """Their side's step, as their Trainer takes it: ACCUMULATE passes over x, Adam."""
    opt = torch.optim.Adam(diffusion.parameters(), lr=LR)

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


def source_images(source):
    files = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(files) <= HELDOUT_SOURCES:
        raise SystemExit(f"too few images in {source} to build the benchmark folder from (use --source)")
    return files[HELDOUT_SOURCES:], files[:HELDOUT_SOURCES]  # (training sources, held-out sources)


def build_jpeg_folder(sources, folder, count, seed=0):
    """count 512 px JPEGs made from the source images by flips, crops and rotations."""
    from PIL import Image, ImageOps

    folder = Path(folder) / "cat"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) >= count:
        return folder.parent
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        img = Image.open(rng.choice(sources)).convert("RGB")
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


def label(dtype):
    return "float32" if dtype is None else "bf16"


# the measurements

def model_only(device, reps):
    torch.manual_seed(0)
    x = torch.rand(BATCH, 3, SIZE, SIZE, device=device) * 2 - 1
    a, b = ours().to(device), theirs().to(device)
    params = (sum(p.numel() for p in a.model.parameters()), sum(p.numel() for p in b.model.parameters()))
    flops = (flops_per_step(a, x), flops_per_step(b, x))
    fns = {}
    for dtype in (None, torch.bfloat16):
        fns[f"ours {label(dtype)}"] = train_step_fn(ours().to(device), device, x, dtype=dtype)
        fns[f"theirs {label(dtype)}"] = their_step_fn(theirs().to(device), device, x, dtype=dtype)
    fns["ours float32, plain Adam"] = train_step_fn(ours().to(device), device, x, fused=False)
    fns["ours default, channels-last"] = train_step_fn(ours(channels_last=True).to(device), device,
                                                       x.contiguous(memory_format=torch.channels_last),
                                                       dtype=default_dtype(device))
    return params, flops, interleaved(fns, reps, device)


def end_to_end(device, folder, steps, reps, workdir):
    cfg = Config(data_path=str(folder), data_class="cat", cache_dir=str(workdir / "cache"), save_folder=str(workdir / "o"),
                 device=str(device), wandb="disabled")
    start = time.perf_counter()
    _, images = training_data(cfg, progress=False)
    cold = time.perf_counter() - start
    torch.manual_seed(0)
    trainer = Trainer(ours().to(device), cfg, images, amp_dtype=default_dtype(device))
    their_trainer = their_trainer_for(folder, workdir / "t")

    def run_ours():
        for _ in range(steps):
            trainer.train_step()

    def run_theirs():
        their_trainer.train_num_steps = their_trainer.step + steps
        their_trainer.train()

    medians = interleaved({"ours": run_ours, "theirs": run_theirs}, reps, device)
    return cold, {k: v / steps for k, v in medians.items()}, (trainer, their_trainer)


def their_trainer_for(folder, results):
    from denoising_diffusion_pytorch import Trainer as TheirTrainer

    torch.manual_seed(0)
    return TheirTrainer(theirs(), str(Path(folder) / "cat"), train_batch_size=BATCH, train_lr=LR, train_num_steps=0,
                        gradient_accumulate_every=ACCUMULATE, save_and_sample_every=10**9, calculate_fid=False,
                        amp=False, results_folder=str(results))


def sampling_fns(device, count, sides=("ours", "theirs")):
    """{(side, precision): a callable that draws count images over the T steps}."""
    torch.manual_seed(0)
    models = {side: build().to(device).eval() for side, build in (("ours", ours), ("theirs", theirs)) if side in sides}
    fns = {}
    for dtype in (None, torch.bfloat16):
        if "ours" in models:
            fns["ours", label(dtype)] = lambda dtype=dtype: generate(models["ours"], count, seed=0, amp_dtype=dtype)
        if "theirs" in models:
            fns["theirs", label(dtype)] = lambda dtype=dtype: their_sample(models["theirs"], count, device, dtype)
    return fns


def their_sample(diffusion, count, device, dtype):
    with torch.inference_mode(), autocast(device, dtype):
        diffusion.sample(batch_size=count)


def sampling(device, count, reps, times=None):
    """{(side, precision): median seconds} to draw count images over the T steps, both sides
    in this process; times: as for interleaved()."""
    return interleaved(sampling_fns(device, count), reps, device, warmup=0, times=times)


def sampling_in_processes(device, count, reps, keep_freed, times):
    """The same as sampling(), but every measurement in a fresh process of its own (one per
    side, precision and repetition, alternating): neither side's allocations shape the other's
    heap. Each process draws twice and reports the second, so one-time set-up is left out."""
    for _ in range(reps):
        for prec in ("float32", "bf16"):
            for side in ("ours", "theirs"):
                command = [sys.executable, __file__, "--sample_worker", side, prec, "--samples", str(count),
                           "--device", str(device), *(["--keep_freed_memory"] if keep_freed else [])]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                times.setdefault((side, prec), []).append(float(out.split()[-1]))
    return {k: statistics.median(v) for k, v in times.items()}


def sample_worker(device, count, side, prec):
    """One process's part in sampling_in_processes(): the seconds of its second draw."""
    fn = sampling_fns(device, count, sides=(side,))[side, prec]
    fn()
    print(timed(fn, device))


def heldout_images(sources):
    """The held-out source images as the models see them: (N, 3, S, S) in [-1, 1]."""
    side = resized_side(SIZE)
    arrays = [decode(f, side) for f in sources]
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays]).float() / 255
    y = (side - SIZE) // 2
    return normalize(x[:, :, y:y + SIZE, y:y + SIZE])


@torch.inference_mode()
def noise_prediction_error(diffusion, x_0, draws=16, seed=0):
    """(L1, MSE) of diffusion.model's noise prediction on x_0 at fixed t and noise, in float32."""
    g = torch.Generator().manual_seed(seed)
    x = x_0.repeat(draws, 1, 1, 1)
    t = torch.randint(0, T, (x.shape[0],), generator=g)
    noise = torch.randn(x.shape, generator=g)
    was = diffusion.training
    diffusion.eval()
    device = next(diffusion.parameters()).device
    x_t = diffusion.q_sample(x.to(device), t.to(device), noise=noise.to(device))
    predicted = diffusion.model(x_t, t.to(device)).float().cpu()
    diffusion.train(was)
    return (predicted - noise).abs().mean().item(), ((predicted - noise) ** 2).mean().item()


def learning(device, trainers, steps, sources):
    """Train both sides on, up to `steps` steps in all, then their held-out errors."""
    trainer, their_trainer = trainers
    while trainer.step < steps:
        trainer.train_step()
    their_trainer.train_num_steps = steps
    their_trainer.train()
    x_0 = heldout_images(sources)
    return {"ours": noise_prediction_error(trainer.diffusion, x_0),
            "theirs": noise_prediction_error(their_trainer.model, x_0)}, trainer.step


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
step = (bench.train_step_fn(d, device, x, dtype=bench.default_dtype(device)) if {side!r} == "ours"
        else bench.their_step_fn(d, device, x))
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

def row(name, a, b, unit, target=None, note=""):
    """A table row for a lower-is-better quantity; the ratio is how many times ours is better."""
    ratio = b / a
    if target is not None:
        note = f"{target:.1f}x {'met' if ratio >= target else 'NOT MET'}"
    return f"| {name} | {a:.4g} {unit} | {b:.4g} {unit} | {ratio:.2f}x | {note} |"


def print_each_sampling(times):
    print("sampling, each repetition in turn (ours vs theirs, s; theirs / ours):")
    for prec in ("float32", "bf16"):
        pairs = zip(times["ours", prec], times["theirs", prec])
        print(f"  {prec:8s} " + ", ".join(f"{a:.2f} vs {b:.2f} ({b / a:.2f}x)" for a, b in pairs))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per measurement (medians are reported)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per end-to-end repetition")
    parser.add_argument("--images", type=int, default=2000, help="512 px JPEGs in the end-to-end folder")
    parser.add_argument("--samples", type=int, default=32, help="images per sampling measurement")
    parser.add_argument("--learn_steps", type=int, default=300, help="training steps before the held-out errors")
    parser.add_argument("--fid_samples", type=int, default=512, help="generated images per FID measurement")
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "afhq_sample"), help="images to build the folder from")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "ddpm-bench"))
    parser.add_argument("--quick", action="store_true", help="3 repetitions, 500 images, 100 learning steps")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--sampling_only", action="store_true", help="only the sampling rows, each repetition shown")
    parser.add_argument("--keep_freed_memory", action="store_true",
                        help="malloc set as main.py sets it on a CPU (hw2/fast/memory.py), for both sides: one process holds both")
    parser.add_argument("--separate_processes", action="store_true",
                        help="with --sampling_only: every measurement in a fresh process of its own, the sides alternating")
    parser.add_argument("--sample_worker", nargs=2, metavar=("SIDE", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.separate_processes and not args.sampling_only:
        parser.error("--separate_processes measures the sampling rows only: add --sampling_only")
    if args.sample_worker:
        if args.keep_freed_memory:
            keep_freed_memory()
        return sample_worker(torch.device(args.device), args.samples, *args.sample_worker)
    if args.quick:
        args.reps, args.steps, args.images, args.learn_steps, args.fid_samples = 3, 5, 500, 100, 128
    device = torch.device(args.device)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    default = default_dtype(device)
    memory = keep_freed_memory() if args.keep_freed_memory else None
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"denoising-diffusion-pytorch {version('denoising-diffusion-pytorch')}; our default precision here: "
          f"{label(default)}; theirs: float32; malloc: {memory or 'as the system set it'}", flush=True)
    results = {}
    started = time.perf_counter()
    if args.sampling_only:
        times = {}
        if args.separate_processes:
            print("each measurement in a fresh process of its own", flush=True)
            sample_s = sampling_in_processes(device, args.samples, args.reps, args.keep_freed_memory, times)
        else:
            sample_s = sampling(device, args.samples, args.reps, times)
        for prec in ("float32", "bf16"):
            print(row(f"sampling {args.samples} images, T={T}, {prec} vs {prec}", sample_s["ours", prec],
                      sample_s["theirs", prec], "s", target=TARGETS[f"sample {prec}"]))
        print_each_sampling(times)
        if args.json:
            Path(args.json).write_text(json.dumps({f"{side} {prec}": v for (side, prec), v in times.items()}, indent=1))
        return

    mm = matmul_gflops(device)
    (p_ours, p_theirs), (f_ours, f_theirs), steps = model_only(device, args.reps)
    results.update(matmul_gflops=mm, params=[p_ours, p_theirs], flops_per_step=[f_ours, f_theirs], model_step_s=steps)
    print("model-only steps done", flush=True)

    training_sources, held_out = source_images(args.source)
    folder = build_jpeg_folder(training_sources, workdir / "jpegs", args.images)
    cold, step_s, trainers = end_to_end(device, folder, args.steps, args.reps, workdir)
    results.update(cache_build_s=cold, e2e_step_s=step_s)
    print("end-to-end done", flush=True)

    sample_times = {}
    sample_s = sampling(device, args.samples, args.reps, sample_times)
    results["sampling_s"] = {f"{side} {prec}": v for (side, prec), v in sample_s.items()}
    results["sampling_each_s"] = {f"{side} {prec}": v for (side, prec), v in sample_times.items()}
    grid_s = {side: sample_s[side, label(default if side == "ours" else None)] * GRID / args.samples
              for side in ("ours", "theirs")}
    projected = {side: (HOMEWORK_STEPS * step_s[side] + HOMEWORK_MILESTONES * grid_s[side]) / 3600
                 for side in ("ours", "theirs")}
    results["projected_homework_h"] = projected
    print("sampling done", flush=True)

    errors, learned = learning(device, trainers, args.learn_steps, held_out)
    results.update(heldout_errors=errors, learn_steps=learned)
    print("learning done", flush=True)

    fid_s, n_real = fid_times(device, args.fid_samples, folder, max(1, args.reps // 2), workdir)
    results.update(fid_s=fid_s, fid_real_images=n_real)
    mem = {side: peak_memory(device, side) for side in ("ours", "theirs")}
    results["peak_memory_bytes"] = mem
    results["seconds"] = time.perf_counter() - started

    print()
    print("| measurement | this project | denoising-diffusion-pytorch | ours vs theirs | target |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| parameters | {p_ours:,} | {p_theirs:,} | {p_ours / p_theirs:.3f} | |")
    print(f"| FLOPs per training step | {f_ours / 1e9:.2f} G | {f_theirs / 1e9:.2f} G | {f_ours / f_theirs:.3f} | |")
    print(row(f"end to end, each as its user runs it ({label(default)} vs float32, {args.images} JPEGs)",
              step_s["ours"], step_s["theirs"], "s/step", target=TARGETS["e2e"]))
    print(f"| one-time decode cache build | {cold:.1f} s | none | | |")
    print(row(f"model-only step, defaults ({label(default)} vs float32)", steps[f"ours {label(default)}"],
              steps["theirs float32"], "s"))
    for prec in ("float32", "bf16"):
        print(row(f"model-only step, {prec} vs {prec}", steps[f"ours {prec}"], steps[f"theirs {prec}"], "s",
                  target=TARGETS[f"train {prec}"]))
    print(f"| achieved, defaults (of {mm:.0f} GFLOP/s fp32 matmul) | "
          f"{f_ours / steps[f'ours {label(default)}'] / 1e9:.1f} GFLOP/s | "
          f"{f_theirs / steps['theirs float32'] / 1e9:.1f} GFLOP/s | | |")
    print(row(f"sampling {args.samples} images, T={T}, defaults ({label(default)} vs float32)",
              sample_s["ours", label(default)], sample_s["theirs", "float32"], "s"))
    for prec in ("float32", "bf16"):
        print(row(f"sampling {args.samples} images, T={T}, {prec} vs {prec}", sample_s["ours", prec],
                  sample_s["theirs", prec], "s", target=TARGETS[f"sample {prec}"]))
    print(row(f"homework run projected ({HOMEWORK_STEPS:,} steps + {HOMEWORK_MILESTONES} grids of {GRID})",
              projected["ours"], projected["theirs"], "h",
              note=f"under 1.5 h {'met' if projected['ours'] < 1.5 else 'NOT MET'}"))
    for k, metric in enumerate(("L1", "MSE")):
        print(f"| held-out noise-prediction {metric} after {learned} steps | {errors['ours'][k]:.4f} | "
              f"{errors['theirs'][k]:.4f} | | |")
    print(row(f"FID features per milestone ({args.fid_samples} gen. + {n_real} real)", fid_s["ours"],
              fid_s["theirs"], "s"))
    mem_label = "peak memory allocated, training" if device.type == "cuda" else "peak RSS growth while training"
    print(row(mem_label, mem["ours"] / 2**20, mem["theirs"] / 2**20, "MiB"))
    print()
    print("our levers, model-only step (median s, and speed-up over float32 with plain Adam):")
    base = steps["ours float32, plain Adam"]
    for name in ("ours float32, plain Adam", "ours float32", "ours bf16", "ours default, channels-last"):
        print(f"  {name:29s} {steps[name]:.4f}  {base / steps[name]:.2f}x")
    print_each_sampling(sample_times)
    print(f"(benchmark took {results['seconds'] / 60:.1f} minutes)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
