"""The compiled CPU kernels (spatial_mamba/ops/backends/cpu/): the paths of their own against the
float64 definitions of tests/kernels/parity.py, gradients asked for one at a time, results that do not depend on the
number of threads, the compile-and-cache path, and how the dispatcher falls back when the kernels cannot run.

The float32 tolerance table and the references are parity.py's (every output and gradient within 2e-5 * max of the
float64 result, sums over batch, plane or channels within 1e-4 * max).
"""

import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from spatial_mamba import compat
from spatial_mamba.ops import backend, fused_observation, state_fusion
from spatial_mamba.ops.backends import cpu as cpu_kernels
from tests.kernels import parity

AVAILABLE, WHY = cpu_kernels.available()
needs_kernels = pytest.mark.skipif(not AVAILABLE, reason=f"the cpu kernels are unavailable here: {WHY}")


def public_fusion(h, taps):
    return backend.select("state_fusion", h, taps)(h, taps)


def public_observation(h, taps, C, u, D):
    return backend.select("fused_observation", h, taps, C, u, D)(h, taps, C, u, D)


# The kernels run the (B, C, ...) states contiguous or token-major (views of (B, ..., C) memory, the layout the model
# hands them on the CPU), each with kernels of its own.
LAYOUTS = ["contiguous", "token_major"]


def in_layout(op, layout, states):
    """``op`` with its arguments at positions ``states`` handed over in ``layout``; asserts that the output comes back
    in the layout the inputs ended up in (one channel or one pixel is both)."""

    def run(*args, **kwargs):
        args = list(args)
        for i in states:
            args[i] = backend.as_layout(args[i], layout == "token_major")
        out = op(*args, **kwargs)
        assert backend.token_major(out) == backend.token_major(args[states[0]])
        return out

    return run


# (batch, C, H, W): planes smaller than the 5-pixel halo in one or both directions, one pixel, one row, one column;
# widths on either side of the vector widths (8 up to width 8, else 16 on AVX-512 CPUs) and of the 26 = 16 + 10 of
# the adjoint's padded rows; Spatial-Mamba-T's smallest planes; planes split into several row blocks (334 wide: 83
# rows a block, the last one ragged); 40 channels, three channel groups of the observation's dC and, token-major,
# five vectors of 8 channels (three of 16, the last one partial); batch 2 everywhere the batch matters (dtaps, dD
# and dC sum over it).
CPU_FUSION_CASES = [
    (2, 3, 3, 4),
    (1, 2, 1, 1),
    (2, 1, 1, 17),
    (2, 1, 9, 1),
    (2, 2, 8, 8),
    (2, 2, 5, 9),
    (1, 2, 11, 15),
    (2, 2, 6, 16),
    (1, 2, 7, 26),
    (1, 1, 12, 33),
    (2, 4, 7, 7),
    (2, 4, 14, 14),
    (1, 2, 200, 334),
    (2, 40, 9, 12),
]


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", CPU_FUSION_CASES, ids=str)
def test_cpu_fusion_matches_the_float64_gather(shape, layout):
    h, taps, dy = parity.fusion_inputs(*shape, torch.float32, seed=shape[-1])
    with backend.force("cpu"):
        assert backend.explain("state_fusion", h, taps).backend == "cpu"
        out, dh, dtaps = parity.run_fusion(in_layout(public_fusion, layout, [0]), h, taps, dy)
    parity.check_fusion(out, dh, dtaps, h, taps, dy)


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", CPU_FUSION_CASES, ids=str)
def test_cpu_fused_observation_matches_the_float64_gather(shape, layout):
    inputs = parity.observation_inputs(*shape, torch.float32, seed=shape[-2])
    with backend.force("cpu"):
        assert backend.explain("fused_observation", *inputs[:5]).backend == "cpu"
        y, grads = parity.run_observation(in_layout(public_observation, layout, [0, 3]), *inputs)
    parity.check_observation(y, grads, *inputs)


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (3,), (4,), (0, 2), (1, 4)], ids=str)
def test_cpu_fused_observation_computes_the_gradients_asked_for(wanted, layout):
    h, taps, C, u, D, dy = parity.observation_inputs(2, 3, 9, 11, torch.float32)
    exact = [t.double() for t in (h, taps, C, u, D)]
    _, expected = parity.run_observation(parity.gather_observation, *exact, dy.double())
    inputs = [t.clone().requires_grad_(i in wanted) for i, t in enumerate((h, taps, C, u, D))]
    with backend.force("cpu"):
        in_layout(public_observation, layout, [0, 3])(*inputs).backward(dy)
    for i, t in enumerate(inputs):
        if i not in wanted:
            assert t.grad is None
            continue
        parity.assert_close(t.grad, expected[i], 1e-5, parity.REDUCTION_ATOL_OF_MAX, f"grad {i}")


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_results_do_not_depend_on_the_thread_count(layout):
    # The sums over batch, plane and channels are added in an order fixed by the shapes: bitwise equal results.
    inputs = parity.observation_inputs(3, 20, 30, 21, torch.float32)
    observation = in_layout(public_observation, layout, [0, 3])
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 3, 7):
            torch.set_num_threads(count)
            with backend.force("cpu"):
                y, grads = parity.run_observation(observation, *inputs)
            results.append((y, *grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_kernels
def test_the_model_ops_run_on_the_cpu_kernels_for_float32():
    h, taps, _ = parity.fusion_inputs(2, 3, 6, 7, torch.float32)
    assert backend.explain("state_fusion", h, taps).backend == "cpu"
    kernels = [torch.randn(3, 1, 3, 3) for _ in range(3)]
    alpha = torch.rand(3)
    expected = parity.gather_fusion(h.double(), parity.fusion_taps(*[k.double() for k in kernels], alpha.double()))
    parity.assert_close(state_fusion(h, *kernels, alpha), expected, 1e-5, parity.ATOL_OF_MAX, "out")
    C, u, D = torch.randn(2, 6, 7), torch.randn(2, 3, 6, 7), torch.randn(3)
    y = fused_observation(h, *kernels, alpha, C, u, D)
    expected = expected * C.double()[:, None] + D.double()[:, None, None] * u.double()
    parity.assert_close(y, expected, 1e-5, parity.ATOL_OF_MAX, "y")


def test_cpu_kernels_decline_what_they_cannot_take():
    x = torch.zeros(1, 2, 3, 3)
    assert cpu_kernels.supports(x, torch.zeros(2, 25)) == []
    assert "float64 inputs" in cpu_kernels.supports(x.double(), torch.zeros(2, 25))[0]
    assert "bfloat16 inputs" in cpu_kernels.supports(x, torch.zeros(2, 25), x.bfloat16())[0]
    assert "on meta" in cpu_kernels.supports(x.to("meta"))[0]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert "FakeTensor" in cpu_kernels.supports(fake)[0]


@pytest.mark.parametrize("tracer", ["torchscript", "onnx", "compile"])
def test_tracers_that_cannot_keep_the_kernels_decline_them_before_they_are_compiled(tracer, monkeypatch, tmp_path):
    # TorchScript tracing and ONNX export (and torch.compile/export where torch lacks custom ops) get the reference,
    # without compiling (the compiler here would fail, and its failure would be a warning) and without a word.
    if tracer == "compile" and compat.HAS_CUSTOM_OP:
        pytest.skip("torch >= 2.4 keeps the kernels in compiled graphs as custom ops (test_cpu_custom_ops.py)")
    monkeypatch.setenv(cpu_kernels.CXX_ENV, str(tmp_path / "no-such-compiler"))
    if tracer == "torchscript":
        monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    else:  # the ONNX exporter traces with torch.export
        monkeypatch.setattr(compat, "is_compiling", lambda: True)
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: tracer == "onnx")
    h, taps, _ = parity.fusion_inputs(1, 2, 5, 5, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choice = backend.explain("state_fusion", h, taps)
        backend.choose("state_fusion", h, taps)
    assert choice.backend == "reference" and not choice.unavailable
    expected = {"torchscript": "TorchScript", "onnx": "ONNX export", "compile": "torch.compile"}[tracer]
    if not compat.HAS_CUSTOM_OP:
        expected = "TorchScript" if tracer == "torchscript" else "torch.compile"
    assert expected in choice.passed_over["cpu"][0], choice.passed_over
    assert (str(tmp_path / "no-such-compiler"), str(cpu_kernels.cache_dir())) not in cpu_kernels._LOADED


@needs_kernels
def test_a_fresh_cache_compiles_the_library_once_and_loads_it(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path))
    old_umask = os.umask(0o022)
    try:
        ok, why = cpu_kernels.available()
    finally:
        os.umask(old_umask)
    assert ok, why
    built = sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock")
    assert len(built) == 1 and built[0].startswith("state_fusion_") and built[0].endswith(".so"), built
    assert str(tmp_path) in why
    # Shared caches: under umask 022 the group and other users can read and load it.
    assert stat.S_IMODE((tmp_path / built[0]).stat().st_mode) == 0o755
    # A second process-wide look-up reuses the loaded library; a new process would reuse the file.
    assert cpu_kernels.available() == (ok, why)
    h, taps, dy = parity.fusion_inputs(1, 2, 6, 9, torch.float32)
    with backend.force("cpu"):
        out, dh, dtaps = parity.run_fusion(public_fusion, h, taps, dy)
    parity.check_fusion(out, dh, dtaps, h, taps, dy)


def _fake_compiler(tmp_path, name: str, compile_body: str) -> str:
    """A compiler script named ``name`` that answers ``--version`` and runs ``compile_body`` for a compile."""
    script = tmp_path / name
    script.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "{name} 1.0"; exit 0; fi\n{compile_body}')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def _failing_compiler(tmp_path):
    return _fake_compiler(
        tmp_path, "broken-g++", 'echo "state_fusion.cpp:1:1: error: this compiler is broken" >&2\nexit 1\n'
    )


def test_a_failing_compile_makes_the_backend_unavailable_with_the_error(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_kernels.CXX_ENV, _failing_compiler(tmp_path))
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path / "cache"))
    ok, why = cpu_kernels.available()
    assert not ok
    assert "failed to compile" in why and "this compiler is broken" in why
    left = [name for name in os.listdir(tmp_path / "cache") if name != ".lock"]
    assert not left, f"the failed build left files behind: {left}"


def test_a_missing_compiler_makes_the_backend_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_kernels.CXX_ENV, str(tmp_path / "no-such-g++"))
    ok, why = cpu_kernels.available()
    assert not ok and "was not found" in why


def test_unavailable_kernels_warn_once_and_the_reference_runs(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_kernels.CXX_ENV, _failing_compiler(tmp_path))
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(backend, "_WARNED_UNAVAILABLE", set())
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    h, taps, dy = parity.fusion_inputs(1, 2, 6, 9, torch.float32)
    with pytest.warns(RuntimeWarning, match=r"cpu backend is unavailable \(.*this compiler is broken"):
        out, dh, dtaps = parity.run_fusion(public_fusion, h, taps, dy)
    parity.check_fusion(out, dh, dtaps, h, taps, dy)
    inputs = parity.observation_inputs(1, 2, 6, 9, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process, not once per op or call
        assert backend.choose("state_fusion", h, taps)[0] == "reference"
        assert backend.choose("fused_observation", *inputs[:5])[0] == "reference"
    with pytest.raises(RuntimeError, match=r"backend.force\('cpu'\) .* this compiler is broken"):
        with backend.force("cpu"):
            backend.choose("state_fusion", h, taps)


# (batch, D, L): 15 rows, one group of 8 rows run side by side and a ragged group of 7; one position; rows of 8k
# rows only; lengths around the vector widths (8, 16 on AVX-512) and long rows.
# Token-major, tasks are blocks of 32 channels (64 on AVX-512): 70 channels make three (two), the last partial,
# whose dB partial sums add up.
CPU_SCAN_CASES = [(3, 5, 33), (1, 16, 1), (2, 8, 515), (1, 9, 16), (1, 3, 17), (2, 4, 3000), (2, 70, 45)]


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "no_softplus"])
@pytest.mark.parametrize("shape", CPU_SCAN_CASES, ids=str)
def test_cpu_scan_matches_the_sequential_loop(shape, softplus, layout):
    from spatial_mamba.ops import selective_scan_fn

    inputs, dhs = parity.scan_inputs(*shape, torch.float32, softplus, with_bias=softplus, seed=shape[-1])

    def scan(u, delta, A, B, delta_bias, delta_softplus):
        return selective_scan_fn(u, delta, A, B, delta_bias=delta_bias, delta_softplus=delta_softplus)

    with backend.force("cpu"):
        assert backend.explain("selective_scan", *inputs.values()).backend == "cpu"
        hs, grads = parity.run_scan(in_layout(scan, layout, [0, 1]), inputs, softplus, dhs)
    parity.check_scan(hs, grads, inputs, softplus, dhs)


def test_cpu_scan_declines_d_state_above_one_and_other_dtypes():
    u = torch.zeros(1, 3, 5)
    assert cpu_kernels.supports_selective_scan(u, u, torch.zeros(3, 1), torch.zeros(1, 1, 5), None) == []
    assert cpu_kernels.supports_selective_scan(u, u, torch.zeros(3, 2), torch.zeros(1, 2, 5), None) == [
        "d_state N = 2 (the cpu kernels handle N = 1 only)"
    ]
    half = u.bfloat16()
    assert "bfloat16 inputs" in cpu_kernels.supports_selective_scan(half, half, torch.zeros(3, 1), None, None)[0]


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("wanted", ["u", "delta", "A", "B", "delta_bias"])
def test_cpu_scan_computes_the_gradients_asked_for(wanted, layout):
    from spatial_mamba.ops import selective_scan_fn

    inputs, dhs = parity.scan_inputs(2, 9, 40, torch.float32)
    exact = {k: v.double() for k, v in inputs.items()}
    _, expected = parity.run_scan(parity.sequential_scan, exact, True, dhs.double())
    leaves = {k: v.clone().requires_grad_(k == wanted) for k, v in inputs.items()}
    with backend.force("cpu"):
        scan = in_layout(selective_scan_fn, layout, [0, 1])
        hs = scan(
            leaves["u"], leaves["delta"], leaves["A"], leaves["B"], delta_bias=leaves["delta_bias"], delta_softplus=True
        )
    hs.backward(dhs)
    for name, leaf in leaves.items():
        if name != wanted:
            assert leaf.grad is None, name
    parity.assert_close(leaves[wanted].grad, expected[wanted], 1e-5, parity.ATOL_OF_MAX, f"d{wanted}")


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_scan_results_do_not_depend_on_the_thread_count(layout):
    from spatial_mamba.ops import selective_scan_fn

    def plain(u, delta, A, B, delta_bias, delta_softplus):
        return selective_scan_fn(u, delta, A, B, delta_bias=delta_bias, delta_softplus=delta_softplus)

    scan = in_layout(plain, layout, [0, 1])

    inputs, dhs = parity.scan_inputs(3, 70, 40, torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 3, 7):
            torch.set_num_threads(count)
            with backend.force("cpu"):
                hs, grads = parity.run_scan(scan, inputs, True, dhs)
            results.append((hs, *(grads[k] for k in sorted(grads))))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_kernels
def test_a_float32_model_trains_the_same_on_the_cpu_kernels_as_on_the_reference():
    # The whole model, forward and backward, through the three cpu ops against the same model on the reference.
    from spatial_mamba.models.spatial_mamba import SpatialMamba
    from spatial_mamba.models.ssm import StateFusion

    torch.manual_seed(0)
    model = SpatialMamba(dims=16, depths=(1, 1, 1, 1), num_classes=7, drop_path_rate=0.0).train()
    with torch.no_grad():  # random fusion weights, so that every tap and border row matters
        for module in model.modules():
            if isinstance(module, StateFusion):
                for p in (module.kernel_3, module.kernel_3_1, module.kernel_3_2, module.alpha):
                    p.copy_(torch.randn_like(p))
    x = torch.randn(2, 3, 44, 36)

    def run(name):
        model.zero_grad(set_to_none=True)
        with backend.force(name, "selective_scan"), backend.force(name, "fused_observation"):
            out = model(x)
            out.pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out, grads = run("cpu")
    out_ref, grads_ref = run("reference")
    assert not torch.equal(out, out_ref)  # two implementations really ran
    parity.assert_close(out, out_ref.double(), 1e-4, 1e-5, "logits")
    assert grads.keys() == grads_ref.keys() and any("kernel_3_2" in name for name in grads)
    # atol from the largest gradient of all: a convolution's bias before a BatchNorm has a gradient of rounding size.
    scale = max(g.abs().max().item() for g in grads_ref.values())
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-5 * scale, msg=name)


def test_describe_cpu_names_the_vector_extensions_the_kernels_width_depends_on(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "sse4_2 avx fma avx2")
    assert cpu_kernels.describe_cpu().endswith("(avx2 fma)")
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "avx512f avx2 fma avx512bw")
    assert cpu_kernels.describe_cpu().endswith("(avx2 fma avx512f)")
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "sse2")
    assert cpu_kernels.describe_cpu().endswith("(no SIMD flags)")


def _logging_compiler(tmp_path, seconds: float = 0.0) -> str:
    """A compiler that writes one line per compile to compiles.log, takes ``seconds`` per compile and writes a library
    that does not load (what is counted here is who compiles, not what)."""
    return _fake_compiler(
        tmp_path,
        "logging-g++",
        f'echo "compile $$" >> "{tmp_path}/compiles.log"\nsleep {seconds}\n'
        'while [ "$1" != "-o" ]; do shift; done\necho "not a library" > "$2"\n',
    )


def test_describing_the_backends_compiles_nothing(monkeypatch, tmp_path):
    from spatial_mamba import info

    monkeypatch.setenv(cpu_kernels.CXX_ENV, _logging_compiler(tmp_path))
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path / "cache"))
    status = backend.describe()["state_fusion"]["cpu"]
    report = info.report()
    assert not (tmp_path / "compiles.log").exists(), (tmp_path / "compiles.log").read_text()
    assert status.startswith("available: not compiled yet") and str(tmp_path / "cache") in status
    assert "-> on CPU tensors: cpu" in report


@pytest.mark.slow
def test_concurrent_processes_compile_once_per_machine(tmp_path):
    """Two processes (ranks of one job) ask for the kernels at once with an empty cache: one compiles while the
    other waits for it and reuses its library."""
    env = {
        **os.environ,
        cpu_kernels.CXX_ENV: _logging_compiler(tmp_path, seconds=3),
        cpu_kernels.CACHE_ENV: str(tmp_path / "cache"),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    code = "from spatial_mamba.ops.backends import cpu as cpu_kernels; print(cpu_kernels.available())"
    ranks = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in "01"]
    outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), outputs
    assert len((tmp_path / "compiles.log").read_text().splitlines()) == 1, outputs
    assert all("does not load" in output for output in outputs), outputs  # both found the one library
