"""The Triton selective scan (spatial_mamba/ops/triton_scan.py) against the pure-PyTorch reference.

No GPU is needed: with TRITON_INTERPRET=1 and SPATIAL_MAMBA_BACKEND=triton, ``selective_scan_fn`` runs the Triton
kernels on CPU tensors through Triton's interpreter, which executes every kernel statement with numpy. The interpreter
is slow (about 70 us per scanned element), so the shapes stay small; they still cover one position, chunk boundaries
(MAX_BLOCK_L), several channel blocks with masked channels, and a long multi-chunk row.

The ``interpreted_kernels`` tests run in this process when Triton was imported under TRITON_INTERPRET=1, else in a
child pytest (``test_interpreted_tests_pass_in_a_child_process``): see ``_triton_interpreter``.

Ground truth: ``selective_scan_ref`` on the same inputs cast to float64. Tolerances, on |actual - expected| <=
atol + rtol * |expected| elementwise:
- computed in fp32, so atol = 2e-5 * max|expected| for hs and every gradient (measured over these cases: at most
  1.4e-6 * max|expected|, for dA, a sum over batch and L);
- gradients are returned in the input dtype, so they carry one rounding to it: rtol = 2**-11 for float16 and 1e-5
  for float32, and 2**-7 for bfloat16, because Triton's interpreter truncates float32 to bfloat16 where GPUs round
  to nearest. hs and the float32 parameters' gradients (dA, ddelta_bias) are always float32.
"""

import re

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")

from spatial_mamba.ops import backend, selective_scan_fn, triton_scan  # noqa: E402
from spatial_mamba.ops.selective_scan import selective_scan_ref  # noqa: E402

from ._triton_interpreter import (  # noqa: E402
    INTERPRETED,
    assert_interpreted_tests_pass,
    assert_no_spills,
    in_parent_only,
    needs_compiler,
    needs_interpreter,
    ptxas_report,
    run_python,
)

ATOL_OF_MAX = 2e-5
ROUNDING = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-11}


@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")


def make_inputs(batch, channels, length, dtype, delta_softplus, with_bias, seed=0):
    """Inputs in the model's ranges (SPEC §1.5): softplus(delta + bias) mostly in [1e-3, 0.1], A = -exp(A_log)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, length, generator=gen)
    A = -torch.empty(channels, 1).uniform_(0.5, 4.0, generator=gen)
    B = torch.randn(batch, 1, length, generator=gen)
    if delta_softplus:
        delta = torch.randn(batch, channels, length, generator=gen) - 3.0
        # Both branches of the official softplus: the identity above 20 and log1p(exp(v)) far below 0.
        delta[..., 1::11] = 25.0
        delta[..., 2::13] = -30.0
        bias = torch.log(torch.expm1(torch.empty(channels).uniform_(1e-3, 0.1, generator=gen)))
    else:
        delta = torch.rand(batch, channels, length, generator=gen) * 0.1
        bias = torch.rand(channels, generator=gen) * 0.05
    inputs = {"u": u.to(dtype), "delta": delta.to(dtype), "A": A, "B": B.to(dtype), "delta_bias": bias}
    if not with_bias:
        inputs["delta_bias"] = None
    return inputs


def run_scan(scan, inputs, delta_softplus, grad_hs):
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items() if t is not None}
    hs = scan(
        leaves["u"],
        leaves["delta"],
        leaves["A"],
        leaves["B"],
        delta_bias=leaves.get("delta_bias"),
        delta_softplus=delta_softplus,
    )
    hs.backward(grad_hs.to(hs.dtype))
    return hs.detach(), {name: t.grad for name, t in leaves.items()}


def assert_close_to_reference(inputs, delta_softplus):
    grad_hs = torch.randn(inputs["u"].shape[0], inputs["u"].shape[1], 1, inputs["u"].shape[2])
    assert backend.select("selective_scan", inputs["u"]) is triton_scan.selective_scan_triton
    hs, grads = run_scan(selective_scan_fn, inputs, delta_softplus, grad_hs)
    inputs64 = {name: None if t is None else t.double() for name, t in inputs.items()}
    hs_ref, grads_ref = run_scan(selective_scan_ref, inputs64, delta_softplus, grad_hs)

    def check(name, actual, expected, expected_dtype, rtol):
        assert actual.dtype == expected_dtype, f"{name}: dtype {actual.dtype}, expected {expected_dtype}"
        atol = ATOL_OF_MAX * expected.abs().max().item()
        torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")

    check("hs", hs, hs_ref, torch.float32, ROUNDING[torch.float32])
    for name in grads_ref:
        rtol = ROUNDING[inputs[name].dtype]
        check("d" + name, grads[name], grads_ref[name], inputs[name].dtype, rtol)


@needs_interpreter
@pytest.mark.parametrize(
    "batch, channels, length",
    [
        (2, 3, 1),
        (2, 40, 7),  # two channel blocks of 32, the second one mostly masked
        (1, 5, 100),
        (2, 3, triton_scan.MAX_BLOCK_L),  # exactly one full chunk
        (1, 3, 2 * triton_scan.MAX_BLOCK_L + 3),  # state carried across chunks, ragged last chunk
        (1, 2, 1000),
        (1, 2, 5000),
    ],
)
def test_interpreted_kernels_match_reference_across_shapes(triton_on_cpu, batch, channels, length):
    inputs = make_inputs(batch, channels, length, torch.float32, delta_softplus=True, with_bias=True)
    assert_close_to_reference(inputs, True)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [7, 2 * triton_scan.MAX_BLOCK_L + 3])
def test_interpreted_kernels_match_reference_for_half_precision_inputs(triton_on_cpu, dtype, length):
    inputs = make_inputs(2, 3, length, dtype, delta_softplus=True, with_bias=True)
    assert_close_to_reference(inputs, True)


@needs_interpreter
@pytest.mark.parametrize("delta_softplus, with_bias", [(False, False), (False, True), (True, False)])
def test_interpreted_kernels_match_reference_with_and_without_softplus_and_bias(
    triton_on_cpu, delta_softplus, with_bias
):
    inputs = make_inputs(2, 3, 300, torch.float32, delta_softplus, with_bias)
    assert_close_to_reference(inputs, delta_softplus)


@needs_interpreter
def test_interpreted_kernels_reject_d_state_above_one(triton_on_cpu):
    inputs = make_inputs(1, 3, 5, torch.float32, delta_softplus=True, with_bias=True)
    A = inputs["A"].repeat(1, 2)
    B = inputs["B"].repeat(1, 2, 1)
    with pytest.raises(ValueError, match="d_state N = 1 only"):
        selective_scan_fn(inputs["u"], inputs["delta"], A, B, delta_bias=inputs["delta_bias"], delta_softplus=True)


@in_parent_only
def test_interpreted_tests_pass_in_a_child_process():
    assert_interpreted_tests_pass(__file__)


def test_forced_triton_backend_says_when_interpret_mode_changed_after_import(monkeypatch):
    if INTERPRETED:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        reason = "triton was imported with TRITON_INTERPRET=1, which is no longer set"
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        reason = "TRITON_INTERPRET=1 was set after triton was imported"
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    ok, why = triton_scan.available()
    assert not ok and why.startswith(reason), why
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        backend.select("selective_scan", torch.zeros(1, 1, 1))


def test_triton_backends_report_unavailable_without_triton():
    # The modules must import without Triton, and each backend must say why it cannot run.
    code = """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        from spatial_mamba.ops import backend, triton_scan
        print(triton_scan.available())
        print(backend.describe()["selective_scan"]["triton"])
        print(backend.describe()["dwconv2d"]["triton"])
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        "(False, 'triton is not installed')",
        "unavailable: triton is not installed",
        "unavailable: triton is not installed",
    ]


@needs_compiler
@pytest.mark.parametrize("length", [49, 3136])  # the last and first stage of Spatial-Mamba-T at 224x224
def test_kernels_compile_for_hopper_without_register_spills(tmp_path, length):
    # The interpreter accepts code that the GPU compiler rejects: compile the real kernels for sm_90 (no GPU needed).
    kernels = triton_scan._kernels()
    u = torch.empty(2, 384, length, dtype=torch.bfloat16)
    _, _, options = triton_scan._launch_config(u)
    constexprs = {
        "HAS_DELTA_BIAS": True,
        "DELTA_SOFTPLUS": True,
        "BLOCK_D": options["BLOCK_D"],
        "BLOCK_L": options["BLOCK_L"],
    }
    bf16_pointers = {"u_ptr", "delta_ptr", "B_ptr", "du_ptr", "ddelta_ptr"}
    kinds = {"n_channels": "i32", "length": "i32", **dict.fromkeys(constexprs, "constexpr")}
    for kernel in (kernels.selective_scan_fwd_kernel, kernels.selective_scan_bwd_kernel):
        signature = {name: kinds.get(name, "*bf16" if name in bf16_pointers else "*fp32") for name in kernel.arg_names}
        assert_no_spills(ptxas_report(kernel, signature, constexprs, triton_scan.NUM_WARPS, tmp_path))
