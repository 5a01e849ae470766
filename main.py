"""Train a DDPM on AFHQ (or any folder of images), or visualize a trained one.

    python main.py --data_path ./data/train --data_class cat --save_folder ./results
    python main.py --visualize --load_path ./results/model-latest.pt

Every field of hw2.config.Config is a flag of the same name; `--help` lists them.
"""
import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

import torch

from diffusion import Diffusion
from hw2.config import Config
from hw2 import distributed
from hw2.data import split_heldout, training_data
from hw2.distributed import Processes
from hw2.errors import Interrupted, UserError
from hw2.fid import build_fid
from hw2.precision import amp_dtype
from hw2.runlog import RunLog
from hw2.visualize import visualize
from trainer import Trainer
from unet import Unet


def str2bool(value):
    """--fid, --fid True and --fid False all work (the homework writes the last)."""
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train a denoising diffusion model (DDPM) on a folder of images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    """Flags -> a checked Config; invalid values exit with status 2 and a one-line message."""
    parser = build_parser()
    config = Config(**vars(parser.parse_args(argv)))
    try:
        config.check()
    except ValueError as e:
        parser.error(str(e))
    return config


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


def use_fast_float32(device):
    """On CUDA, let float32 matrix products and convolutions use TF32 tensor cores (Ampere
    and newer); autocast covers most of the model, this covers what stays in float32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def build_diffusion(config, device):
    model = Unet(dim=config.unet_dim, dim_mults=config.unet_dim_mults)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Diffusion(model, image_size=config.image_size, timesteps=config.time_steps,
                     sampling_timesteps=config.sampling_timesteps).to(device)


def check_writable(folder):
    """Fail now, not at the first milestone, when the save folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --save_folder {folder} ({e.strerror or e}); choose another folder") from None


def run(config, procs=Processes(), procs_device=None):
    """procs, procs_device: from hw2.distributed.start (one GPU per process under torchrun)."""
    device = procs_device or pick_device(config.device)
    use_fast_float32(device)
    dtype = amp_dtype(config.amp, device)
    if procs.main:
        print("config:")
        for name, value in config.to_dict().items():
            print(f"  {name}: {value}")
        precision = "float32" if dtype is None else str(dtype).replace("torch.", "") + " autocast"
        processes = f", {procs.world} processes" if procs.distributed else ""
        print(f"  (running on {device}, {precision}{processes})")
        check_writable(Path(config.save_folder))
    torch.manual_seed(config.seed)  # the same on every process: same weights, data order and draws
    if procs.main:
        files, images = training_data(config)
    procs.barrier()  # the others then read the decoded images from rank 0's cache
    if not procs.main:
        files, images = training_data(config, progress=False)
    images, heldout = split_heldout(images, config.heldout_images, config.seed)
    if config.visualize and not procs.main:
        return
    diffusion = build_diffusion(config, device)
    # FID's network and real-image statistics are readied before the first step, so a
    # missing weights file stops the run now rather than at the first milestone.
    fid = build_fid(config, files, device) if config.fid and not config.visualize and procs.main else None
    logger = RunLog(config, config.wandb) if procs.main else None
    try:
        alone = Processes() if config.visualize else procs  # rank 0 draws the figures by itself
        trainer = Trainer(diffusion, config, images, logger=logger, fid=fid, amp_dtype=dtype, processes=alone,
                          heldout=heldout)
        if config.load_path:
            trainer.load(config.load_path)
            if procs.main:
                print(f"loaded {config.load_path} (step {trainer.step})")
        if config.visualize:
            visualize(trainer, logger)
        else:
            trainer.fit()
    finally:
        if logger:
            logger.finish()


def main(argv=None):
    config = parse_config(argv)
    procs = Processes()
    try:
        procs, procs_device = distributed.start(config.device)
        run(config, procs, procs_device)
    except UserError as e:
        report(procs, f"error: {e}")
        return 1
    except Interrupted as e:
        message, status = e.args
        report(procs, message)
        return status
    except OSError as e:  # a disk or permission problem outside the places that explain themselves
        where = f" {e.filename}" if e.filename else ""
        report(procs, f"error: could not read or write{where}: {e.strerror or e}")
        return 1
    except KeyboardInterrupt:
        report(procs, "\ninterrupted before a checkpoint could be saved")
        return 130
    finally:
        distributed.stop()
    return 0


def report(procs, message):
    """Rank 0 prints what went wrong; another process prints it too, marked with its rank,
    since the failure may be its alone (every process exits with the status)."""
    prefix = "" if procs.main else f"[rank {procs.rank}] "
    print(prefix + message.lstrip("\n"), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
