"""The effective receptive field on models whose field is known, and the area that holds a share of it."""

import pytest
import torch
from torch import nn

import spatial_mamba
from spatial_mamba.analysis import effective_receptive_field, erf_area_fractions


class OneConv(nn.Module):
    """A single 3x3 convolution with a timm-style ``forward_features`` (NCHW, or NHWC when asked)."""

    def __init__(self, output_fmt="NCHW"):
        super().__init__()
        self.output_fmt = output_fmt
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.bias.fill_(100.0)  # every output positive, so the ReLU of the central location passes all

    def forward_features(self, x):
        y = self.conv(x)
        return y.permute(0, 2, 3, 1) if self.output_fmt == "NHWC" else y


@pytest.mark.parametrize("size", [(9, 9), (10, 13)])
def test_a_single_3x3_convolution_has_the_3x3_field_of_its_summed_kernel(size):
    torch.manual_seed(0)
    model = OneConv()
    erf = effective_receptive_field(model, torch.randn(5, 3, *size), batch_size=2)
    # d(Σ_c out[c, h0, w0]) / d x[i, h0 + a - 1, w0 + b - 1] = Σ_c w[c, i, a, b], for every image.
    expected = torch.zeros(size, dtype=torch.float64)
    centre = (size[0] // 2, size[1] // 2)
    kernel = model.conv.weight.detach().double().sum(0).abs().sum(0)  # (3, 3)
    expected[centre[0] - 1 : centre[0] + 2, centre[1] - 1 : centre[1] + 2] = kernel
    torch.testing.assert_close(erf, expected)
    nhwc = OneConv("NHWC")
    nhwc.load_state_dict(model.state_dict())
    torch.testing.assert_close(effective_receptive_field(nhwc, torch.randn(3, 3, *size)), expected)


def test_a_map_ending_in_layernorm_has_a_field_and_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = spatial_mamba.SpatialMamba(dims=16, depths=(1, 1, 1, 1), num_classes=10, drop_path_rate=0.0).train()
    erf = effective_receptive_field(model, torch.randn(2, 3, 64, 64))
    assert erf.shape == (64, 64)
    # The channel sum of a freshly initialised LayerNorm's output is 0 for every input: the ReLU makes it a field.
    assert (erf > 0).float().mean() > 0.9
    assert model.training and all(p.grad is None for p in model.parameters())


def test_area_fractions_count_the_largest_pixels_first():
    erf = torch.zeros(2, 5)
    erf.view(-1)[torch.tensor([7, 2, 9, 4])] = torch.tensor([50.0, 30.0, 10.0, 10.0])
    assert erf_area_fractions(erf) == {0.2: 0.1, 0.3: 0.1, 0.5: 0.1, 0.99: 0.4}
    assert erf_area_fractions(erf, (0.6, 0.85, 1.0)) == {0.6: 0.2, 0.85: 0.3, 1.0: 0.4}
    assert erf_area_fractions(torch.ones(10, 10), (0.2, 0.505)) == {0.2: 0.2, 0.505: 0.51}


def test_area_fractions_reject_fields_without_a_positive_total_and_bad_fractions():
    with pytest.raises(ValueError, match="non-negative"):
        erf_area_fractions(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="non-negative"):
        erf_area_fractions(torch.tensor([[1.0, -0.5]]))
    with pytest.raises(ValueError, match=r"fractions must lie in \(0, 1\]; got \[0.5, 1.5\]"):
        erf_area_fractions(torch.ones(3, 3), (0.5, 1.5))
