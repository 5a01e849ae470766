"""run_in_colab.ipynb executes end to end (tiny settings, generated data, stand-in Inception)."""
import json

import pytest

from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_notebook_runs_every_cell(image_root, tmp_path, standin_file):
    nb = nbformat.read(ROOT / "run_in_colab.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    out = tmp_path / "out"
    common = (f"--image_size 16 --batch_size 4 --unet_dim 8 --unet_dim_mults 1 2 --time_steps 5 --num_samples 4 "
              f"--fid_num_samples 6 --inception_path {standin_file} --wandb disabled")
    params[0].source = "\n".join([
        'REPO_URL = ""', "INSTALL = False", "USE_DRIVE = True", "GPU_CHECK = False", 'GPU_CHECK_ARGS = ""',
        "DOWNLOAD_AFHQ = False", f"DATA = {json.dumps(str(image_root))}",
        'CLASS = "cat"', f"OUT = {json.dumps(str(out))}", f"CACHE = {json.dumps(str(tmp_path / 'cache'))}",
        f"COMMON = {json.dumps(common)}",
        "QUICK_STEPS = 2", "FID_STEPS, FID_EVERY = 4, 2", "FULL_STEPS = 3",
    ])
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    for path in ("quick/sample-final.png", "fid/fid.png", "fid/loss.png", "fid/forward_diffusion.png",
                 "fid/backward_diffusion.png", "full/sample-final.png", "full/model-latest.pt"):
        assert (out / path).is_file(), path
    assert len(list((out / "full").glob("samples-step3-seed*/*.png"))) == 64
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 8  # one grid, two figures in each later experiment, the sampled grid
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "not on Colab: the runs stay in" in text  # the Drive cell ran, and knew where it was
