"""The first thing to run when a CUDA GPU is at hand: does training work, is the captured path
right, and how fast is it, per precision and per lever.

    python benchmarks/gpu_check.py          # on the GPU: about 4 minutes on an H200 (estimated)
    python benchmarks/gpu_check.py --dry    # the same code path, tiny, on the CPU through the fake
                                            # CUDA device (hw2/fast/fake_cuda.py); the tests run this

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
Then, in float32 (what --amp auto picks on a GPU), the captured path against the eager one:
- 8 steps eager and captured from one seed, loss by loss;
- a run stopped after N steps and resumed for M against one never stopped: the device
  generator's state after it (equal, exactly) and the M losses;
- a run resumed from a checkpoint a CPU run made (plain Adam): does it capture;
- a drill: a layer that reads a value on the host, which no capture holds: the run goes on
  eagerly, says so once, and its losses are the eager run's;
and the levers one by one, eager and captured (benchmarks/levers.py's measurement, one
repetition). Every table says the torch version and the device.
"""
import argparse
import contextlib
import io
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
import levers  # noqa: E402
from hw2 import fast  # noqa: E402
from hw2.check import synthetic_images  # noqa: E402
from hw2.checkpoint import load_checkpoint  # noqa: E402
from hw2.fast import cuda  # noqa: E402
from hw2.fast.fake_cuda import FakeCuda  # noqa: E402
from hw2.fast.step import WARMUP_STEPS  # noqa: E402
from hw2.config import Config  # noqa: E402
from hw2.precision import amp_dtype, cuda_has_native_bf16, describe_precision  # noqa: E402
from hw2.sampling import generate  # noqa: E402
from trainer import Trainer  # noqa: E402
from unet import Unet  # noqa: E402

FULL = dict(image_size=32, unet_dim=16, unet_dim_mults=(1, 2, 4, 8), time_steps=50, batch_size=32,
            eager_steps=30, captured_steps=120, samples=512, images=512, resume=(10, 10), profiled=3, all_profiled=True,
            compared_steps=8, lever_steps=10, lever_evaluations=4)
DRY = dict(image_size=8, unet_dim=8, unet_dim_mults=(1, 2), time_steps=5, batch_size=4,
           eager_steps=8, captured_steps=8, samples=4, images=32, resume=(2, 4), profiled=1, all_profiled=False,
           compared_steps=8, lever_steps=1, lever_evaluations=1)
LEVER_SETTINGS = {False: levers.HOMEWORK, True: levers.DRY}  # by dry
RUNS = {"10,000-step run": (10_000, 11 * 64), "FID experiment": (1_000, 10 * 512 + 64)}  # (steps, images drawn)


def sync(device):
    cuda.calls().synchronize(device)


def trainer_for(settings, device, dtype, folder, seed=0, capture=None, join=True, plain=False):
    """A Trainer as main.py builds it; capture False and join False give the step as it ran
    before it was captured (eager, one pass per accumulation step). The levers are those that
    act on a CUDA GPU (the CPU's would act on the fake device's CPU)."""
    config = Config(image_size=settings["image_size"], unet_dim=settings["unet_dim"],
                    unet_dim_mults=settings["unet_dim_mults"], time_steps=settings["time_steps"],
                    batch_size=settings["batch_size"], save_folder=str(folder), seed=seed, wandb="disabled",
                    cuda_graph=capture, plain=plain)
    torch.manual_seed(seed)
    model = Unet(config.unet_dim, dim_mults=config.unet_dim_mults)
    if not plain:
        model = fast.speed_up(model, [x for x in fast.LEVERS if x not in fast.CPU_LEVERS])
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

    on_cuda = trainer.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.train_step()
        sync(trainer.device)
    kind = torch.autograd.DeviceType.CUDA if on_cuda else torch.autograd.DeviceType.CPU
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


class HostRead:
    """A gradient hook that reads a value on the host, as an edited layer might: no CUDA graph holds it."""

    def __call__(self, grad):
        grad.sum().item()


def largest_difference(a, b):
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def run_steps(trainer, steps):
    """(losses, stderr) of `steps` training steps."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        losses = [trainer.train_step() for _ in range(steps)]
    return losses, err.getvalue()


def captured_path(settings, device, workdir):
    """Lines on the captured path in float32, against the eager step: the same losses, a resume
    that continues the device generator, a CPU-made checkpoint that captures, the drill."""
    lines, ok = [], True
    steps = settings["compared_steps"]

    # 8 steps from one seed, eager and captured (both with their passes joined as memory allows)
    eager = trainer_for(settings, device, None, workdir / "eager", capture=False)
    captured = trainer_for(settings, device, None, workdir / "captured")
    torch.manual_seed(1)
    eager_losses, _ = run_steps(eager, steps)
    torch.manual_seed(1)
    captured_losses, _ = run_steps(captured, steps)
    worst = largest_difference(eager_losses, captured_losses)
    lines.append(f"{steps} steps from one seed, eager / captured (captured from step {WARMUP_STEPS + 1}), "
                 f"largest relative difference {worst:.1e}:")
    lines += [f"  step {k + 1}: {a:.6f} / {b:.6f}" for k, (a, b) in enumerate(zip(eager_losses, captured_losses))]
    ok &= captured.one_step.graph is not None and worst < 1e-4

    # stopped after n steps and resumed for m, against a run never stopped
    n, m = settings["resume"]
    straight = trainer_for(settings, device, None, workdir / "straight")
    straight_losses, _ = run_steps(straight, n + m)
    straight_generator = cuda.calls().rng_state(device).clone()
    part = trainer_for(settings, device, None, workdir / "part")
    run_steps(part, n)
    part.save(part.folder.latest)
    resumed = trainer_for(settings, device, None, workdir / "resumed", seed=123)
    resumed.load(load_checkpoint(part.folder.latest), part.folder.latest)
    resumed_losses, _ = run_steps(resumed, m)
    same_generator = torch.equal(cuda.calls().rng_state(device), straight_generator)
    lines.append(f"stopped after {n} steps and resumed for {m}: the device generator "
                 f"{'equal, exactly' if same_generator else 'DIFFERS'}; losses after the resume, resumed / never "
                 f"stopped: " + ", ".join(f"{a:.6f} / {b:.6f}" for a, b in zip(resumed_losses, straight_losses[n:])))
    ok &= same_generator and resumed.one_step.graph is not None

    # a checkpoint made by a CPU run (plain Adam, no capture) resumed here
    with cuda.use(cuda.Cuda()):
        cpu_run = trainer_for(settings, torch.device("cpu"), None, workdir / "cpu", plain=True)
        run_steps(cpu_run, 2)
        cpu_run.save(cpu_run.folder.latest)
    from_cpu = trainer_for(settings, device, None, workdir / "from_cpu")
    from_cpu.load(load_checkpoint(cpu_run.folder.latest), cpu_run.folder.latest)
    run_steps(from_cpu, WARMUP_STEPS + 2)
    group = from_cpu.opt.param_groups[0]
    took = from_cpu.one_step.graph is not None
    lines.append(f"resumed from a CPU run's checkpoint: {'captured' if took else 'NOT captured'} "
                 f"(Adam capturable={group['capturable']}, fused={group['fused']})")
    ok &= took

    # the drill: a layer no capture holds
    runs = []
    for capture in (None, False):
        trainer = trainer_for(settings, device, None, workdir / f"drill-{capture}", capture=capture)
        trainer.model.final_conv.weight.register_hook(HostRead())
        torch.manual_seed(1)
        runs.append((trainer, *run_steps(trainer, WARMUP_STEPS + 3)))
    (drilled, losses, err), (_, eager_losses, _) = runs
    notes = err.count("could not be captured")
    apart = largest_difference(losses, eager_losses)  # 0 on a CPU; cuDNN may differ in the last bits
    lines.append(f"drill, a layer that reads a value on the host: {'eager' if drilled.one_step.failed else 'CAPTURED'} "
                 f"after the failed capture ({drilled.one_step.failed}), the note printed {notes} time(s), "
                 f"losses {'equal to' if apart < 1e-4 else 'NOT'} the eager run's (largest relative difference "
                 f"{apart:.1e})")
    ok &= bool(drilled.one_step.failed) and notes == 1 and apart < 1e-4
    return lines, ok


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
        counted = settings["all_profiled"] or name == list(variants)[-1]  # a dry run counts its best way's only
        row[name] = (seconds, kernels_per_step(trainer, settings["profiled"]) if counted else "not counted")
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
    parser.add_argument("--dry", "--dry-run", action="store_true",
                        help="tiny settings on the CPU through the fake CUDA device, to check it runs")
    args = parser.parse_args(argv)
    if args.dry:
        with cuda.use(FakeCuda()):
            return check_all(torch.device("cpu"), DRY, "CPU through the fake CUDA device (dry run)", dry=True)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: run it on one (Colab: Runtime > Change runtime type > T4 GPU), or use --dry")
        return 2
    fast.tune_process()  # as main.py does (a dry run in the tests' process leaves the process alone)
    device = torch.device("cuda")
    return check_all(device, FULL, torch.cuda.get_device_name(device), dry=False)


def check_all(device, settings, name, dry):
    where = f"{name}; torch {torch.__version__}"
    auto = amp_dtype("auto", device)
    print(f"device: {where}; --amp auto gives {describe_precision('auto', device, auto)}")
    rows = {}
    started_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for label, dtype in precisions(device, dry):
            started = time.perf_counter()
            rows[label] = check(settings, device, dtype, Path(tmp) / label)
            print(f"{label}: done in {time.perf_counter() - started:.0f} s", flush=True)
        started = time.perf_counter()
        lines, path_ok = captured_path(settings, device, Path(tmp) / "path")
        print(f"the captured path: done in {time.perf_counter() - started:.0f} s", flush=True)
    started = time.perf_counter()
    lever_settings = LEVER_SETTINGS[dry]
    figures = levers.measure(device, None, 1, settings["lever_steps"], settings["lever_evaluations"], lever_settings)
    print(f"the levers: done in {time.perf_counter() - started:.0f} s", flush=True)

    columns = [c for c in next(iter(rows.values())) if not c.startswith("_")]
    print(f"\nall in {time.perf_counter() - started_all:.0f} s\n")
    print(f"### Per precision ({where})\n")
    print("| precision | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(row[c] for c in columns) + " |")
    fastest = min(rows, key=lambda k: rows[k]["_best"])
    if "bfloat16" in rows:  # what --amp auto picked before: bf16 where native, eager
        print(f"\nfastest: {fastest}; its best step against the eager bf16 step of before: "
              f"x{rows['bfloat16']['_before'] / rows[fastest]['_best']:.1f}")
    print(f"\n### The captured path, float32 ({where})\n")
    print("\n".join(lines))
    print(f"\ncaptured path: {'all as expected' if path_ok else 'NOT as expected: see above'}")
    for mode, table in figures.items():
        levers.report(f"Levers, float32, {mode}, one repetition ({where})", table, lever_settings, minutes=True)
    return 0 if path_ok and all(row["_ok"] for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
