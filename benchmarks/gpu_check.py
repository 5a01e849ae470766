"""The first thing to run when a CUDA GPU is at hand: does training work, is the captured path
right on this torch and this GPU, and how fast is it, per precision and per lever.

    python benchmarks/gpu_check.py          # on the GPU: under 4 minutes on an H100 (estimated)
    python benchmarks/gpu_check.py --dry    # the same code path, tiny, on the CPU through the fake
                                            # CUDA device (hw2/fast/fake_cuda.py); the tests run this

Each section runs in a try of its own, is printed as it ends (the device's memory after it) and
is written with the others to --json (gpu_check.json), so that one that fails loses nothing else:
- what a failed capture leaves behind on this torch (benchmarks/capture_probe.py, in a process of
  its own): the error, the error inside it, and whether the generator, the allocator, a new
  capture and the default stream still work;
- for float32, float16 (loss scaling) and bfloat16 (where native, compute capability 8.0+): the
  homework's model (32 px, batch 32 x 2, dim 16, T = 50) trained through the Trainer on synthetic
  images, ms per step (median, host work included) as the step ran before it was captured
  (eager, two passes), eager with its passes joined, and captured (float16's loss scaling is never
  captured); kernels per step; whether the loss falls; 512 images sampled eagerly and captured,
  and how far the two differ; the homework's two runs projected (10,000 steps with 11 grids of
  64; the FID experiment, 1,000 steps with 10 x 512 images, Inception left out); a resume,
  weight for weight;
- the captured path in float32: 8 steps eager and captured from one seed, loss by loss, with the
  run's own first-use check; a resume that continues the device generator exactly; a checkpoint
  of a CPU run resumed and captured; a gradient hook that reads the host, found by the watched
  step (no capture tried), the losses those of an eager run. The 8 steps again in bfloat16;
- drills through main.py, each in a process of its own on a copy of the project with unet.py
  edited (benchmarks/drills.py): a value read on the host in backward, in forward (sampling
  meets it too), only while sampling, and only inside a capture (which fails: what this torch
  does then); each line says what was expected and what happened;
- the levers one by one, eager and captured (benchmarks/levers.py, one repetition), skipped when
  --budget seconds would not hold them.
"""
import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion import Diffusion  # noqa: E402
import capture_probe  # noqa: E402
import drills  # noqa: E402
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

# on a GPU: fewer steps than the first runs (30 eager, 120 captured, every way profiled), whose medians
# moved by less than their spread between runs, so that the whole check keeps under 4 minutes
FULL = dict(image_size=32, unet_dim=16, unet_dim_mults=(1, 2, 4, 8), time_steps=50, batch_size=32,
            eager_steps=20, captured_steps=60, samples=512, images=512, resume=(8, 8), profiled=3, all_profiled=False,
            compared_steps=8, lever_steps=10, lever_evaluations=4, lever_seconds=60)
DRY = dict(image_size=8, unet_dim=8, unet_dim_mults=(1, 2), time_steps=5, batch_size=4,
           eager_steps=8, captured_steps=8, samples=4, images=32, resume=(2, 4), profiled=1, all_profiled=False,
           compared_steps=8, lever_steps=1, lever_evaluations=1, lever_seconds=30)
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


def compared(settings, device, dtype, workdir):
    """(lines, ok): settings["compared_steps"] steps from one seed, eager and captured, loss by loss
    (both with their passes joined as memory allows); the captured run's own first-use check."""
    steps = settings["compared_steps"]
    eager = trainer_for(settings, device, dtype, workdir / "eager", capture=False)
    captured = trainer_for(settings, device, dtype, workdir / "captured")
    torch.manual_seed(1)
    eager_losses, _ = run_steps(eager, steps)
    torch.manual_seed(1)
    captured_losses, _ = run_steps(captured, steps)
    worst = largest_difference(eager_losses, captured_losses)
    lines = [f"{steps} steps from one seed, eager / captured (captured from step {WARMUP_STEPS + 1}), largest "
             f"relative difference {worst:.1e}; {captured.one_step.path()}:"]
    lines += [f"  step {k + 1}: {a:.6f} / {b:.6f}" for k, (a, b) in enumerate(zip(eager_losses, captured_losses))]
    return lines, captured.one_step.graph is not None and worst < 1e-4


def captured_path(settings, device, workdir):
    """(lines, ok) on the captured path in float32, against the eager step: the same losses, a resume
    that continues the device generator, a CPU-made checkpoint that captures, a hook the watched
    step finds."""
    lines, ok = compared(settings, device, None, workdir)

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

    # a gradient hook that reads a value on the host: the watched step finds it, no capture is tried
    runs = []
    for capture in (None, False):
        trainer = trainer_for(settings, device, None, workdir / f"drill-{capture}", capture=capture)
        trainer.model.final_conv.weight.register_hook(HostRead())
        torch.manual_seed(1)
        runs.append((trainer, *run_steps(trainer, WARMUP_STEPS + 3)))
    (drilled, losses, err), (_, eager_losses, _) = runs
    notes = err.count("note: the training step runs eagerly")
    apart = largest_difference(losses, eager_losses)  # 0 on a CPU; cuDNN may differ in the last bits
    lines.append(f"a hook that reads a value on the host: {drilled.one_step.path()}; the note printed {notes} "
                 f"time(s), losses {'equal to' if apart < 1e-4 else 'NOT'} the eager run's (largest relative "
                 f"difference {apart:.1e})")
    ok &= drilled.one_step.graph is None and notes == 1 and apart < 1e-4
    return lines, ok


def check(settings, device, dtype, workdir):
    """One precision's row: {column: cell}, and figures under keys that start with _."""
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


def row_lines(label, row):
    columns = [c for c in row if not c.startswith("_")]
    return ["| precision | " + " | ".join(columns) + " |", "| --- " * (len(columns) + 1) + "|",
            f"| {label} | " + " | ".join(row[c] for c in columns) + " |"]


class Sections:
    """Each section run in its own try, printed as it ends, and written with the others to a JSON file;
    the device's memory after each; a section with an estimate skipped when it would overrun the budget."""

    def __init__(self, device, where, path, budget):
        self.device, self.path, self.budget = device, Path(path), budget
        self.results = {"device": where, "sections": {}}
        self.started = time.perf_counter()

    def run(self, name, body, estimate=0):
        calls, elapsed = cuda.calls(), time.perf_counter() - self.started
        print(f"\n### {name} ({self.results['device']})\n", flush=True)
        if estimate and elapsed + estimate > self.budget:
            return self.record(name, [f"skipped: {elapsed:.0f} s of the {self.budget:.0f} s budget spent, and it takes "
                                      f"about {estimate} s"], None, {})
        started = time.perf_counter()
        calls.reset_peak_memory(self.device)
        try:
            lines, ok, data = body()
        except Exception:  # noqa: BLE001 - a section that fails is reported, and the next one runs
            lines, ok, data = traceback.format_exc().rstrip().splitlines(), False, {}
        mib = calls.memory_allocated(self.device) / 2**20, calls.peak_memory(self.device) / 2**20
        lines.append(f"({time.perf_counter() - started:.0f} s; device memory {mib[0]:.0f} MiB allocated, "
                     f"peak {mib[1]:.0f} MiB)")
        return self.record(name, lines, ok, data, seconds=time.perf_counter() - started, memory_mib=mib)

    def record(self, name, lines, ok, data, **figures):
        print("\n".join(lines), flush=True)
        self.results["sections"][name] = {"ok": ok, "lines": lines, **figures, "data": data}
        self.path.write_text(json.dumps(self.results, indent=1, default=str))
        return ok

    def all_ok(self):
        return all(r["ok"] is not False for r in self.results["sections"].values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", "--dry-run", action="store_true",
                        help="tiny settings on the CPU through the fake CUDA device, to check it runs")
    parser.add_argument("--json", default="gpu_check.json", help="where every section's results are written")
    parser.add_argument("--budget", type=float, default=210,
                        help="seconds: the lever tables are skipped when they would end after this")
    args = parser.parse_args(argv)
    if args.dry:
        with cuda.use(FakeCuda()):
            return check_all(torch.device("cpu"), DRY, "CPU through the fake CUDA device (dry run)", args, dry=True)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: run it on one (Colab: Runtime > Change runtime type > T4 GPU), or use --dry")
        return 2
    fast.tune_process()  # as main.py does (a dry run in the tests' process leaves the process alone)
    device = torch.device("cuda")
    return check_all(device, FULL, torch.cuda.get_device_name(device), args, dry=False)


def check_all(device, settings, name, args, dry):
    where = f"{name}; torch {torch.__version__}"
    auto = amp_dtype("auto", device)
    print(f"device: {where}; --amp auto gives {describe_precision('auto', device, auto)}", flush=True)
    sections = Sections(device, where, args.json, args.budget)
    sections.run("what a failed capture leaves behind (benchmarks/capture_probe.py)",
                 lambda: capture_probe.in_a_process(dry))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, dtype in precisions(device, dry):
            def row(label=label, dtype=dtype):
                rows[label] = check(settings, device, dtype, Path(tmp) / label)
                return row_lines(label, rows[label]), rows[label]["_ok"], rows[label]
            sections.run(f"{label}: training, sampling, the homework's runs projected, a resume", row)
        sections.run("the captured path, float32", lambda: (*captured_path(settings, device, Path(tmp) / "path"), {}))
        if "bfloat16" in rows:
            sections.run("captured against eager, bfloat16",
                         lambda: (*compared(settings, device, torch.bfloat16, Path(tmp) / "bf16"), {}))
        sections.run("drills: edits of unet.py through main.py, --cuda_graph True (benchmarks/drills.py)",
                     lambda: drills.all_drills(Path(tmp) / "drills", dry))
    if rows:
        fastest = min(rows, key=lambda k: rows[k]["_best"])
        print(f"\nfastest: {fastest}" + (f"; its best step against the eager bf16 step of before: "
                                         f"x{rows['bfloat16']['_before'] / rows[fastest]['_best']:.1f}"
                                         if "bfloat16" in rows else ""))
    lever_settings = LEVER_SETTINGS[dry]

    def lever_tables():
        figures = levers.measure(device, None, 1, settings["lever_steps"], settings["lever_evaluations"],
                                 lever_settings)
        for mode, table in figures.items():
            levers.report(f"Levers, float32, {mode}, one repetition ({where})", table, lever_settings, minutes=True)
        return [f"{mode}: {len(table)} configurations" for mode, table in figures.items()], True, figures

    sections.run("the levers, eager and captured (benchmarks/levers.py)", lever_tables, estimate=settings["lever_seconds"])
    ok = sections.all_ok()
    print(f"\nall in {time.perf_counter() - sections.started:.0f} s: {'as expected' if ok else 'NOT as expected: see above'}"
          f"; every section in {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
