"""The homework's U-Net: shapes, size, and that it listens to t."""
import pytest
import torch

from unet import Unet


def test_output_shape_and_parameter_count_at_the_homework_size():
    model = Unet(16)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(2.47e6, rel=0.01)
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([0, 49]))
    assert out.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("mults,size", [((1, 2), 16), ((1, 2, 4), 24), ((1, 2, 4, 8), 64)])
def test_other_levels_and_sizes(mults, size):
    model = Unet(8, dim_mults=mults, out_dim=6)
    assert model(torch.randn(1, 3, size, size), torch.tensor([3])).shape == (1, 6, size, size)


def test_time_conditions_the_output():
    torch.manual_seed(0)
    model = Unet(8, dim_mults=(1, 2)).eval()
    x = torch.randn(1, 3, 16, 16)
    assert not torch.allclose(model(x, torch.tensor([1])), model(x, torch.tensor([40])))
