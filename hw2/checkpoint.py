"""Checkpoint files: written atomically, read without running any pickled code.

A checkpoint is a dict of tensors and plain values:
    step, model (the U-Net's state_dict), optimizer, data (Batches state),
    rng (torch CPU and CUDA states), config (Config.to_dict()).
The homework's own checkpoints ({"step", "model"}, with the Diffusion's
state_dict under "model") load too.
"""
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from hw2.errors import UserError


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename it into place,
    so a crash at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path):
    """Read a checkpoint onto the CPU with weights_only=True (no code from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"refusing to load {path}: it holds objects other than tensors and plain values "
            f"({first[:200]}); only load checkpoints you trust, made by this trainer"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is unreadable or truncated ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this trainer (no 'model' entry)")
    return ckpt


def unet_state(model_state):
    """The U-Net's weights from a checkpoint's "model" entry. The homework saved the
    whole Diffusion module (keys 'model.*' plus schedule buffers); ours is the U-Net alone.
    The schedule is always rebuilt from the config, never read from a file."""
    if any(k.startswith("model.") for k in model_state):
        return {k[len("model."):]: v for k, v in model_state.items() if k.startswith("model.")}
    return model_state


def numpy_state_to_tensor():
    """numpy's global MT19937 state as tensors and ints (weights_only files hold no arrays)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def numpy_state_from_tensor(state):
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["cached"]))
