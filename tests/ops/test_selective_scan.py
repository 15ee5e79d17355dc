"""The pure-PyTorch selective scan (spatial_mamba/ops/selective_scan.py) against a sequential float64 loop.

Ground truth: ``sequential_scan`` (tests/kernels/parity.py, shared with the kernel tests), the recurrence of the
paper's Eq. 2-3 written as a plain loop over t in float64 with a hand-written adjoint (checked by gradcheck here).
Tolerances, on |actual - expected| <= atol + rtol * |expected| elementwise,
with atol a multiple of max|expected| (gradients are sums whose small entries carry the error of the large ones):
- float64 inputs: the reference also computes in float64; rtol 1e-9, atol 1e-11 * max (measured <= 1.5e-15 * max);
- float32/float16/bfloat16 inputs: it computes in float32, so atol 2e-5 * max for hs and every gradient; gradients
  are returned in the input dtype, which adds one rounding: rtol 1e-5 (float32), 2**-10 (float16), 2**-7 (bfloat16).
  Measured: <= 3e-7 * max for float32 inputs; 2e-4 and 3e-3 * max for the float16 and bfloat16 gradients.
"""

import pytest
import torch

from spatial_mamba.ops import backend, selective_scan_fn
from spatial_mamba.ops.selective_scan import selective_scan_ref
from tests.kernels.parity import SequentialRecurrence, sequential_scan

FLOAT64_RTOL, FLOAT64_ATOL_OF_MAX = 1e-9, 1e-11
FLOAT32_ATOL_OF_MAX = 2e-5
ROUNDING = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
GRAD_NAMES = ("u", "delta", "A", "B", "delta_bias")


def make_inputs(batch, channels, states, length, dtype, delta_softplus, with_bias, seed=0):
    """Inputs in the model's ranges (``classification/models/spatialmamba.py``): Δ mostly in [1e-3, 0.1], A < 0."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, length, generator=gen, dtype=torch.float64)
    A = -torch.empty(channels, states, dtype=torch.float64).uniform_(0.5, 4.0, generator=gen)
    B = torch.randn(batch, states, length, generator=gen, dtype=torch.float64)
    if delta_softplus:
        delta = torch.randn(batch, channels, length, generator=gen, dtype=torch.float64) - 3.0
    else:
        delta = torch.empty(batch, channels, length, dtype=torch.float64).uniform_(0.001, 0.1, generator=gen)
    bias = torch.empty(channels, dtype=torch.float64).uniform_(-1.0, 0.0, generator=gen) if with_bias else None
    if not delta_softplus and with_bias:
        bias = bias.abs() * 0.05  # keeps Δ positive, as softplus would
    low = dict(u=u.to(dtype), delta=delta.to(dtype), B=B.to(dtype))
    params_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = dict(low, A=A.to(params_dtype), delta_bias=None if bias is None else bias.to(params_dtype))
    return {k: (v.requires_grad_() if v is not None else None) for k, v in inputs.items()}


def run(fn, inputs, delta_softplus, dhs):
    """hs and the gradients w.r.t. every input that has one."""
    hs = fn(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["delta_bias"], delta_softplus)
    leaves = [inputs[name] for name in GRAD_NAMES if inputs[name] is not None]
    grads = torch.autograd.grad(hs, leaves, dhs.to(hs.dtype))
    return hs, dict(zip([n for n in GRAD_NAMES if inputs[n] is not None], grads))


def reference(u, delta, A, B, delta_bias, delta_softplus):
    return selective_scan_fn(u, delta, A, B, delta_bias=delta_bias, delta_softplus=delta_softplus)


def assert_close(actual, expected, rtol, atol_of_max, name):
    atol = atol_of_max * expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def check_against_sequential(batch, channels, states, length, dtype, delta_softplus, with_bias, seed=0):
    inputs = make_inputs(batch, channels, states, length, dtype, delta_softplus, with_bias, seed)
    dhs = torch.randn(batch, channels, states, length, generator=torch.Generator().manual_seed(seed + 1))
    hs, grads = run(reference, inputs, delta_softplus, dhs)
    # The loop gets the same (rounded) values, in float64.
    exact = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    hs_exact, grads_exact = run(sequential_scan, exact, delta_softplus, dhs.double())
    if dtype == torch.float64:
        rtol, atol_of_max = FLOAT64_RTOL, FLOAT64_ATOL_OF_MAX
    else:
        rtol, atol_of_max = ROUNDING[dtype], FLOAT32_ATOL_OF_MAX
    assert hs.shape == (batch, channels, states, length)
    assert hs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(hs, hs_exact, rtol, atol_of_max, "hs")
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert_close(grad, grads_exact[name], rtol, atol_of_max, f"d{name}")


@pytest.mark.parametrize("length", [1, 2, 7, 64, 199, 200])
@pytest.mark.parametrize("states", [1, 2])
@pytest.mark.parametrize("delta_softplus, with_bias", [(True, True), (True, False), (False, True), (False, False)])
def test_reference_matches_sequential_loop_in_float64(length, states, delta_softplus, with_bias):
    # 199 is prime: no chunk length divides it, so the row is padded to whole chunks.
    check_against_sequential(2, 3, states, length, torch.float64, delta_softplus, with_bias)


def test_reference_matches_sequential_loop_on_a_long_row():
    # A 1333x800 detection image gives 334 x 200 tokens at stride 4; the longest row a detection run scans.
    check_against_sequential(1, 2, 1, 66_600, torch.float64, True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("states", [1, 2])
def test_low_precision_inputs_match_float64_of_the_same_values(dtype, states):
    check_against_sequential(2, 4, states, 300, dtype, True, True)


def test_extreme_deltas_match_sequential_loop_without_nan():
    # Raw deltas far beyond the model's range: Δ = 0 (softplus underflows), both sides of the softplus threshold 20,
    # and Δ = 1e4, where exp(Δ A) underflows to 0 and the state restarts from Δ B u.
    gen = torch.Generator().manual_seed(3)
    inputs = make_inputs(2, 4, 1, 300, torch.float32, True, True, seed=3)
    values = torch.tensor([-1e4, -60.0, -20.0, 0.0, 19.9, 20.1, 60.0, 1e4])
    picks = torch.randint(0, len(values), inputs["delta"].shape, generator=gen)
    inputs["delta"] = values[picks].requires_grad_()
    dhs = torch.randn(2, 4, 1, 300, generator=gen)
    hs, grads = run(reference, inputs, True, dhs)
    exact = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    hs_exact, grads_exact = run(sequential_scan, exact, True, dhs.double())
    for name, actual, expected in [("hs", hs, hs_exact)] + [(f"d{k}", grads[k], grads_exact[k]) for k in grads]:
        assert torch.isfinite(actual).all(), name
        assert_close(actual, expected, ROUNDING[torch.float32], FLOAT32_ATOL_OF_MAX, name)


@pytest.mark.parametrize("A_value, delta_value", [(-1.0, 5.0), (-1e-4, -4.0), (-4.0, 1e4)])
def test_long_float32_row_stays_finite_and_close_to_float64(A_value, delta_value):
    # Slow decays (A = -1e-4) accumulate 66,600 inputs; fast ones (A Δ = -4e4) underflow at every step.
    length = 66_600
    inputs = make_inputs(2, 3, 1, length, torch.float32, True, True, seed=4)
    with torch.no_grad():
        inputs["A"].fill_(A_value)
        inputs["delta"].fill_(delta_value)
    dhs = torch.randn(2, 3, 1, length, generator=torch.Generator().manual_seed(5))
    hs, grads = run(reference, inputs, True, dhs)
    exact = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    hs_exact, grads_exact = run(sequential_scan, exact, True, dhs.double())
    for name, actual, expected in [("hs", hs, hs_exact)] + [(f"d{k}", grads[k], grads_exact[k]) for k in grads]:
        assert torch.isfinite(actual).all(), name
        # Sums over 66,600 positions in float32: 1e-4 of the largest entry.
        assert_close(actual, expected, 1e-4, 1e-4, name)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 4e-16), (torch.float32, 5e-7)])
def test_softplus_follows_the_official_rule(dtype, rtol):
    # With L = 1, B = u = 1 and A = 0 the scan returns Δ itself. Official: log1p(exp(v)) for v <= 20, v above; the
    # two differ by ~2e-9 near 20, which float64 resolves. rtol: a few ulp (the CPU path avoids torch.log1p).
    raw = torch.cat([torch.linspace(-80.0, 19.99, 2001, dtype=torch.float64), torch.tensor([20.0, 20.1, 60.0, 1e4])])
    if dtype == torch.float32:
        raw = raw[raw > -87]  # exp underflows below: the official softplus is 0 there as well
    channels = raw.numel()
    hs = selective_scan_fn(
        torch.ones(1, channels, 1, dtype=dtype), raw.to(dtype)[None, :, None], torch.zeros(channels, 1, dtype=dtype),
        torch.ones(1, 1, 1, dtype=dtype), delta_softplus=True,
    )  # fmt: skip
    raw = raw.to(dtype).double()
    expected = torch.where(raw <= 20, torch.log1p(torch.exp(raw.clamp(max=20))), raw)
    torch.testing.assert_close(hs.flatten().double(), expected, rtol=rtol, atol=0)


def test_sequential_recurrence_backward_passes_gradcheck():
    gen = torch.Generator().manual_seed(7)
    a = torch.rand(2, 3, 6, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(SequentialRecurrence.apply, (a, b))


def test_backward_passes_gradcheck():
    inputs = make_inputs(1, 2, 2, 5, torch.float64, True, True, seed=6)
    args = (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["delta_bias"], True)
    assert torch.autograd.gradcheck(selective_scan_ref, args)


def test_return_last_state_is_the_final_hidden_state():
    inputs = make_inputs(2, 3, 2, 50, torch.float32, True, True)
    hs, last = selective_scan_fn(
        inputs["u"], inputs["delta"], inputs["A"], inputs["B"], delta_bias=inputs["delta_bias"],
        delta_softplus=True, return_last_state=True,
    )  # fmt: skip
    assert last.shape == (2, 3, 2)
    torch.testing.assert_close(last, hs[..., -1], rtol=0, atol=0)


def test_grouped_B_with_one_group_matches_the_loop():
    inputs = make_inputs(2, 3, 2, 40, torch.float32, True, True)
    B4 = inputs["B"].detach().unsqueeze(1).requires_grad_()
    hs4 = reference(inputs["u"], inputs["delta"], inputs["A"], B4, inputs["delta_bias"], True)
    exact = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    hs_exact = sequential_scan(exact["u"], exact["delta"], exact["A"], exact["B"], exact["delta_bias"], True)
    assert_close(hs4, hs_exact, ROUNDING[torch.float32], FLOAT32_ATOL_OF_MAX, "hs")
    hs4.sum().backward()
    hs_exact.sum().backward()
    assert B4.grad.shape == (2, 1, 2, 40)
    assert_close(B4.grad.squeeze(1), exact["B"].grad, ROUNDING[torch.float32], FLOAT32_ATOL_OF_MAX, "dB")


def test_non_contiguous_inputs_and_broadcast_gradient_match_the_loop():
    inputs = make_inputs(2, 3, 1, 30, torch.float32, True, True)
    transposed = {k: inputs[k].detach().transpose(0, -1).contiguous().transpose(0, -1) for k in ("u", "delta", "B")}
    assert not transposed["u"].is_contiguous()
    u = transposed["u"].requires_grad_()
    hs = reference(u, transposed["delta"], inputs["A"], transposed["B"], inputs["delta_bias"], True)
    exact = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    expected = sequential_scan(exact["u"], exact["delta"], exact["A"], exact["B"], exact["delta_bias"], True)
    assert_close(hs, expected, ROUNDING[torch.float32], FLOAT32_ATOL_OF_MAX, "hs")
    # hs.sum() hands the backward an expanded (stride 0) gradient.
    (du,) = torch.autograd.grad(hs.sum(), u)
    (du_exact,) = torch.autograd.grad(expected.sum(), exact["u"])
    assert_close(du, du_exact, ROUNDING[torch.float32], FLOAT32_ATOL_OF_MAX, "du")


@pytest.mark.parametrize("delta_softplus, with_bias", [(False, False), (True, True)])
def test_inputs_are_not_modified(delta_softplus, with_bias):
    inputs = make_inputs(2, 3, 1, 20, torch.float32, delta_softplus, with_bias)
    before = {k: v.detach().clone() for k, v in inputs.items() if v is not None}
    hs = reference(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["delta_bias"], delta_softplus)
    hs.backward(torch.randn_like(hs))
    for name, value in before.items():
        torch.testing.assert_close(inputs[name].detach(), value, rtol=0, atol=0, msg=name)


def test_backward_under_autocast_matches_float32_backward():
    inputs = make_inputs(2, 3, 1, 40, torch.float32, True, True)
    hs = reference(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["delta_bias"], True)
    dhs = torch.randn_like(hs)
    expected = torch.autograd.grad(hs, [inputs["A"], inputs["B"]], dhs, retain_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad(hs, [inputs["A"], inputs["B"]], dhs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["D", "z"])
def test_rejects_D_and_z(name):
    inputs = make_inputs(1, 2, 1, 5, torch.float32, True, True)
    extra = {name: torch.ones(2) if name == "D" else torch.ones(1, 2, 5)}
    match = "applies D outside the scan" if name == "D" else "no z gate"
    with pytest.raises(ValueError, match=match):
        selective_scan_fn(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], **extra)


def _base():
    return dict(u=torch.zeros(2, 3, 5), delta=torch.zeros(2, 3, 5), A=-torch.ones(3, 1), B=torch.zeros(2, 1, 5))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(u=torch.zeros(3, 5), delta=torch.zeros(3, 5)), r"u must be \(batch, channels, length\)"),
        (dict(u=torch.zeros(2, 3, 0), delta=torch.zeros(2, 3, 0), B=torch.zeros(2, 1, 0)), "length 0"),
        (dict(delta=torch.zeros(2, 3, 4)), "delta must have u's shape"),
        (dict(A=-torch.ones(4, 1)), r"A must be \(channels=3, d_state\)"),
        (dict(A=-torch.ones(3)), r"A must be \(channels=3, d_state\)"),
        (dict(B=torch.zeros(2, 2, 1, 5)), "one group"),
        (dict(B=torch.zeros(2, 2, 5)), r"B must be \(batch=2, d_state=1, length=5\)"),
        (dict(B=torch.zeros(1, 1, 5)), r"B must be \(batch=2, d_state=1, length=5\)"),
        (dict(delta_bias=torch.zeros(4)), r"delta_bias must be \(channels=3,\)"),
    ],
)
def test_rejects_bad_shapes(change, match):
    with pytest.raises(ValueError, match=match):
        selective_scan_fn(**{**_base(), **change})


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(u=torch.zeros(2, 3, 5, dtype=torch.int64)), "u must be float32, float16, bfloat16, float64; got int64"),
        (dict(delta=torch.zeros(2, 3, 5, dtype=torch.float16)), "delta must have u's dtype"),
        (dict(B=torch.zeros(2, 1, 5, dtype=torch.bfloat16)), "B must have u's dtype"),
        (dict(A=-torch.ones(3, 1, dtype=torch.float16)), "A must be float32, float64; got float16"),
        (dict(delta_bias=torch.zeros(3, dtype=torch.bfloat16)), "delta_bias must be float32, float64; got bfloat16"),
    ],
)
def test_rejects_bad_dtypes(change, match):
    with pytest.raises(TypeError, match=match):
        selective_scan_fn(**{**_base(), **change})


def test_rejects_inputs_on_different_devices():
    with pytest.raises(ValueError, match="one device"):
        selective_scan_fn(**{**_base(), "A": -torch.ones(3, 1, device="meta")})


def test_forced_reference_backend_runs_the_reference():
    inputs = make_inputs(2, 3, 1, 20, torch.float32, True, True)
    args = (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["delta_bias"], True)
    with backend.force("reference"):
        assert backend.select("selective_scan", *args[:5]) is selective_scan_ref
        hs = reference(*args)
    exact = sequential_scan(*(t.detach().double() for t in args[:5]), True)
    assert_close(hs, exact, ROUNDING[torch.float32], FLOAT32_ATOL_OF_MAX, "hs")


def test_forced_cuda_backend_on_cpu_tensors_raises(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match=f"{backend.ENV_VAR}=cuda was asked for, but selective_scan cannot run"):
        selective_scan_fn(**_base())
    monkeypatch.delenv(backend.ENV_VAR)
    with backend.force("cuda"), pytest.raises(RuntimeError, match=r"backend.force\(.cuda.\) was asked for"):
        selective_scan_fn(**_base())


def test_float64_inputs_are_refused_by_other_backends(monkeypatch):
    monkeypatch.setattr(backend, "select", lambda op, *tensors: lambda *args: pytest.fail("kernel was called"))
    inputs = {**_base(), "A": -torch.ones(3, 1, dtype=torch.float64)}
    with pytest.raises(TypeError, match="float64 inputs run on the reference backend only"):
        selective_scan_fn(**inputs)


@pytest.mark.parametrize("length", [199, 200])
def test_hidden_states_are_contiguous(length):
    # The model views hs (B, D, 1, h * w) as (B, D, h, w); 199 needs a padded last chunk, 200 does not.
    inputs = make_inputs(1, 2, 1, length, torch.float32, True, True)
    hs = reference(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["delta_bias"], True)
    assert hs.is_contiguous()
