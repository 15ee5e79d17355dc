"""The cpu kernels as torch.library custom ops (torch >= 2.4): every op passes ``torch.library.opcheck`` in both
layouts, the fake implementations give the real outputs' shapes and strides, ``torch.compile(fullgraph=True)`` keeps
the ops in its forward and backward graphs with eager's outputs and gradients, and ``torch.export`` keeps them in an
exported model.

On torch < 2.4 there is no ``torch.library.custom_op``: this module is skipped, the kernels run eagerly and the
reference runs under tracers (tests/ops/test_cpu_kernels.py).
"""

import pytest
import timm
import torch

import spatial_mamba  # noqa: F401  (registers the models with timm)
from spatial_mamba import compat
from spatial_mamba.ops import backend, fused_observation, selective_scan_fn, state_fusion
from spatial_mamba.ops.backends import cpu as cpu_kernels
from tests.kernels import parity

AVAILABLE, WHY = cpu_kernels.available()
pytestmark = [
    pytest.mark.skipif(
        not compat.HAS_CUSTOM_OP,
        reason=f"torch {torch.__version__} has no torch.library.custom_op (torch >= 2.4): the cpu kernels are no ops",
    ),
    pytest.mark.skipif(not AVAILABLE, reason=f"the cpu kernels are unavailable here: {WHY}"),
]

LAYOUTS = ["contiguous", "token_major"]
NARROW = dict(dims=16, depths=(1, 1, 1, 1), num_classes=7, drop_path_rate=0.0)
OPS = ("state_fusion", "fused_observation", "selective_scan")
OP_NAMES = [f"{op}_cpu_{step}" for op in OPS for step in ("fwd", "bwd")]


def _states(layout, *tensors):
    return [backend.as_layout(t, layout == "token_major") for t in tensors]


def _op_cases(name, layout):
    """Argument tuples for ``torch.ops.spatial_mamba.<name>``: differentiable inputs for the forward ops (opcheck
    then checks their autograd), and gradients asked for all at once and one at a time for the backward ops."""
    h, taps, C, u, D, dy = parity.observation_inputs(2, 3, 6, 7, torch.float32)
    h, u, dy = _states(layout, h, u, dy)
    scan, dhs = parity.scan_inputs(2, 5, 42, torch.float32)
    su, sdelta = _states(layout, scan["u"], scan["delta"])
    sA, sB, bias = scan["A"], scan["B"].squeeze(1).contiguous(), scan["delta_bias"]
    if name == "state_fusion_cpu_fwd":
        return [(h.requires_grad_(), taps.requires_grad_())]
    if name == "state_fusion_cpu_bwd":
        return [(h, taps, dy, True, True), (h, taps, dy, False, True), (h, taps, dy, True, False)]
    if name == "fused_observation_cpu_fwd":
        return [tuple(t.requires_grad_() for t in (h, taps, C, u, D))]
    if name == "fused_observation_cpu_bwd":
        return [(h, taps, C, u, D, dy, *needs) for needs in [(True,) * 5, (False, True, False, True, False)]]
    if name == "selective_scan_cpu_fwd":
        plain, _ = parity.scan_inputs(2, 5, 42, torch.float32, delta_softplus=False, with_bias=False, seed=1)
        plain = [*_states(layout, plain["u"], plain["delta"]), plain["A"], plain["B"].squeeze(1).contiguous()]
        return [
            (*(t.clone().requires_grad_() for t in (su, sdelta, sA, sB, bias)), True),
            (*(t.requires_grad_() for t in plain), None, False),
        ]
    hs, dt = torch.ops.spatial_mamba.selective_scan_cpu_fwd(su, sdelta, sA, sB, bias, True)
    dhs = backend.as_layout(dhs.squeeze(2), layout == "token_major")
    # Only d bias asked for: dΔ is computed on the way and returned as well.
    return [(su, sdelta, sA, sB, bias, True, hs, dt, dhs, *needs) for needs in [(True,) * 5, (False,) * 4 + (True,)]]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", OP_NAMES)
def test_each_cpu_op_passes_opcheck(name, layout):
    op = getattr(torch.ops.spatial_mamba, name)
    for args in _op_cases(name, layout):
        results = torch.library.opcheck(op, args)
        assert all(result == "SUCCESS" for result in results.values()), (name, results)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", OP_NAMES)
def test_fake_outputs_have_the_real_outputs_shapes_and_strides(name, layout):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = getattr(torch.ops.spatial_mamba, name)
    for args in _op_cases(name, layout):
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        real, fake = (out if isinstance(out, tuple) else (out,) for out in (real, fake))
        assert [(t.shape, t.stride(), t.dtype) for t in fake] == [(t.shape, t.stride(), t.dtype) for t in real]
    if name.endswith("fwd"):  # the output comes back in the states' layout
        assert backend.token_major(real[0]) == (layout == "token_major")


def _recording_backend():
    """A torch.compile backend (AOT autograd, no code generation) that records the ops each forward and backward graph
    calls, by name (e.g. "spatial_mamba.state_fusion_cpu_fwd.default")."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = {"forward": set(), "backward": set()}

    def recorder(kind):
        def compile_graph(gm, example_inputs):
            graphs[kind].update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
            return make_boxed_func(gm.forward)

        return compile_graph

    return aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward")), graphs


def _public_ops(h, kernel_3, kernel_3_1, kernel_3_2, alpha, C, u, D, A, B, delta_bias):
    """The three public ops the model calls, on one set of inputs: the scan of u, then the fusion and the fused
    observation of its states."""
    batch, channels, height, width = h.shape
    hs = selective_scan_fn(
        u.flatten(2), h.flatten(2), A, B, delta_bias=delta_bias, delta_softplus=True
    )  # u's layout: token-major u gives token-major states
    states = hs.reshape(batch, channels, height, width)
    fused = state_fusion(states, kernel_3, kernel_3_1, kernel_3_2, alpha)
    y = fused_observation(states, kernel_3, kernel_3_1, kernel_3_2, alpha, C, u, D)
    return fused, y


def _public_inputs(layout):
    gen = torch.Generator().manual_seed(0)
    batch, channels, height, width = 2, 4, 6, 7
    h, u = _states(layout, *(torch.randn(batch, channels, height, width, generator=gen) for _ in range(2)))
    kernels = [torch.randn(channels, 1, 3, 3, generator=gen) / 3 for _ in range(3)]
    tensors = [
        h - 2,  # delta, before its softplus
        *kernels,
        torch.rand(3, generator=gen) + 0.5,  # alpha
        torch.randn(batch, height, width, generator=gen),  # C
        u,
        torch.randn(channels, generator=gen),  # D
        -torch.rand(channels, 1, generator=gen) - 0.5,  # A
        torch.randn(batch, 1, height * width, generator=gen),  # B
        torch.randn(channels, generator=gen) * 0.1,  # delta_bias
    ]
    return [t.detach().requires_grad_() for t in tensors]


def _run(fn, inputs):
    """The outputs and the gradients of their weighted sum w.r.t. every input."""
    outputs = fn(*inputs)
    weights = [torch.linspace(-1, 1, out.numel()).reshape(out.shape) for out in outputs]
    grads = torch.autograd.grad(sum((out * w).sum() for out, w in zip(outputs, weights)), inputs)
    return [out.detach() for out in outputs], grads


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_public_ops_keep_the_cpu_ops_and_match_eager(layout):
    """fullgraph=True: any graph break fails. Eager and compiled call the same kernels on the same inputs; only the
    taps' few tensor ops are traced, so the results agree to float32 rounding (measured: bitwise; allowed 1e-6 of
    each tensor's largest entry)."""
    torch._dynamo.reset()
    recording, graphs = _recording_backend()
    inputs = _public_inputs(layout)
    expected = _run(_public_ops, inputs)
    got = _run(torch.compile(_public_ops, backend=recording, fullgraph=True), inputs)
    for step in OPS:
        assert f"spatial_mamba.{step}_cpu_fwd.default" in graphs["forward"], graphs["forward"]
        assert f"spatial_mamba.{step}_cpu_bwd.default" in graphs["backward"], graphs["backward"]
    # The reference's fusion is a depthwise convolution; none was traced.
    assert not any("convolution" in target for target in graphs["forward"] | graphs["backward"])
    for name, a, b in zip(["fused", "y"], got[0], expected[0]):
        parity.assert_close(a, b.double(), 0.0, 1e-6, name)
    for index, (a, b) in enumerate(zip(got[1], expected[1])):
        parity.assert_close(a, b.double(), 0.0, 1e-6, f"grad {index}")


def test_inductor_compiles_the_public_ops_with_eager_results():
    """The default backend generates C++ around the custom ops and may reorder the taps' sums: the same tolerance as
    above (measured: within 2.3e-7 of the largest entry)."""
    torch._dynamo.reset()
    inputs = _public_inputs("token_major")
    expected = _run(_public_ops, inputs)
    got = _run(torch.compile(_public_ops, fullgraph=True), inputs)
    for index, (a, b) in enumerate(zip([*got[0], *got[1]], [*expected[0], *expected[1]])):
        parity.assert_close(a, b.double(), 0.0, 1e-6, f"result {index}")


def test_compile_loads_the_kernels_at_their_first_use_inside_the_trace(monkeypatch):
    """Nothing loaded yet when dynamo first asks the dispatcher: the library is looked up (and would be compiled)
    while it traces, without a graph break."""
    monkeypatch.setattr(cpu_kernels, "_LOADED", {})
    torch._dynamo.reset()
    recording, graphs = _recording_backend()
    h, taps, _ = parity.fusion_inputs(1, 3, 5, 6, torch.float32)
    kernels = [torch.randn(3, 1, 3, 3) for _ in range(3)]
    alpha = torch.rand(3)
    got = torch.compile(state_fusion, backend=recording, fullgraph=True)(h, *kernels, alpha)
    assert "spatial_mamba.state_fusion_cpu_fwd.default" in graphs["forward"]
    assert cpu_kernels._LOADED and all(library is not None for library, _ in cpu_kernels._LOADED.values())
    torch.testing.assert_close(got, state_fusion(h, *kernels, alpha), rtol=0, atol=0)


def test_torch_export_keeps_the_cpu_ops_and_runs_like_eager():
    """An exported narrow model calls the scan and the fused observation as cpu ops (no reference scan, no export
    formulation). The same kernels on the same inputs: measured bitwise equal to eager; allowed 1e-5."""
    torch.manual_seed(0)
    model = timm.create_model("spatial_mamba_tiny", **NARROW).eval()
    x = torch.randn(2, 3, 64, 64)
    program = torch.export.export(model, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "spatial_mamba.selective_scan_cpu_fwd.default" in targets, targets
    assert "spatial_mamba.fused_observation_cpu_fwd.default" in targets, targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
