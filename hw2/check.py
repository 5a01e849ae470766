"""A quick check after an edit to unet.py or diffusion.py: does the model still train and sample?

    python -m hw2.check          # about 10 s on a 2-core CPU; no data, no GPU, nothing written

It builds the model main.py trains (the homework's U-Net, 16 px images, T = 50, as main.py
makes it, edits and all) and checks, one line each, stopping at the first that fails:
- the U-Net: images (B, 3, S, S) and steps t (B,) give a noise prediction of the images' shape;
- q_sample: x_t has x_0's shape, is finite, and is x_0 at t = 0 up to the schedule's first step;
- training: STEPS optimizer steps on a few fixed images, as main.py takes them (hw2/step.py):
  every loss finite, and the last steps' mean below the first steps';
- sampling: a few images over the whole reverse chain, as a milestone draws them: the right
  shape, finite, in [0, 1].
Exit status 0 when all pass, 1 otherwise. The full test suite (python -m pytest -q) checks
far more, against the starter's own outputs; this one tells in seconds whether an edit broke
the basics, and where.
"""
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from hw2.errors import student_line

SIZE, BATCH, T, STEPS, SAMPLES = 16, 8, 50, 40, 4
WINDOW = 10  # steps averaged at the start and at the end of training
# Beside a training run (a student's other terminal) the check must neither stall nor be stalled
# (benchmarks/side_by_side.py): its operators are small, so one thread runs them about as fast as
# several and never waits on the run's spinning threads; and run as a script it takes a lower
# priority, so that the run keeps most of the CPU. THREADS None: torch's default; NICENESS 0: as started.
THREADS = 1
NICENESS = 4


class Failed(Exception):
    pass


def synthetic_images(n, side, seed=0):
    """n smooth RGB images (n, 3, side, side) uint8: gradients and a disc, quick to learn (also
    benchmarks/gpu_check.py's)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    c = torch.rand(n, 3, 3, generator=g)
    disc = (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.1).float()
    img = c[..., 0, None, None] * xx + c[..., 1, None, None] * yy + c[..., 2, None, None] * disc
    img = img / img.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return (img * 255).round().to(torch.uint8)


def model_images(n, side, seed=0):
    """synthetic_images as the model takes them: float in [-1, 1]."""
    from hw2.data import Batches

    return Batches.to_model(synthetic_images(n, side, seed), "cpu")


def where(error):
    """' at unet.py:57' for the deepest line of unet.py or diffusion.py in error's traceback, or ''."""
    return student_line(traceback.extract_tb(error.__traceback__))


def check_unet(diffusion):
    x, t = torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(0, T, (BATCH,))
    with torch.no_grad():
        out = diffusion.model(x, t)
    if tuple(out.shape) != tuple(x.shape):
        raise Failed(f"the U-Net gave {tuple(out.shape)} for images {tuple(x.shape)}; the noise prediction must "
                     f"have the images' shape")
    if not torch.isfinite(out).all():
        raise Failed("the U-Net's output is not finite (NaN or inf)")
    return f"images {tuple(x.shape)} and t {tuple(t.shape)} -> {tuple(out.shape)}"


def check_q_sample(diffusion):
    x_0 = model_images(BATCH, SIZE)
    x_t = diffusion.q_sample(x_0, torch.full((BATCH,), T - 1), noise=torch.randn_like(x_0))
    if tuple(x_t.shape) != tuple(x_0.shape) or not torch.isfinite(x_t).all():
        raise Failed(f"q_sample gave {tuple(x_t.shape)} (finite: {bool(torch.isfinite(x_t).all())}) for x_0 "
                     f"{tuple(x_0.shape)}")
    first = diffusion.q_sample(x_0, torch.zeros(BATCH, dtype=torch.long), noise=torch.zeros_like(x_0))
    scale = math.sqrt(float(diffusion.alphas_cumprod[0]))
    if not torch.allclose(first, scale * x_0, atol=1e-5):
        raise Failed(f"q_sample at t = 0 with zero noise is not sqrt(alpha_bar_0) x_0 = {scale:.4f} x_0")
    return "x_t has x_0's shape, and t = 0 without noise gives sqrt(alpha_bar_0) x_0"


def check_training(diffusion):
    from hw2 import fast
    from hw2.step import TrainStep

    opt = fast.make_adam(diffusion.model, 1e-3)
    step = TrainStep(diffusion, opt, batch_size=BATCH, passes=1)
    images = model_images(BATCH, SIZE, seed=1)
    losses = []
    diffusion.model.train()
    for k in range(STEPS):
        step.inputs[0].copy_(images)
        loss = step().item()
        if not math.isfinite(loss):
            raise Failed(f"the loss became {loss} at step {k + 1}")
        losses.append(loss)
    first, last = sum(losses[:WINDOW]) / WINDOW, sum(losses[-WINDOW:]) / WINDOW
    if not last < first:
        raise Failed(f"the loss did not fall over {STEPS} steps: {first:.4f} at first, {last:.4f} at the end")
    return f"{STEPS} steps, the loss fell from {first:.4f} to {last:.4f}"


def check_sampling(diffusion):
    from hw2.sampling import generate

    images = generate(diffusion, SAMPLES, seed=0)
    if tuple(images.shape) != (SAMPLES, 3, SIZE, SIZE):
        raise Failed(f"sampling gave {tuple(images.shape)}, not {(SAMPLES, 3, SIZE, SIZE)}")
    if not torch.isfinite(images).all():
        raise Failed("the sampled images are not finite (NaN or inf)")
    if images.min() < 0 or images.max() > 1:
        raise Failed(f"the sampled images span [{images.min():.3f}, {images.max():.3f}], not [0, 1]")
    return f"{SAMPLES} images over {diffusion.num_timesteps} steps, finite, in [0, 1]"


CHECKS = {"the U-Net": check_unet, "q_sample": check_q_sample, "training": check_training,
          "sampling": check_sampling}


def main():
    started = time.perf_counter()
    threads = torch.get_num_threads()
    if THREADS:
        torch.set_num_threads(THREADS)
    try:
        return run_checks(started)
    finally:
        torch.set_num_threads(threads)


def run_checks(started):
    from hw2 import fast
    from hw2.config import Config
    from main import build_diffusion

    torch.manual_seed(0)
    config = Config(image_size=SIZE, time_steps=T, unet_dim_mults=(1, 2, 4, 8), device="cpu")
    try:
        diffusion = build_diffusion(config, torch.device("cpu"))
    except Exception as e:  # noqa: BLE001 - a student's edit may raise anything: say what and where
        print(f"FAILED building the model{where(e)}: {type(e).__name__}: {e}")
        return 1
    note = fast.edited_note()
    if note:
        print(note)
    for name, check in CHECKS.items():
        try:
            said = check(diffusion)
        except Failed as e:
            print(f"FAILED {name}: {e}")
            return 1
        except Exception as e:  # noqa: BLE001
            print(f"FAILED {name}{where(e)}: {type(e).__name__}: {e}")
            return 1
        print(f"ok {name}: {said}")
    print(f"all checks passed in {time.perf_counter() - started:.0f} s ({how_it_ran()}; the full suite: "
          f"python -m pytest -q)")
    return 0


def how_it_ran():
    """The threads and the priority the check ran with, as torch and the system report them."""
    threads = torch.get_num_threads()
    words = [f"{threads} thread{'s' if threads > 1 else ''}"]
    if hasattr(os, "getpriority"):
        words.append(f"niceness {os.getpriority(os.PRIO_PROCESS, 0)}")
    return ", ".join(words)


def yield_to_other_work():
    """A lower priority for this process (the check as a script), where the system has one."""
    if NICENESS and hasattr(os, "nice"):
        try:
            os.nice(NICENESS)
        except OSError:
            pass


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    yield_to_other_work()
    sys.exit(main())
