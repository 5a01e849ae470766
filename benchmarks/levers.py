"""What each speed lever of hw2/fast buys the homework's two CPU runs, measured on and off.

    python benchmarks/levers.py                 # default precision and float32, about 6 minutes on 2 cores
    python benchmarks/levers.py --amp off       # float32 only
    python benchmarks/levers.py --device cuda   # on a CUDA GPU: each lever eager and captured (not yet run on one)
    python benchmarks/levers.py --dry           # the same code path, tiny, on the CPU (the tests run this)

For every lever, the homework model (32 px, dim 16, mults 1 2 4 8, T = 50) runs with every
lever on, and with every lever on but that one (leave one out), the configurations
interleaved within each repetition so that all see the same load; the plain network (no
levers, `main.py --plain`) runs beside them. Two figures per configuration, medians over the
repetitions:
- a training step: 2 forward/backward passes of 32 images and an Adam step;
- sampling: one network evaluation of a pass of images (as many as hw2.fast.images_per_pass
  says), per image.
These project the homework's two runs:
- the recommended run: 10,000 steps, and a grid of 64 images at each of 10 milestones and at
  the end (704 images, 50 evaluations each);
- the FID experiment: 1,000 steps, 512 images at each of 10 milestones and a final grid of 64
  (5,184 images).
A lever's gain is what the run takes without it minus what it takes with every lever, as a
share of the latter. A lever that applies only while sampling cannot change a training step
(and fused Adam cannot change sampling): its run keeps every lever's figure for the other
phase, so that the noise of a phase it does not touch is not counted as its gain. base-2
softmaxes run only where the attention kernel does not: they are measured without the kernel,
against every lever but the kernel. The projection leaves out what no lever touches (data loading, FID's
Inception features, writing files), so the shares are upper bounds. Process-wide levers
(freed memory) are measured by benchmarks/freed_memory.py, in fresh processes.

On a CUDA GPU (--device cuda) each configuration is measured twice: eager (the step as
hw2/fast/step.py's CudaStep runs it uncaptured, passes joined where memory allows; each
network evaluation launched) and captured (the step and each evaluation replayed from CUDA
graphs, as a default run does). The levers that apply only on a CPU (the attention kernel,
base-2 softmaxes, channels-last maps) are not measured there; captured_sampling is the
captured table's evaluation against the eager one's.
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion import Diffusion  # noqa: E402
from hw2 import fast  # noqa: E402
from hw2.fast import cuda, replay  # noqa: E402
from hw2.fast.step import WARMUP_STEPS, CudaStep  # noqa: E402
from hw2.precision import amp_dtype, autocast  # noqa: E402
from hw2.step import TrainStep  # noqa: E402
from unet import Unet  # noqa: E402

HOMEWORK = dict(size=32, batch=32, passes=2, dim=16, mults=(1, 2, 4, 8), T=50)
DRY = dict(size=16, batch=4, passes=2, dim=8, mults=(1, 2), T=5, most_images=8)  # most_images: per sampling pass
SAMPLING_ONLY = {"base2_softmax", "attention_kernel", "channels_last", "pass_size"}  # the default rule for channels_last
TRAINING_ONLY = {"fused_adam"}
STANDS_IN = {"base2_softmax": "attention_kernel"}  # runs only where the other does not
NOT_ON = {"cpu": {"captured_sampling"},  # benchmarks/gpu_check.py measures it; on CUDA it is the captured table
          "cuda": {"captured_sampling", "base2_softmax", "attention_kernel", "channels_last"}}
RUNS = {"recommended run": (10_000, 11 * 64), "FID experiment": (1_000, 10 * 512 + 64)}  # (steps, images drawn)


def kind(device):
    """"cuda" where the step and sampling are captured (a CUDA GPU, or the fake CUDA device of a
    dry run), else the device's type."""
    return "cuda" if cuda.calls().holds(device) else torch.device(device).type


def configurations(device):
    """name -> levers (None: the plain network), for the levers that apply on `device` (on CUDA,
    none of the CPU's: they would act on the fake CUDA device's CPU)."""
    where = kind(device)
    levers = tuple(x for x in fast.LEVERS if where != "cuda" or x not in fast.CPU_LEVERS)
    configs = {"every lever": levers, "plain network": None}
    skip = NOT_ON[where]
    for lever in (x for x in levers if x not in skip):
        configs[f"without {lever}"] = tuple(x for x in levers if x not in (lever, STANDS_IN.get(lever)))
    for lever, other in STANDS_IN.items():
        if lever not in skip:
            configs[f"without {other}"] = tuple(x for x in levers if x != other)
    return configs


def baseline(name):
    """The configuration a configuration's gain is measured against (itself for the reference)."""
    if name in ("every lever", "plain network"):
        return "every lever"
    lever = name.removeprefix("without ")
    return f"without {STANDS_IN[lever]}" if lever in STANDS_IN else "every lever"


def phases(name, figures):
    """(training step, image evaluation) seconds of a configuration, with the phase its lever
    cannot touch taken from its baseline."""
    step_s, image_s = figures[name]
    if baseline(name) == name:
        return step_s, image_s
    lever = name.removeprefix("without ")
    base_step, base_image = phases(baseline(name), figures)
    if lever in SAMPLING_ONLY:
        step_s = base_step
    if lever in TRAINING_ONLY:
        image_s = base_image
    return step_s, image_s


def prepare(model, levers, settings):
    """A fresh copy of the homework model `model` (its weights), made fast with `levers` (None: plain)."""
    copy = Unet(settings["dim"], dim_mults=settings["mults"])
    copy.load_state_dict(model.state_dict())
    return copy if levers is None else fast.speed_up(copy, levers)


def sync(device):
    if kind(device) == "cuda":
        cuda.calls().synchronize(device)


def train_seconds(diffusion, dtype, steps, fused, settings, captured=False):
    """Median seconds of `steps` training steps (hw2/step.py), after one to warm up; on CUDA the
    step as the Trainer runs it there (CudaStep: warm-up steps, then eager or captured)."""
    model, device = diffusion.model, diffusion.device
    step = TrainStep(diffusion, fast.make_adam(model, 1e-3, capturable=captured, fused=fused),
                     batch_size=settings["batch"], passes=settings["passes"], amp_dtype=dtype)
    warm = 1
    if kind(device) == "cuda":
        step, warm = CudaStep(step, capture=captured), WARMUP_STEPS + 1  # the last warm call captures
    times = []
    for i in range(warm + steps):
        sync(device)
        start = time.perf_counter()
        model.train()
        step.inputs.uniform_(-1, 1)
        step()
        sync(device)
        if i >= warm:
            times.append(time.perf_counter() - start)
    if captured and getattr(step, "graph", None) is None:  # a captured figure that is not one would mislead
        raise RuntimeError(f"the step could not be captured: {step.failed or step.why}")
    return statistics.median(times)


def sample_seconds_per_image(model, dtype, evaluations, sized, settings, captured=False):
    """Median seconds per image of one network evaluation in a sampling pass, after one to warm
    up (and, captured, to capture: hw2/fast/replay.py, for the plain network as for the fast)."""
    device = next(model.parameters()).device
    size, last = settings["size"], settings["T"] - 1
    n = min(fast.images_per_pass(model, device, size, dtype, sized=sized), settings.get("most_images", 2**31))
    model.eval()
    network = model.evaluate if fast.is_fast(model) else model.forward  # evaluate: not replayed by itself
    times = []
    with fast.sampling(model), autocast(device, dtype):
        x = torch.randn(n, 3, size, size, device=device)
        for i in range(evaluations + 1):
            t = torch.full((n,), max(last - i, 0), dtype=torch.long, device=device)
            sync(device)
            start = time.perf_counter()
            if captured:
                replay.replayed(model, network, x, t)
            else:
                network(x, t)
            sync(device)
            if i:
                times.append((time.perf_counter() - start) / n)
    if captured and model in replay.eager:
        raise RuntimeError(f"sampling could not be captured: {replay.eager[model]}")
    return statistics.median(times)


def project(step_s, image_s, settings):
    """{run: hours} from a training step's and an image evaluation's seconds."""
    return {run: (steps * step_s + images * settings["T"] * image_s) / 3600 for run, (steps, images) in RUNS.items()}


def measure(device, dtype, reps, steps, evaluations, settings):
    """{mode: {configuration: (step seconds, image evaluation seconds)}}; the modes: "" on a CPU,
    "eager" and "captured" on CUDA."""
    torch.manual_seed(0)
    homework = Unet(settings["dim"], dim_mults=settings["mults"])
    configs = configurations(device)
    modes = {"eager": False, "captured": True} if kind(device) == "cuda" else {"": False}
    step = {mode: {name: [] for name in configs} for mode in modes}
    image = {mode: {name: [] for name in configs} for mode in modes}
    for rep in range(reps):
        order = list(configs)
        random.Random(rep).shuffle(order)
        for name in order:
            run = set(configs[name] or ())  # the run levers are the run's settings, passed as such
            for mode, captured in modes.items():
                model = prepare(homework, configs[name], settings)
                diffusion = Diffusion(model, image_size=settings["size"], timesteps=settings["T"]).to(device)
                step[mode][name].append(train_seconds(diffusion, dtype, steps, "fused_adam" in run, settings,
                                                      captured))
                image[mode][name].append(sample_seconds_per_image(diffusion.model, dtype, evaluations,
                                                                  "pass_size" in run, settings, captured))
                del model, diffusion
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        print(f"  repetition {rep + 1} of {reps} done", file=sys.stderr, flush=True)
    return {mode: {name: (statistics.median(step[mode][name]), statistics.median(image[mode][name]))
                   for name in configs} for mode in modes}


def report(label, figures, settings, minutes=False):
    runs = list(RUNS)
    unit, scale, digits = ("min", 60, 2) if minutes else ("h", 1, 3)
    print(f"\n### {label}\n")
    print("| configuration | training step, ms | sampling, ms per image evaluation | "
          + " | ".join(f"{run}, {unit} (gain of the lever)" for run in runs) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in runs) + " |")
    for name in figures:
        step_s, image_s = phases(name, figures)
        hours, base = project(step_s, image_s, settings), project(*phases(baseline(name), figures), settings)
        cells = []
        for run in runs:
            gain = (hours[run] - base[run]) / base[run]
            cells.append(f"{hours[run] * scale:.{digits}f}" + ("" if name == baseline(name) else f" ({gain:+.1%})"))
        against = "" if baseline(name) in ("every lever", name) else f", against {baseline(name)}"
        print(f"| {name}{against} | {step_s * 1e3:.1f} | {image_s * 1e3:.3f} | " + " | ".join(cells) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--amp", choices=("auto", "off", "both"), default="both",
                        help="auto: what main.py picks here; off: float32; both (default; once where they agree)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda where there is one)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (medians are reported)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed training steps per configuration and repetition (default 2; 10 on CUDA)")
    parser.add_argument("--evaluations", type=int, default=4, help="timed sampling evaluations per configuration "
                                                                   "and repetition")
    parser.add_argument("--dry", action="store_true", help="a tiny model, one repetition, on the CPU: does it run")
    args = parser.parse_args(argv)
    settings = DRY if args.dry else HOMEWORK
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else \
        torch.device(args.device)
    if args.dry:
        device, args.reps, args.steps, args.evaluations = torch.device("cpu"), 1, 1, 1
    steps = args.steps or (10 if device.type == "cuda" else 2)
    if not args.dry:
        fast.tune_process()  # as main.py does (a dry run in the tests' process leaves the process alone)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; CPU kernels {torch.backends.cpu.get_cpu_capability()}; "
          f"{fast.describe(fast.speed_up(Unet(8)), device)}")
    choices = {"auto": ["auto"], "off": ["off"], "both": ["auto", "off"]}[args.amp]
    dtypes = {}
    for choice in choices:  # each precision once
        dtypes.setdefault(amp_dtype(choice, device), choice)
    for dtype, choice in dtypes.items():
        label = {None: "float32", torch.bfloat16: "bf16 autocast"}[dtype] + f" (--amp {choice})"
        print(f"measuring {label} ...", file=sys.stderr, flush=True)
        for mode, figures in measure(device, dtype, args.reps, steps, args.evaluations, settings).items():
            report(f"{label}, {mode}" if mode else label, figures, settings, minutes=device.type == "cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main())
