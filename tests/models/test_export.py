"""The export-friendly scan, torch.export and ONNX export with dynamic batch and image size, torch.compile, and
official checkpoints through timm's own loading paths."""

import copy
import inspect
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch

import spatial_mamba
from spatial_mamba import compat
from spatial_mamba.ops.selective_scan_export import CHUNK, selective_scan_export

ROOT = Path(__file__).resolve().parents[2]
NARROW = dict(dims=16, depths=(1, 1, 1, 1), num_classes=7, drop_path_rate=0.0)


def _timm_loads_weights_only() -> bool:
    parameter = inspect.signature(timm.models.load_checkpoint).parameters.get("weights_only")
    return parameter is not None and parameter.default is True


def _dynamic_export_missing() -> str:
    try:
        compat.require_dynamic_export(onnx=True)
    except RuntimeError as error:
        return str(error)
    return ""


needs_dynamic_export = pytest.mark.skipif(bool(_dynamic_export_missing()), reason=_dynamic_export_missing())


def _sequential_scan(u, delta, A, B, bias):
    """x_t = exp(Δ_t A) x_{t-1} + Δ_t B_t u_t in float64, one position at a time."""
    dt = torch.nn.functional.softplus(delta + bias[:, None])
    state, out = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64), []
    for t in range(u.shape[-1]):
        state = torch.exp(dt[:, :, t, None] * A) * state + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        out.append(state)
    return torch.stack(out, -1)


@pytest.mark.parametrize(
    "length, memory",
    [(1, "short"), (CHUNK - 1, "short"), (CHUNK, "short"), (CHUNK + 1, "short"), (196, "short"), (3136, "short")]
    + [(CHUNK * CHUNK + 1, "long"), (3 * CHUNK * CHUNK + 7, "long"), (20000, "long")],
)
def test_export_scan_is_float32_accurate_against_the_float64_recurrence(length, memory):
    """Measured: relative error (max |error| / max |x|) at most 7e-7 for rows up to 4000 positions; 4e-6 allowed.
    With long memory (decays of 1e-5 to 1e-3 per position) a state carries across many groups of CHUNK chunks, so
    every level of the end-state recurrence counts."""
    g = torch.Generator().manual_seed(length)
    u, delta = torch.randn(2, 8, length, generator=g), torch.randn(2, 8, length, generator=g) - 1
    scale, floor = (2, 0.05) if memory == "short" else (1e-3, 1e-5)
    A = -(torch.rand(8, 2, generator=g) * scale + floor)
    B, bias = torch.randn(2, 2, length, generator=g), 0.5 * torch.randn(8, generator=g)
    expected = _sequential_scan(*(t.double() for t in (u, delta, A, B, bias)))
    got = selective_scan_export(u, delta, A, B, bias, True)
    assert got.dtype == torch.float32 and got.shape == (2, 8, 2, length)
    assert (got.double() - expected).abs().max() <= 4e-6 * expected.abs().max()
    # float64 inputs give the float64 result
    torch.testing.assert_close(
        selective_scan_export(*(t.double() for t in (u, delta, A, B, bias)), True), expected, rtol=1e-10, atol=1e-12
    )


def test_export_scan_softplus_switches_to_identity_above_20():
    u, B = torch.ones(1, 1, 3), torch.ones(1, 1, 3)
    delta = torch.tensor([[[25.0, 0.0, -30.0]]])
    A = torch.full((1, 1), -1e-3)
    got = selective_scan_export(u, delta, A, B, None, True)
    expected = _sequential_scan(u.double(), delta.double(), A.double(), B.double(), torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_export_on_a_torch_without_dynamic_dims_says_which_torch_it_needs(monkeypatch):
    tool = _export_tool()
    if hasattr(torch.export, "Dim"):  # torch 2.1 has no Dim at all
        monkeypatch.delattr(torch.export.Dim, "DYNAMIC", raising=False)
    model = spatial_mamba.SpatialMamba(**NARROW).eval()
    with pytest.raises(RuntimeError, match=r"export with a dynamic batch and image size needs torch >= 2\.6"):
        tool.export(model, torch.randn(1, 3, 64, 64), Path("never-written.onnx"), opset=18)


@needs_dynamic_export
def test_torch_export_with_dynamic_batch_and_image_size():
    torch.manual_seed(0)
    model = spatial_mamba.SpatialMamba(**NARROW).eval()
    dynamic = torch.export.Dim.DYNAMIC
    program = torch.export.export(
        model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},)
    )
    exported = program.module()
    for shape in [(1, 3, 64, 64), (3, 3, 45, 71), (1, 3, 100, 33)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


def _export_tool():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import export_onnx
    finally:
        sys.path.pop(0)
    return export_onnx


@pytest.mark.slow
@needs_dynamic_export
def test_onnx_export_runs_in_onnxruntime_at_square_and_non_square_sizes(tmp_path):
    """The tool's export and check on a narrow model: one file, two sizes, batch 2."""
    tool = _export_tool()
    torch.manual_seed(0)
    model = spatial_mamba.SpatialMamba(**NARROW).eval()
    tool.export(model, torch.randn(2, 3, 64, 64), tmp_path / "m.onnx", opset=18)
    diffs = tool.check(model, tmp_path / "m.onnx", [(64, 64), (48, 80)], batch=2)
    assert len(diffs) == 2 and max(diffs) <= 1e-4, diffs


def test_onnx_export_tool_rejects_bad_arguments(capsys):
    tool = _export_tool()
    for argv, message in [
        (["--model", "spatial_mamba_tiny", "--out", "m.onnx", "--img-size", "32"], "size above 32"),
        (["--model", "spatial_mamba_tiny", "--out", "m.onnx", "--opset", "17"], "--opset must be >= 18"),
        (["--model", "spatial_mamba_tiny", "--out", "m.onnx", "--img-size", "2x3x4"], "HxW"),
    ]:
        with pytest.raises(SystemExit):
            tool.parse_args(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown model 'resnet50'"):
        tool.build_model("resnet50", None, None)


def _compiled_narrow():
    torch.manual_seed(0)
    model = spatial_mamba.SpatialMamba(**NARROW)
    # Static shapes: each stage's scan runs at its own length, and inductor fails on the reference scan's chunk
    # layout once it generalises those lengths to symbols.
    return model, torch.compile(model, dynamic=False), torch.randn(2, 3, 32, 32)


@pytest.mark.slow
def test_torch_compile_evaluates_like_eager():
    model, compiled, x = _compiled_narrow()
    model.eval()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    eager_ops = [w for w in caught if "runs eagerly between compiled graphs" in str(w.message)]
    # Said once per op where torch cannot trace the ops (compat.eager_op), never where it can.
    assert bool(eager_ops) != compat.HAS_CUSTOM_OP, [str(w.message) for w in caught]
    assert all("needs torch >= 2.4" in str(w.message) for w in eager_ops)


def _assert_near(got, expected, relative, name):
    """max |got - expected| <= relative * max |expected| + 1e-6, the absolute part for tensors whose true value is
    zero (the biases of the convolutions before a BatchNorm get gradients of float32 rounding noise, about 1e-8)."""
    error, scale = (got - expected).abs().max().item(), expected.abs().max().item()
    assert error <= relative * scale + 1e-6, f"{name}: max error {error:.3g}, max |value| {scale:.3g}"


@pytest.mark.slow
def test_torch_compile_trains_like_eager():
    """Two SGD steps of a compiled and an eager copy of one model agree: the logits of both steps, the first step's
    gradients, the weights after the second step. ``fullgraph=True`` makes any graph break an error, so the token
    mixer (under activation checkpointing in training), the scan and the state fusion are compiled, not left to eager
    fallbacks.

    Measured (float32, other summation orders): logits within 6.6e-6 (max |logit| 0.41); gradients within 7.2e-5 of
    each tensor's largest entry; weights after two steps within 3.4e-6. Allowed: 1e-4 of the largest logit, 5e-4 of
    the largest gradient entry (each plus 1e-6), and 2e-5 for the weights."""
    torch.manual_seed(0)
    model = spatial_mamba.SpatialMamba(**NARROW).train()
    eager = copy.deepcopy(model)
    # Where torch lacks torch.library.custom_op (< 2.4) the ops run eagerly between compiled graphs (compat.eager_op),
    # so there is no single graph to ask for; the numbers must agree all the same.
    compiled = torch.compile(model, dynamic=False, fullgraph=compat.HAS_CUSTOM_OP)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, eager)]
    for step in range(2):
        x = torch.randn(2, 3, 32, 32)
        logits = []
        for forward, optimizer in zip((compiled, eager), optimizers):
            optimizer.zero_grad()
            logits.append(forward(x))
            logits[-1].logsumexp(1).mean().backward()
        _assert_near(logits[0], logits[1], 1e-4, f"logits of step {step}")
        if step == 0:
            for (name, p), q in zip(model.named_parameters(), eager.parameters()):
                _assert_near(p.grad, q.grad, 5e-4, f"gradient of {name}")
        for optimizer in optimizers:
            optimizer.step()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-5, msg=name)


def test_official_checkpoint_loads_through_timm_paths(tmp_path):
    from tests.models.test_checkpoint import _official_file

    torch.manual_seed(0)
    src = spatial_mamba.SpatialMamba(**NARROW).eval()
    ema = spatial_mamba.SpatialMamba(**NARROW).eval()
    _official_file(tmp_path / "ckpt_epoch_3.pth", src, ema)
    _official_file(tmp_path / "no_ema.pth", src)
    x = torch.randn(1, 3, 40, 40)
    # timm prefers the EMA weights when a checkpoint holds them (its load_state_dict(use_ema=True) default); a head
    # of another size than the cfg's num_classes is dropped by timm, so the overlay states the checkpoint's.
    for kwargs, expected in [
        (dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "no_ema.pth"), num_classes=7)), src),
        (
            dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "ckpt_epoch_3.pth"), num_classes=7)),
            ema,
        ),
        (dict(checkpoint_path=str(tmp_path / "no_ema.pth")), src),
        (dict(checkpoint_path=str(tmp_path / "ckpt_epoch_3.pth")), ema),
    ]:
        if "checkpoint_path" in kwargs and not compat.HAS_SAFE_GLOBALS and _timm_loads_weights_only():
            # Where timm's checkpoint_path= loads with weights_only=True (1.0.31 does), torch < 2.4 cannot extend it to
            # the official CfgNode (docs/compatibility.md); the refusal is timm's, and names weights_only.
            with pytest.raises(RuntimeError, match="weights_only"):
                timm.create_model("spatial_mamba_tiny", **NARROW, **kwargs)
            continue
        model = timm.create_model("spatial_mamba_tiny", **NARROW, **kwargs).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0, msg=str(kwargs))
