"""What each speed lever of hw2/fast buys the homework's two CPU runs, measured on and off.

    python benchmarks/levers.py                 # default precision and float32, about 6 minutes on 2 cores
    python benchmarks/levers.py --amp off       # float32 only

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
from hw2.precision import amp_dtype, autocast  # noqa: E402
from hw2.step import TrainStep  # noqa: E402
from unet import Unet  # noqa: E402

SIZE, BATCH, ACCUMULATE, DIM, MULTS, T = 32, 32, 2, 16, (1, 2, 4, 8), 50
SAMPLING_ONLY = {"base2_softmax", "attention_kernel", "channels_last", "pass_size"}  # the default rule for channels_last
TRAINING_ONLY = {"fused_adam"}
STANDS_IN = {"base2_softmax": "attention_kernel"}  # runs only where the other does not
CUDA_ONLY = {"captured_sampling"}  # nothing to measure on a CPU: benchmarks/gpu_check.py measures it
RUNS = {"recommended run": (10_000, 11 * 64), "FID experiment": (1_000, 10 * 512 + 64)}  # (steps, images drawn)


def configurations():
    """name -> levers (None: the plain network)."""
    configs = {"every lever": fast.LEVERS, "plain network": None}
    for lever in (x for x in fast.LEVERS if x not in CUDA_ONLY):
        configs[f"without {lever}"] = tuple(x for x in fast.LEVERS if x not in (lever, STANDS_IN.get(lever)))
    for lever, other in STANDS_IN.items():
        configs[f"without {other}"] = tuple(x for x in fast.LEVERS if x != other)
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


def prepare(model, levers):
    """A fresh copy of the homework model `model` (its weights), made fast with `levers` (None: plain)."""
    copy = Unet(DIM, dim_mults=MULTS)
    copy.load_state_dict(model.state_dict())
    return copy if levers is None else fast.speed_up(copy, levers)


def train_seconds(diffusion, dtype, steps, fused):
    """Median seconds of `steps` training steps (hw2/step.py), after one to warm up."""
    model = diffusion.model
    step = TrainStep(diffusion, fast.make_adam(model, 1e-3, fused=fused), batch_size=BATCH, passes=ACCUMULATE,
                     amp_dtype=dtype)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        model.train()
        step.inputs.uniform_(-1, 1)
        step()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def sample_seconds_per_image(model, dtype, evaluations, sized):
    """Median seconds per image of one network evaluation in a sampling pass, after one to warm up."""
    n = fast.images_per_pass(model, "cpu", SIZE, dtype, sized=sized)
    model.eval()
    times = []
    with fast.sampling(model), autocast("cpu", dtype):
        x = torch.randn(n, 3, SIZE, SIZE)
        for i in range(evaluations + 1):
            t = torch.full((n,), T - 1 - i, dtype=torch.long)
            start = time.perf_counter()
            model(x, t)
            if i:
                times.append((time.perf_counter() - start) / n)
    return statistics.median(times)


def project(step_s, image_s):
    """{run: hours} from a training step's and an image evaluation's seconds."""
    return {run: (steps * step_s + images * T * image_s) / 3600 for run, (steps, images) in RUNS.items()}


def measure(dtype, reps, steps, evaluations):
    torch.manual_seed(0)
    homework = Unet(DIM, dim_mults=MULTS)
    configs = configurations()
    step, image = {name: [] for name in configs}, {name: [] for name in configs}
    for rep in range(reps):
        order = list(configs)
        random.Random(rep).shuffle(order)
        for name in order:
            diffusion = Diffusion(prepare(homework, configs[name]), image_size=SIZE, timesteps=T)
            run = set(configs[name] or ())  # the run levers are the run's settings, passed as such
            step[name].append(train_seconds(diffusion, dtype, steps, fused="fused_adam" in run))
            image[name].append(sample_seconds_per_image(diffusion.model, dtype, evaluations, sized="pass_size" in run))
        print(f"  repetition {rep + 1} of {reps} done", file=sys.stderr, flush=True)
    return {name: (statistics.median(step[name]), statistics.median(image[name])) for name in configs}


def report(label, figures):
    runs = list(RUNS)
    print(f"\n### {label}\n")
    print("| configuration | training step, s | sampling, ms per image evaluation | "
          + " | ".join(f"{run}, h (gain of the lever)" for run in runs) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in runs) + " |")
    for name in figures:
        step_s, image_s = phases(name, figures)
        hours, base = project(step_s, image_s), project(*phases(baseline(name), figures))
        cells = []
        for run in runs:
            gain = (hours[run] - base[run]) / base[run]
            cells.append(f"{hours[run]:.3f}" + ("" if name == baseline(name) else f" ({gain:+.1%})"))
        against = "" if baseline(name) in ("every lever", name) else f", against {baseline(name)}"
        print(f"| {name}{against} | {step_s:.3f} | {image_s * 1e3:.2f} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--amp", choices=("auto", "off", "both"), default="both",
                        help="auto: what main.py picks here; off: float32; both (default)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (medians are reported)")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per configuration and repetition")
    parser.add_argument("--evaluations", type=int, default=4, help="timed sampling evaluations per configuration "
                                                                   "and repetition")
    args = parser.parse_args()
    fast.tune_process()  # as main.py does
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {fast.describe(fast.speed_up(Unet(8)), 'cpu')}")
    choices = {"auto": ["auto"], "off": ["off"], "both": ["auto", "off"]}[args.amp]
    for choice in dict.fromkeys(choices):
        dtype = amp_dtype(choice, "cpu")
        label = {None: "float32", torch.bfloat16: "bf16 autocast"}[dtype] + f" (--amp {choice})"
        print(f"measuring {label} ...", file=sys.stderr, flush=True)
        report(label, measure(dtype, args.reps, args.steps, args.evaluations))


if __name__ == "__main__":
    main()
