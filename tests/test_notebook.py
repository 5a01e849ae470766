"""run_in_colab.ipynb executes end to end (tiny settings, generated data, stand-in Inception)."""
import json

import pytest
import torch

from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_notebook_runs_every_cell(image_root, tmp_path, standin_file):
    nb = nbformat.read(ROOT / "run_in_colab.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    assert "\nGPU_CHECK = False " in params[0].source  # the GPU check runs only when asked: minutes of a student's GPU
    out = tmp_path / "out"
    common = (f"--image_size 16 --batch_size 4 --unet_dim 8 --unet_dim_mults 1 2 --time_steps 5 --num_samples 4 "
              f"--fid_num_samples 6 --inception_path {standin_file} --wandb disabled")
    params[0].source = "\n".join([
        'REPO_URL = ""', "INSTALL = False", "USE_DRIVE = True", "GPU_CHECK = False", 'GPU_CHECK_ARGS = ""',
        "DOWNLOAD_AFHQ = False", 'AFHQ_ARCHIVE = ""', f"DATA = {json.dumps(str(image_root))}",
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
    assert "is finished: it reached step 3" in text  # "Run all" reached the recovery cell: nothing drawn again


def test_run_all_stops_at_the_first_failed_cell_with_one_message(image_root, tmp_path):
    """The FID experiment fails (no Inception weights where they are said to be): "Run all" stops
    at that cell with one message and no traceback; no later cell runs on what it did not make."""
    nb = nbformat.read(ROOT / "run_in_colab.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    common = (f"--image_size 16 --batch_size 4 --unet_dim 8 --unet_dim_mults 1 2 --time_steps 5 --num_samples 4 "
              f"--fid_num_samples 6 --inception_path {tmp_path / 'missing.pt'} --wandb disabled")
    params.source = "\n".join([
        'REPO_URL = ""', "INSTALL = False", "USE_DRIVE = False", "GPU_CHECK = False", 'GPU_CHECK_ARGS = ""',
        "DOWNLOAD_AFHQ = False", 'AFHQ_ARCHIVE = ""', f"DATA = {json.dumps(str(image_root))}", 'CLASS = "cat"',
        f"OUT = {json.dumps(str(tmp_path / 'out'))}", f"CACHE = {json.dumps(str(tmp_path / 'cache'))}",
        f"COMMON = {json.dumps(common)}", "QUICK_STEPS = 2", "FID_STEPS, FID_EVERY = 4, 2", "FULL_STEPS = 3",
    ])
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        client.execute()
    errors = [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert len(errors) == 1, errors
    failed, error = errors[0]
    assert "--fid" in nb.cells[failed].source and error.ename == "Stop"
    assert error.traceback == [f"Stopped here: {error.evalue}"]  # the message alone
    assert error.evalue.startswith("training failed (exit status 1); its own message above says why")
    later = [c for c in nb.cells[failed + 1:] if c.cell_type == "code"]
    assert later and all(not c.get("outputs") and c.get("execution_count") is None for c in later)


def cells(nb, *starts):
    """The code cells whose source starts with one of `starts`, in the notebook's order."""
    return [c for c in nb.cells if c.cell_type == "code" and c.source.lstrip().startswith(starts)]


def run_cells(nb, chosen, folder):
    """Execute the chosen cells in a fresh kernel started in folder; errors are kept as outputs."""
    sub = nbformat.v4.new_notebook(cells=chosen, metadata=nb.metadata)
    nbclient.NotebookClient(sub, timeout=600, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(folder)}}).execute()
    outputs = [o for c in sub.cells for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    return text, errors


def test_opened_alone_it_clones_the_project_and_a_recycled_vm_gets_its_data_back(tmp_path, monkeypatch):
    """As on Colab: the notebook alone in an empty folder. Without REPO_URL it says what to put
    there; with it (here a local clone address) it clones the project; on a VM recycled with the
    run folder kept (on Drive) and no data, the recovery cell unpacks AFHQ (here a small archive
    in AFHQ's layout) and continues the stopped run; after a runtime restart the first cell finds
    its clone again, and the recovery cell on the finished run changes nothing."""
    import zipfile

    import main
    from conftest import make_images
    from hw2.afhq import unpack
    from hw2.checkpoint import load_checkpoint

    source = make_images(tmp_path / "afhq" / "train" / "cat", 12)
    archive = tmp_path / "afhq.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(source.iterdir()):
            zf.write(f, f"afhq/train/cat/{f.name}")

    drive = tmp_path / "drive"  # what survives a recycle
    first_vm = tmp_path / "first_vm"
    unpack(archive, first_vm / "data", progress=False)
    monkeypatch.chdir(first_vm)  # as the notebook runs main.py: the data folder relative to the clone
    tiny = ["--image_size", "16", "--unet_dim", "8", "--unet_dim_mults", "1", "2", "--time_steps", "5",
            "--batch_size", "4", "--num_samples", "4", "--device", "cpu", "--wandb", "disabled"]
    assert main.main([*tiny, "--data_path", "./data/train", "--save_folder", str(drive / "full"), "--train_steps", "3",
                      "--cache_dir", str(tmp_path / "cache"), "--save_and_sample_every", "2"]) == 0
    ckpt = load_checkpoint(drive / "full" / "model-1.pt")  # as if the VM went at step 2 of 3
    torch.save(ckpt, drive / "full" / "model-latest.pt")

    nb = nbformat.read(ROOT / "run_in_colab.ipynb", as_version=4)
    settings = nbformat.v4.new_code_cell("\n".join([
        "INSTALL = False", "USE_DRIVE = True", "GPU_CHECK = False", 'GPU_CHECK_ARGS = ""', "DOWNLOAD_AFHQ = True",
        f"AFHQ_ARCHIVE = {json.dumps(str(archive))}", 'DATA = "./data/train"', 'CLASS = "cat"',
        f"OUT = {json.dumps(str(drive))}", f"CACHE = {json.dumps(str(tmp_path / 'cache'))}",
    ]))
    opening = cells(nb, "import os")
    recovery = [c for c in cells(nb, "get_afhq()") if "--load_path {OUT}/full" in c.source]
    assert len(opening) == 1 and len(recovery) == 1

    vm = tmp_path / "vm"
    vm.mkdir()
    text, errors = run_cells(nb, [nbformat.v4.new_code_cell('REPO_URL = ""'), settings, *opening], vm)
    assert len(errors) == 1 and errors[0].startswith("Stop: This notebook needs the project's files: set "
                                                     "REPO_URL in the settings cell"), errors
    assert "To exit" not in text  # IPython's warning for SystemExit
    assert not (vm / "ddpm").exists()

    with_url = nbformat.v4.new_code_cell(f"REPO_URL = {json.dumps(str(ROOT))}")
    text, errors = run_cells(nb, [with_url, settings, *opening, *recovery], vm)
    assert errors == [] and f"project folder: {vm / 'ddpm'}" in text, (errors, text[-2000:])
    assert len(list((vm / "ddpm" / "data" / "train" / "cat").glob("*.jpg"))) == 12  # unpacked from the archive
    assert "training completed: step 3 of 3" in text and load_checkpoint(drive / "full" / "model-latest.pt")["step"] == 3

    text, errors = run_cells(nb, [with_url, settings, *opening, *recovery], vm)  # a runtime restart, then again
    assert errors == [] and f"project folder: {vm / 'ddpm'}" in text and "fatal" not in text
    assert "is finished: it reached step 3 of --train_steps 3; nothing was changed" in text
