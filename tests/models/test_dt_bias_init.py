"""``dt_bias_init``: the initial dt_projs_bias, shared by the model, the benchmarks and the kernel tests."""

import math

import pytest
import torch
import torch.nn.functional as F

from spatial_mamba.models.ssm import dt_bias_init


def _dt(bias: torch.Tensor) -> torch.Tensor:
    return F.softplus(bias.double())


def test_softplus_of_the_bias_is_log_uniform_in_the_range():
    n, dt_min, dt_max = 4096, 1e-3, 0.1
    dt = _dt(dt_bias_init(n, dt_min, dt_max, generator=torch.Generator().manual_seed(0)))
    # float32 bias: softplus(bias) recovers dt to a few float32 ulps.
    assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
    # log dt is uniform: Kolmogorov-Smirnov distance to U[log dt_min, log dt_max] below its 0.1 % critical value
    # (1.95 / sqrt(n)); a uniform dt (mean 0.05) would put 90 % of the values above 0.01 instead of 50 %.
    u = ((dt.log() - math.log(dt_min)) / (math.log(dt_max) - math.log(dt_min))).sort().values
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (u - grid).abs().max() < 1.95 / math.sqrt(n)
    assert (dt > 0.01).double().mean() == pytest.approx(0.5, abs=0.05)


def test_dt_is_raised_to_the_floor():
    # dt log-uniform in [1e-5, 1e-3] with floor 1e-4: half the draws fall below the floor and are raised to it.
    dt = _dt(dt_bias_init(2048, 1e-5, 1e-3, dt_init_floor=1e-4, generator=torch.Generator().manual_seed(1)))
    assert dt.min() == pytest.approx(1e-4, rel=1e-5)
    at_floor = (dt < 1e-4 * (1 + 1e-5)).double().mean()
    assert at_floor == pytest.approx(0.5, abs=0.05)


def test_the_draw_follows_the_generator_or_the_global_seed():
    torch.manual_seed(7)
    from_global = dt_bias_init(16)
    assert torch.equal(from_global, dt_bias_init(16, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(from_global, dt_bias_init(16, generator=torch.Generator().manual_seed(8)))
    assert from_global.dtype == torch.float32 and from_global.shape == (16,)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d_inner": 0}, "d_inner must be a positive integer, got 0"),
        ({"d_inner": 4, "dt_min": 0.0}, "0 < dt_min <= dt_max, got dt_min=0.0"),
        ({"d_inner": 4, "dt_min": 0.2, "dt_max": 0.1}, "dt_min=0.2, dt_max=0.1"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dt_bias_init(**kwargs)
