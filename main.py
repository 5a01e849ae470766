"""Train a DDPM on AFHQ (or any folder of images); visualize or sample a trained one.

    python main.py --data_path ./data/train --data_class cat --save_folder ./results
    python main.py --load_path ./results                 # resume (a checkpoint or a run folder)
    python main.py --load_path ./results --visualize     # the forward/backward diffusion figures
    python main.py --load_path ./results --sample 100    # 100 images into a folder of their own

Every field of hw2.config.Config is a flag of the same name; `--help` lists them. With
--load_path, the checkpoint's stored settings are the defaults and the flags given win.
"""
import argparse
import copy
import dataclasses
import difflib
import os
import sys
import tempfile
import typing
from pathlib import Path

import torch

from diffusion import Diffusion
from hw2 import distributed, fast
from hw2.checkpoint import load_checkpoint, load_unet_weights, unet_shape, unet_weights
from hw2.config import MODEL_FIELDS, NOT_INHERITED, Config
from hw2.data import find_images, split_heldout, training_data
from hw2.distributed import Processes
from hw2.errors import Interrupted, UserError
from hw2.files import write_atomic
from hw2.images import save_grid, save_images
from hw2.precision import amp_dtype, describe_precision
from hw2.runfolder import RunFolder, resolve_checkpoint
from hw2.runlog import RunLog, read_metrics
from hw2.sampling import generate
from hw2.visualize import visualize
from trainer import Trainer, missing_outputs
from unet import Unet


def str2bool(value):
    """--fid, --fid True and --fid False all work (the homework writes the last)."""
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


class Parser(argparse.ArgumentParser):
    """Flags are matched whole (no prefixes), and a mistake is one line, not the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")

    def parse_args(self, args=None, namespace=None):
        args, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flags = [f"--{f.name}" for f in dataclasses.fields(Config)]
            first = unknown[0].split("=")[0]
            close = [f for f in flags if f.startswith(first)] or difflib.get_close_matches(first, flags, n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close[:3])}?" if close and first.startswith("--") else ""
            self.error(f"unknown flag {first}{hint}" if first.startswith("-") else f"unexpected argument {first}")
        return args


def build_parser():
    parser = Parser(description="Train a denoising diffusion model (DDPM) on a folder of images.",
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        kind, help = hints[f.name], f.metadata["help"]
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=str2bool, nargs="?", const=True, default=f.default,
                                metavar="BOOL", help=help)
        elif kind is tuple:
            parser.add_argument(f"--{f.name}", type=int, nargs="+", default=f.default, metavar="INT", help=help)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help)
    return parser


def parse_config(argv=None):
    """Flags -> (a checked Config, the names of the flags given). Invalid values exit with
    status 2 and a one-line message."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    config = Config(**vars(parser.parse_args(argv)))
    given = {f.name for f in dataclasses.fields(Config) if f"--{f.name}" in (arg.split("=")[0] for arg in argv)}
    try:
        config.check()
    except ValueError as e:
        parser.error(str(e))
    return config, given


def settle_config(config, given, ckpt, path):
    """The run's settings when resuming, visualizing or sampling: the checkpoint's stored
    config, overridden by every flag given; (config, names of the fields taken from the file).
    The homework's checkpoints store no config: their U-Net's size is read off the weights."""
    stored = ckpt.get("config")
    if stored is None:
        shape = unet_shape(unet_weights(ckpt["model"])[0])
        stored = dict(zip(("unet_dim", "unet_dim_mults"), shape)) if shape else {}
    theirs = Config.from_dict({**config.to_dict(), **stored})
    clash = [f"--{n} {getattr(config, n)} here but {getattr(theirs, n)} in the checkpoint"
             for n in MODEL_FIELDS if n in given and n in stored and getattr(config, n) != getattr(theirs, n)]
    if clash:
        raise UserError(f"{path} was trained with a different model: {', '.join(clash)}")
    taken = {n: getattr(theirs, n) for n in stored if n not in given and n not in NOT_INHERITED and hasattr(config, n)}
    if "save_folder" not in given:
        taken["save_folder"] = str(Path(path).parent)  # the run folder the file is in, wherever it moved
    settled = dataclasses.replace(config, **taken)
    try:
        settled.check()
    except ValueError as e:
        raise UserError(f"with the settings of {path}: {e}") from None
    return settled, list(taken)


def pick_device(name):
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps was asked for, but MPS is not available here; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def build_unet(config):
    """The homework's U-Net, made fast (hw2.fast) unless --plain."""
    return fast.for_run(Unet(dim=config.unet_dim, dim_mults=config.unet_dim_mults), config)


def build_diffusion(config, device):
    model = build_unet(config)
    return Diffusion(model, image_size=config.image_size, timesteps=config.time_steps,
                     sampling_timesteps=config.sampling_timesteps).to(device)


def check_writable(folder):
    """Fail now, not at the first milestone, when the save folder cannot be made or written;
    nothing is created here."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot write to --save_folder {folder}: {existing} is a file; choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to --save_folder {folder} (no permission in {existing}); choose another folder")
    try:  # permissions are not all: /proc, a read-only mount. A folder made and removed at once says
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as e:
        raise UserError(f"cannot write to --save_folder {folder} ({e.strerror or e} in {existing}); "
                        f"choose another folder") from None


def print_config(config, taken, source, device, dtype, procs, model):
    if not procs.main:
        return
    taken = taken or []
    print("config:" + (f" (marked *: from {source})" if taken else ""))
    for name, value in config.to_dict().items():
        print(f"  {name}: {value}" + ("  *" if name in taken else ""))
    processes = f", {procs.world} processes" if procs.distributed else ""
    training = not (config.visualize or config.sample)
    step = fast.describe_step(device, dtype, procs, config) if training else None
    processes += f", {step}" if step else ""
    details = (f"; sampling {fast.images_per_pass(model, device, config.image_size, dtype)} images per pass; "
               f"{fast.describe(model, device)}") if config.verbose else ""
    print(f"  (running on {device}, {describe_precision(config.amp, device, dtype)}{processes}{details})")
    note = None if config.plain else fast.edited_note()
    if note:
        print(f"  {note}")


def run(config, given=(), procs=None, procs_device=None):
    """Check every input, then create, then train, visualize or sample. procs, procs_device:
    from hw2.distributed.start (one GPU per process under torchrun)."""
    procs = procs or Processes()
    ckpt = taken = path = None
    if config.load_path:
        path = resolve_checkpoint(config.load_path)
        ckpt = load_checkpoint(path)
        config, taken = settle_config(config, given, ckpt, path)
    device = procs_device or pick_device(config.device)
    dtype = amp_dtype(config.amp, device)
    training = not (config.visualize or config.sample)
    if (config.visualize or config.sample) and not procs.main:
        return None  # rank 0 draws by itself
    step = int(ckpt.get("step", 0)) if ckpt else 0
    if training and ckpt and step >= config.train_steps and not missing_outputs(
            RunFolder(config.save_folder), config, step, read_metrics(config.save_folder)):  # else: make it first
        if procs.main:
            print(finished(config, ckpt, path))
        return None  # nothing to train: nothing is drawn, written or logged

    # check: nothing is written until every input is known to be good, the data first
    files = find_images(config.data_path, config.data_class) if training or config.visualize or config.fid else None
    folder = RunFolder(config.save_folder)
    check_writable(folder.path)
    fresh = training and not ckpt and procs.main
    if fresh and not config.overwrite:
        folder.check_free()
    torch.manual_seed(config.seed)  # the same on every process: same weights, data order and draws
    diffusion = build_diffusion(config, device)
    if ckpt:
        ignored = load_unet_weights(diffusion.model, ckpt, path)
        if ignored and procs.main:
            print(f"note: ignored {len(ignored)} tensor(s) of the checkpoint's Diffusion that are not U-Net weights "
                  f"({', '.join(ignored[:3])}{' ...' if len(ignored) > 3 else ''}); the schedule comes from --time_steps")
        if procs.main:
            print(f"loaded {path} (step {int(ckpt.get('step', 0))})")
    fid = None
    if config.fid and procs.main and not config.visualize:
        from hw2.fid import build_fid  # clean-fid's imports cost a second; only FID runs pay it

        fid = build_fid(config, files, device)

    if config.sample:
        print_config(config, taken, path, device, dtype, procs, diffusion.model)
        return sample(diffusion, ckpt, path, config, dtype, fid, grid_from_file="num_samples" in (taken or []))
    world = procs.world if training else 1
    if procs.main:  # decoded once and cached, and counted: too few for a batch is refused here
        files, images = training_data(config, need=config.batch_size * world if training else 1, files=files)
    procs.barrier()  # the others then read the decoded images from rank 0's cache
    if not procs.main:
        files, images = training_data(config, progress=False, files=files)
    images, heldout = split_heldout(images, config.heldout_images, config.seed)

    # create: every input is good, so the settings come now, and any error before came first
    print_config(config, taken, path, device, dtype, procs, diffusion.model)
    if fresh and config.overwrite:
        folder.clear()
    if fid:
        fid.prepare()
    logger = RunLog(config, config.wandb) if procs.main else None
    try:
        if config.visualize:
            return visualize(diffusion, sampling_weights(diffusion, ckpt, path), images, config, dtype, logger)
        trainer = Trainer(diffusion, config, images, logger=logger, fid=fid, amp_dtype=dtype, processes=procs,
                          heldout=heldout)
        if ckpt:
            trainer.load(ckpt, path)
        trainer.fit()
        if procs.main:
            print(summary(trainer))
        return trainer
    finally:
        if logger:
            logger.finish()


def finished(config, ckpt, path):
    """What a resume of a run that already reached --train_steps says instead of training."""
    step = int(ckpt.get("step", 0))
    return (f"{path} is finished: it reached step {step} of --train_steps {config.train_steps}; nothing was changed. "
            f"To train it as long again: python main.py --load_path {config.save_folder} --train_steps {2 * step} "
            f"(any number above {step}); to draw images from it: --sample N")


def sampling_weights(diffusion, ckpt, path):
    """The diffusion that draws images: with the checkpoint's EMA weights when it has them."""
    if not ckpt.get("ema"):
        return diffusion
    ema = copy.deepcopy(diffusion.model)  # the same network, fast or plain
    load_unet_weights(ema, {"model": ckpt["ema"]}, path)
    return diffusion.with_model(ema)


def sample(diffusion, ckpt, path, config, dtype, fid, grid_from_file=False):
    """--sample N: N images from the checkpoint into a folder of their own, plus a grid of the
    first --num_samples (the checkpoint's unless given: grid_from_file), and their FID against
    the training images with --fid."""
    step = int(ckpt.get("step", 0))
    images_folder, grid_path = RunFolder(config.save_folder).on_demand(step, config.seed)
    sampler = sampling_weights(diffusion, ckpt, path)
    logger = RunLog(config, config.wandb)
    try:
        images = generate(sampler, config.sample, config.seed, dtype, progress=True)
        save_images(images, images_folder)
        save_grid(images[: config.num_samples], grid_path)
        logger.log_images("samples", images[: config.num_samples], step)
        whose = f" (--num_samples {config.num_samples}, the run's; --num_samples N for another)" if grid_from_file \
            and config.num_samples < config.sample else ""
        lines = [f"wrote {config.sample} images to {images_folder}/ and a grid of "
                 f"{min(config.num_samples, config.sample)} to {grid_path}{whose}"]
        if fid:
            fid.prepare()
            score = fid(images_folder)
            write_atomic(images_folder / "fid.txt", f"{score}\n")
            logger.log_summary({"fid": score, "fid_num_samples": config.sample})
            lines.append(f"FID of these {config.sample} images against the training images: {score:.3f} "
                         f"(also in {images_folder / 'fid.txt'})")
        lines += [f"  {line}" for line in fast.capture_paths(None, sampler.model).splitlines()]
        print("\n".join(lines))
    finally:
        logger.finish()


def summary(trainer):
    """The lines printed when training ends: what was done and where it is."""
    folder = trainer.folder
    numbers = [f"final loss {trainer.last_loss:.4f}"] if trainer.last_loss is not None else []
    if trainer.last_fid is not None:
        numbers.append(f"FID {trainer.last_fid:.3f}")
    made = [p.name for p in (folder.path / "sample-final.png", folder.path / "loss.png", folder.path / "fid.png",
                             folder.metrics) if p.exists()]
    lines = [
        f"training completed: step {trainer.step} of {trainer.config.train_steps}"
        + (f", {', '.join(numbers)}" if numbers else ""),
        f"  in {folder.path}: {folder.latest.name} (continue with: python main.py --load_path {folder.path} "
        f"--train_steps N), {', '.join(made)}",
    ]
    lines += [f"  {line}" for line in fast.capture_paths(trainer.one_step, trainer.sampler.model).splitlines()]
    return "\n".join(lines)


def main(argv=None, tune_process=False):
    """The command line. tune_process: this call started the process (python main.py), so the
    process-wide speed settings are its to make (hw2.fast.tune_process), unless --plain."""
    config, given = parse_config(argv)
    if tune_process:
        fast.tune_process()
    procs, finished = Processes(), False
    try:
        procs, procs_device = distributed.start(config.device)
        run(config, given, procs, procs_device)
        finished = True
    except UserError as e:
        report(procs, f"error: {e}")
        return 1
    except Interrupted as e:
        message, status = e.args
        report(procs, message)
        return status
    except fast.CaptureBroke as e:  # sampling for --sample or --visualize (a training run says more: trainer.py)
        report(procs, f"error: {e}; nothing was lost. Run the same command again with --cuda_graph False")
        return 1
    except OSError as e:  # a disk or permission problem outside the places that explain themselves
        where = f" {e.filename}" if e.filename else ""
        report(procs, f"error: could not read or write{where}: {e.strerror or e}")
        return 1
    except KeyboardInterrupt:
        report(procs, "\ninterrupted before training started; nothing was saved")
        return 130
    finally:
        distributed.stop(finished)
    return 0


def report(procs, message):
    """Rank 0 prints what went wrong; another process prints it too, marked with its rank,
    since the failure may be its alone (every process exits with the status)."""
    prefix = "" if procs.main else f"[rank {procs.rank}] "
    print(prefix + message.lstrip("\n"), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(tune_process=True))
