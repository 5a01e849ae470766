"""A student's edit of unet.py is what runs: on a copy of the project with one definition of
unet.py changed, the default (fast) network computes the edited network, equal to --plain's,
and the start-up line says which levers the edit turned off."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from drills import project_copy  # noqa: E402  (the GPU check's drills edit copies of the project too)

PROBE = """
import copy, json, sys, torch

PROJECT = ("unet", "diffusion", "main", "trainer", "hw2")
for folder in sys.argv[1:]:  # each a copy of the project: its own unet.py, imported afresh (torch stays loaded)
    for name in [m for m in sys.modules if m.split(".")[0] in PROJECT]:
        del sys.modules[name]
    sys.path.insert(0, folder)
    import unet
    from hw2 import fast
    from hw2.config import Config

    torch.manual_seed(0)
    homework = unet.Unet(8, dim_mults=(1, 2))  # as unet.py now writes it: what --plain runs
    ours = fast.for_run(copy.deepcopy(homework), Config())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    training = (ours(x, t) - homework(x, t)).abs().max().item()
    with fast.sampling(ours):
        sampled = ours(x, t)
    with torch.inference_mode():
        reference = homework(x, t)
    print(json.dumps({"folder": folder, "training": training, "sampling": (sampled - reference).abs().max().item(),
                      "note": fast.edited_note(), "levers": sorted(ours.levers), "unet": unet.__file__,
                      "output": reference.flatten()[:64].tolist()}))
    sys.path.remove(folder)
"""

EDITS = {  # name: (the line of unet.py as shipped, the line edited, the levers the edit turns off)
    "Block.forward": ("x = x * (scale + 1) + shift", "x = x * scale + shift", ["modulation_in_norm"]),
    "LinearAttention": ("q = q * self.scale", "q = q * self.scale * 2",
                        ["attention_kernel", "base2_softmax", "folded_attention"]),
    "LayerNorm": ("return (x - mean) * (var + eps).rsqrt() * self.g", "return (x - mean) * (var + 10 * eps).rsqrt() * self.g",
                  ["attention_kernel", "fused_norms"]),  # the kernel computes the norms too
    "Unet.forward": ("return self.final_conv(x)", "return self.final_conv(x) * 0.5",
                     ["captured_sampling", "channels_last"]),
    "the time embedding": ("emb = math.log(10000) / (half_dim - 1)", "emb = math.log(1000) / (half_dim - 1)", []),
    # edits to __init__, not forward: a lever stands in for the whole definition
    "LinearAttention.__init__": ("self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)\n\n        self.to_out = nn.Seq",
                                 "self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=True)\n\n        self.to_out = nn.Seq",
                                 ["attention_kernel", "base2_softmax", "folded_attention"]),
    "Block.__init__": ("self.norm = nn.GroupNorm(groups, dim_out)", "self.norm = nn.GroupNorm(groups // 2, dim_out)",
                       ["modulation_in_norm"]),
}


def probe(*folders):
    """What the PROBE finds in each folder, in one process."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, folders)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads(line) for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    assert [s["folder"] for s in seen] == list(map(str, folders))
    assert [s["unet"] for s in seen] == [str(f / "unet.py") for f in folders]  # each copy's own unet.py ran
    return seen


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """{edit (None: as shipped): what the probe found}, every copy probed in one process."""
    folders = {None: project_copy(tmp_path_factory.mktemp("shipped"))}
    for edit, (old, new, _) in EDITS.items():
        folders[edit] = project_copy(tmp_path_factory.mktemp("edited"), old, new)
    return dict(zip(folders, probe(*folders.values())))


@pytest.mark.parametrize("edit", EDITS)
def test_the_default_network_computes_unet_py_as_edited(edit, probed):
    off = EDITS[edit][2]
    seen = probed[edit]
    assert seen["output"] != probed[None]["output"]  # the edit changes the network
    assert seen["training"] < 1e-5 and seen["sampling"] < 1e-4, seen  # and the default run computes it
    every = {"fused_norms", "folded_attention", "base2_softmax", "attention_kernel", "modulation_in_norm",
             "sub_pixel_upsample", "channels_last", "captured_sampling"}
    # captured sampling waits for --cuda_graph True wherever unet.py was edited (hw2/fast/step.py's capture_rule)
    assert seen["levers"] == sorted(every - set(off) - {"captured_sampling"})
    if off:
        assert seen["note"].startswith(f"note: unet.py's {edit.split('.')[0]} was edited: ")
        assert f"off ({', '.join(off)})" in seen["note"]
    else:  # no lever stands in for it: the fast network follows the edit with every lever on
        assert seen["note"] is None


def test_the_startup_line_says_which_levers_an_edit_turned_off(image_root, tmp_path):
    folder = project_copy(tmp_path / "project", *EDITS["Block.forward"][:2])
    args = ["main.py", "--data_path", str(image_root), "--save_folder", str(tmp_path / "run"), "--cache_dir",
            str(tmp_path / "cache"), "--image_size", "16", "--unet_dim", "8", "--unet_dim_mults", "1", "2",
            "--time_steps", "5", "--batch_size", "4", "--num_samples", "2", "--train_steps", "1", "--wandb", "disabled"]
    out = subprocess.run([sys.executable, *args], cwd=folder, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("  note: unet.py's Block was edited: its speed lever is off (modulation_in_norm); it runs as written"
            in out.stdout.splitlines())
    plain = subprocess.run([sys.executable, *args, "--plain", "--overwrite"], cwd=folder, capture_output=True,
                           text=True, timeout=300)
    assert plain.returncode == 0 and "was edited" not in plain.stdout  # --plain has no levers to turn off
