"""Checkpoint files: written whole (hw2.files), read without running any pickled code,
and checked against the U-Net before anything is loaded into it.

A checkpoint of this project is a dict of tensors and plain values:
    format (FORMAT), step, model (the U-Net's state_dict), optimizer, scaler, ema (when on),
    data (the Batches state), rng (every process's CPU and device generator states), elapsed,
    config.
Two other layouts load too, weights and step only: the homework starter's own
{"step", "model"}, whose "model" is the whole Diffusion's state_dict (U-Net keys prefixed
"model.", maybe beside schedule buffers of the student's), and a bare U-Net state_dict.
"""
import pickle
import pickletools
from pathlib import Path

import torch

from hw2.errors import UserError, shorten
from hw2.files import torch_bytes, write_atomic
from hw2.runfolder import RunFolder

# The layout and meaning of this project's checkpoints. Checkpoints without the key
# (format 1) hold a U-Net that was not the homework's (GroupNorm around attention);
# their weights compute another function and cannot be converted.
FORMAT = 2
MAX_LISTED = 4  # keys named in an error before "and N more"


def checkpoint_bytes(state):
    """The bytes of a checkpoint file for state (a dict from Trainer.state_dict)."""
    return torch_bytes({"format": FORMAT, **state})


def save_checkpoint(data, *paths):
    """Write checkpoint bytes to each path, atomically (model-{m}.pt, then model-latest.pt)."""
    for path in paths:
        write_atomic(path, data)


def readable_sibling(path):
    """For the message about an unreadable checkpoint: the newest numbered checkpoint beside it
    that loads, and how to resume from it ('' when there is none)."""
    for _, other in reversed(RunFolder(Path(path).parent).numbered_checkpoints()):
        try:
            torch.load(other, map_location="cpu", weights_only=True)
        except Exception:  # as unreadable as the first: try an older one
            continue
        return f". {other.name} in the same folder loads: python main.py --load_path {other}"
    return ""


def load_checkpoint(path):
    """Read a checkpoint onto the CPU with weights_only=True (no code from the file runs),
    in this project's layout: a bare U-Net state_dict comes back as {"model": it}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch's unpickler raises on a file that is not a checkpoint
        if carries_code(path, e):
            raise UserError(
                f"refusing to load {path}: it holds objects other than tensors and plain values "
                f"({shorten(e) or type(e).__name__}); only load checkpoints you trust"
            ) from None
        raise UserError(f"checkpoint {path} is unreadable or truncated, or not a checkpoint ({type(e).__name__}: "
                        f"{shorten(e)}){readable_sibling(path)}") from None
    if isinstance(ckpt, dict) and ckpt and "model" not in ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        ckpt = {"model": ckpt}  # a bare state_dict
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path} is not a checkpoint of this trainer or of the homework's (no 'model' weights)")
    version = ckpt.get("format", 1 if "config" in ckpt else None)
    if version is not None and version < FORMAT:
        raise UserError(
            f"{path} was written by an earlier version of this project (checkpoint format {version}), whose "
            f"U-Net normalised attention with GroupNorm instead of the homework's LayerNorm; its weights compute "
            f"another function and cannot be converted faithfully. Train a new model"
        )
    if version is not None and version > FORMAT:
        raise UserError(f"{path} has checkpoint format {version}, newer than this version reads ({FORMAT}): update")
    return ckpt


def carries_code(path, error):
    """Whether torch's weights-only load refused `path` (raising `error`) because it is a whole
    pickle of objects that would run code when loaded, rather than a file that is cut short or
    not a pickle at all. The pickle is read opcode by opcode (pickletools), never run."""
    if "unsupported global" in str(error).lower():  # the weights-only unpickler named a class or function
        return True  # ("Unsupported global: GLOBAL ...", or "unsupported GLOBAL ... whose module ... is blocked")
    if not isinstance(error, pickle.UnpicklingError):
        return False
    code = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}
    try:
        with open(path, "rb") as f:
            names = [op.name for op, _, _ in pickletools.genops(f)]
    except Exception:  # noqa: BLE001 - not a whole pickle
        return False
    return bool(code.intersection(names))


def is_homework_checkpoint(ckpt):
    """True for the starter's layout or a bare state_dict: weights and perhaps a step, nothing else."""
    return "format" not in ckpt


def unet_weights(model_state):
    """(the U-Net's state_dict, [names of other tensors]) from a checkpoint's "model" entry.
    The starter saved the whole Diffusion: U-Net keys start with 'model.', and whatever
    else a student registered there (schedule buffers) is not a U-Net weight. The schedule
    is always rebuilt from the config, never read from a file."""
    if any(k.startswith("model.") for k in model_state):
        unet = {k[len("model."):]: v for k, v in model_state.items() if k.startswith("model.")}
        return unet, sorted(k for k in model_state if not k.startswith("model."))
    return dict(model_state), []


def load_unet_weights(model, ckpt, path):
    """Load the checkpoint's U-Net weights into model (strictly); returns the names of the
    tensors that were not U-Net weights. A mismatch raises a UserError naming what differs."""
    state, ignored = unet_weights(ckpt["model"])
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise UserError(mismatch_message(path, model, state, missing, unexpected, shapes))
    model.load_state_dict(state)
    return ignored


def unet_shape(state):
    """(dim, dim_mults) of the U-Net whose state_dict this is, or None if it is not one of ours."""
    try:
        dim = state["final_conv.weight"].shape[1]
        levels = 0
        while f"downs.{levels}.0.block1.proj.weight" in state:
            levels += 1
        if not levels:
            return None
        # each level ends in a conv to the next level's width: dim * mult
        mults = tuple(state[f"downs.{i}.3.weight"].shape[0] // dim for i in range(levels))
        return dim, mults
    except (KeyError, AttributeError, IndexError):
        return None


def _listed(names):
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def mismatch_message(path, model, state, missing, unexpected, shapes):
    """What differs between a checkpoint's weights and model, blaming flags only when the
    weights' shapes show a U-Net of another size."""
    theirs = unet_shape(state)
    ours = unet_shape(model.state_dict())
    if theirs is not None and theirs != ours:
        flags = lambda d, m: f"--unet_dim {d} --unet_dim_mults {' '.join(map(str, m))}"  # noqa: E731
        return (f"{path} holds a U-Net of another size: it was trained with {flags(*theirs)}, this run builds "
                f"{flags(*ours)}; pass the checkpoint's values")
    parts = []
    if missing:
        parts.append(f"{len(missing)} weight(s) missing ({_listed(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_listed(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape ("
                     + _listed([f"{k}: {a} in the file, {b} here" for k, a, b in shapes]) + ")")
    return f"{path} does not hold this U-Net's weights: " + "; ".join(parts)


def load_optimizer_state(opt, saved):
    """Load a checkpoint's optimizer state into opt, keeping opt's settings. A checkpoint holds
    values (Adam's step and moments) and settings (lr, capturable, fused, foreach ...): the
    values are the training's, the settings this run's, as it built them for its device and
    flags (a capturable, fused Adam where its step is captured). torch's own load would put
    the saved settings back."""
    ours = opt.state_dict()["param_groups"]
    groups = [{**mine, "params": theirs["params"]} for mine, theirs in zip(ours, saved["param_groups"], strict=True)]
    opt.load_state_dict({**saved, "param_groups": groups})


def device_generator(device):
    """(get, set) of the random generator of `device` the training draws from, beside the CPU's; None for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return (lambda: torch.cuda.get_rng_state(device)), (lambda state: torch.cuda.set_rng_state(state, device))
    if device.type == "mps":
        return torch.mps.get_rng_state, torch.mps.set_rng_state
    return None


def capture_rng(device, procs):
    """The random states the training draws from (t, noise, weight init), of every process, in
    rank order: {"processes": [{"torch": CPU generator, DEVICE TYPE: that device's}, ...]}. Each
    process gives the generator of the device it trains on; a collective under torchrun."""
    mine = {"torch": torch.get_rng_state()}
    generator = device_generator(device)
    if generator:
        mine[torch.device(device).type] = generator[0]().cpu()
    gathered = {k: procs.gather(v.unsqueeze(0)).cpu() for k, v in mine.items()}
    return {"processes": [{k: v[rank].clone() for k, v in gathered.items()} for rank in range(procs.world)]}


def states_before_processes(rng, device, procs):
    """[the main process's states] from a checkpoint written before every process kept its own:
    its CPU state, and the CUDA state of this device from its list by device index."""
    if "torch" not in rng:
        return []
    state = {"torch": rng["torch"]}
    index = (device.index or 0) if procs.world == 1 else 0
    cuda = rng.get("cuda") or []
    if index < len(cuda):
        state["cuda"] = cuda[index]
    return [state]


def restore_rng(rng, device, procs):
    """Set this process's generators from a checkpoint's "rng" (capture_rng's, or the main
    process's alone, as checkpoints before it held them). Returns a note for the start-up when
    the checkpoint's process count is not this run's, else None: then every process continues
    process 0's streams (the processes draw alike: every one draws the whole global batch's t
    and noise and keeps its slice), which keeps them together."""
    device = torch.device(device)
    states = rng["processes"] if "processes" in rng else states_before_processes(rng, device, procs)
    if not states:
        return None
    note = None
    if len(states) == procs.world:
        mine = states[procs.rank]
    else:
        mine = states[0]
        note = (f"note: the checkpoint holds the random states of {len(states)} process(es), this run has "
                f"{procs.world}: every process continues process 0's")
    torch.set_rng_state(mine["torch"])
    generator = device_generator(device)
    if generator and device.type in mine:
        generator[1](mine[device.type])
    return note
