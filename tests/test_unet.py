"""The homework's U-Net: the starter's own numbers, exact sizes, shapes, and that it listens to t."""
import pytest
import torch

from conftest import golden_cases, needs_golden
from unet import Unet

# Parameter counts of the starter's U-Net, as its own code reports them (golden.pt).
HOMEWORK_PARAMETERS = {(16, (1, 2, 4, 8)): 2_465_827, (8, (1, 2, 4)): 214_099}


@needs_golden
@pytest.mark.parametrize("grad", [False, True])
def test_the_starters_weights_give_the_starters_outputs(grad):
    """unet.py as it stands (tests/test_fast.py holds the fast model to the same numbers)."""
    cases = golden_cases()
    assert len(cases) == 2
    for case in cases:
        model = Unet(dim=case["dim"], dim_mults=tuple(case["dim_mults"]))
        model.load_state_dict(case["state_dict"], strict=True)
        model.eval()
        assert sum(p.numel() for p in model.parameters()) == case["num_parameters"]
        with torch.set_grad_enabled(grad):
            y = model(case["x"], case["t"])
        assert (y - case["y"]).abs().max() < 1e-5, (case["dim"], (y - case["y"]).abs().max())


@pytest.mark.parametrize("dim,mults", list(HOMEWORK_PARAMETERS))
def test_parameter_count_is_exactly_the_starters(dim, mults):
    model = Unet(dim, dim_mults=mults)
    assert sum(p.numel() for p in model.parameters()) == HOMEWORK_PARAMETERS[dim, mults]
    assert model(torch.randn(2, 3, 16, 16), torch.tensor([0, 49])).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("mults,size", [((1, 2), 16), ((1, 2, 4), 24), ((1, 2, 4, 8), 64)])
def test_other_levels_and_sizes(mults, size):
    model = Unet(8, dim_mults=mults, out_dim=6)
    assert model(torch.randn(1, 3, size, size), torch.tensor([3])).shape == (1, 6, size, size)


def test_time_conditions_the_output():
    torch.manual_seed(0)
    model = Unet(8, dim_mults=(1, 2)).eval()
    x = torch.randn(1, 3, 16, 16)
    assert not torch.allclose(model(x, torch.tensor([1])), model(x, torch.tensor([40])))
