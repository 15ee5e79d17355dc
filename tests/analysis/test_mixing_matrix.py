"""The mixing matrix of a token mixer against the mixer's own output and against a step-by-step scan."""

import pytest
import torch

import spatial_mamba
from spatial_mamba.analysis import capture_mixer, mixing_matrix, scan_inputs, summarise_mixing_matrix
from spatial_mamba.models.ssm import StructureAwareSSM

NARROW = dict(dims=16, depths=(1, 1, 1, 1), num_classes=10, drop_path_rate=0.0)
IMAGE_SIZE = (64, 96)  # stage maps 16x24, 8x12, 4x6, 2x3: never square, so a swapped H and W shows


def _model(**kwargs):
    """A narrow model whose fusion kernels, alpha, A and D are random: the initial all-ones kernels are symmetric and
    would hide a mirrored tap offset."""
    torch.manual_seed(0)
    model = spatial_mamba.SpatialMamba(**{**NARROW, **kwargs}).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, StructureAwareSSM):
                for parameter in module.state_fusion.parameters():
                    parameter.normal_()
                module.A_logs.normal_(0, 0.5)
                module.Ds.normal_()
    return model


def _capture(model, stage):
    return capture_mixer(model, torch.randn(1, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(1)), stage, 0)


def _tokens(y):
    """(1, H, W, D) -> (D, L) in raster order, float64."""
    return y[0].permute(2, 0, 1).flatten(1).double()


@pytest.mark.parametrize("stage, grid", [(0, (16, 24)), (2, (4, 6))])
def test_matrix_times_u_is_the_mixers_output_before_out_norm(stage, grid):
    capture = _capture(_model(), stage)
    M = mixing_matrix(capture.mixer, capture.x)
    length = grid[0] * grid[1]
    assert M.shape == (capture.mixer.d_inner, length, length) and M.dtype == torch.float64
    y = _tokens(capture.y)
    predicted = torch.einsum("cts,cs->ct", M, scan_inputs(capture.mixer, capture.x).u)
    # The model runs in float32; measured max |difference| / max |y| is 1e-7 to 3e-7, a wrong tap or decay is O(1).
    assert (predicted - y).abs().max() <= 1e-5 * y.abs().max()


def test_mamba_matrix_is_lower_triangular_and_is_the_step_by_step_scan():
    capture = _capture(_model(), 2)
    mamba = mixing_matrix(capture.mixer, capture.x, fusion=False)
    fused = mixing_matrix(capture.mixer, capture.x, fusion=True)
    assert torch.equal(torch.triu(mamba, 1), torch.zeros_like(mamba))
    assert torch.triu(fused, 1).abs().amax(dim=(1, 2)).min() > 0  # every channel reads tokens after t
    # y_t = C_t x_t + D u_t with x_t = exp(Δ_t A) x_{t-1} + Δ_t B_t u_t, one position at a time.
    inputs = scan_inputs(capture.mixer, capture.x)
    state, outputs = torch.zeros_like(inputs.u[:, 0]), []
    for t in range(inputs.u.shape[1]):
        state = (
            torch.exp(inputs.delta[:, t] * inputs.A[:, 0]) * state
            + inputs.delta[:, t] * inputs.B[0, t] * inputs.u[:, t]
        )
        outputs.append(inputs.C[0, t] * state + inputs.D * inputs.u[:, t])
    expected = torch.stack(outputs, dim=1)
    torch.testing.assert_close(torch.einsum("cts,cs->ct", mamba, inputs.u), expected, rtol=1e-12, atol=1e-14)


def test_matrix_with_two_states_per_channel_matches_the_mixer():
    capture = _capture(_model(d_state=2), 1)
    assert capture.mixer.d_state == 2
    y = _tokens(capture.y)
    predicted = summarise_mixing_matrix(capture.mixer, capture.x).output
    assert (predicted - y).abs().max() <= 1e-5 * y.abs().max()


def test_channel_subsets_and_the_chunked_summary_agree_with_the_full_matrix():
    capture = _capture(_model(), 2)
    M = mixing_matrix(capture.mixer, capture.x)
    torch.testing.assert_close(mixing_matrix(capture.mixer, capture.x, channels=[5, 0, 77]), M[[5, 0, 77]])
    summary = summarise_mixing_matrix(capture.mixer, capture.x, chunk=50)  # 128 channels: chunks of 50, 50, 28
    torch.testing.assert_close(summary.mean_abs, M.abs().mean(0))
    torch.testing.assert_close(summary.output, torch.einsum("cts,cs->ct", M, scan_inputs(capture.mixer, capture.x).u))


def test_bad_arguments_name_the_value_and_what_was_expected():
    model = _model()
    capture = _capture(model, 3)
    with pytest.raises(ValueError, match=r"one image, \(1, H, W, C=128\); got \(2, 2, 3, 128\)"):
        mixing_matrix(capture.mixer, capture.x.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match=r"channels must lie in \[0, 256\).*\[256\]"):
        mixing_matrix(capture.mixer, capture.x, channels=[256])
    with pytest.raises(TypeError, match="StructureAwareSSM"):
        mixing_matrix(model.layers[0].blocks[0], capture.x)
    with pytest.raises(ValueError, match=r"stage must be in \[0, 4\), got 4"):
        capture_mixer(model, torch.randn(1, 3, 32, 32), 4, 0)
    with pytest.raises(ValueError, match=r"stage 1 has blocks \[0, 1\); got block 1"):
        capture_mixer(model, torch.randn(1, 3, 32, 32), 1, 1)
