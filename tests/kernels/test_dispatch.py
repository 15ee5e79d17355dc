"""The dispatcher (spatial_mamba/ops/backend.py): backends declare what they support, the walk (cuda -> triton ->
reference on CUDA tensors, cpu -> reference on CPU tensors) hands inputs a backend cannot take to the next one, a
backend of the CPU walk that cannot run at all is a warning once per process, and ``backend.force`` pins one
backend."""

import threading
import warnings

import pytest
import torch

from spatial_mamba.ops import backend, selective_scan_fn


def _impl(name):
    def fn(*args):
        return name

    return fn


@pytest.fixture
def toy(monkeypatch):
    """A toy op 'toy' whose cuda backend takes only float32 and whose triton backend takes only 3-D inputs; the
    tensors count as CUDA tensors (the walk over GPU backends is what is tested)."""
    monkeypatch.setattr(backend, "_REGISTRY", dict(backend._REGISTRY))
    monkeypatch.setattr(backend, "_on_cuda", lambda tensors: True)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    backend.register("toy", "reference", _impl("reference"))
    backend.register(
        "toy", "cuda", _impl("cuda"), supports=lambda x: [] if x.dtype == torch.float32 else [f"{x.dtype} input"]
    )
    backend.register("toy", "triton", _impl("triton"), supports=lambda x: [] if x.dim() == 3 else ["not 3-D"])
    return "toy"


def test_first_backend_that_supports_the_inputs_wins(toy):
    assert backend.choose(toy, torch.zeros(1, 2, 3))[0] == "cuda"
    choice = backend.explain(toy, torch.zeros(1, 2, 3, dtype=torch.float16))
    assert choice.backend == "triton"
    assert choice.passed_over == {"cuda": ["torch.float16 input"]}


def test_falling_back_to_the_reference_on_a_gpu_warns_with_every_reason(toy):
    x = torch.zeros(2, 3, dtype=torch.float16)
    backend._ANNOUNCED.discard((toy, "reference"))
    with pytest.warns(RuntimeWarning, match=r"reference .*cuda: torch.float16 input; triton: not 3-D"):
        assert backend.choose(toy, x)[0] == "reference"


def test_force_pins_a_backend_and_nests(toy):
    x = torch.zeros(1, 2, 3)
    with backend.force("reference"):
        assert backend.choose(toy, x)[0] == "reference"
        with backend.force("triton", toy):
            assert backend.choose(toy, x)[0] == "triton"
        assert backend.choose(toy, x)[0] == "reference"
    assert backend.choose(toy, x)[0] == "cuda"


def test_force_for_another_op_leaves_this_one_alone(toy):
    with backend.force("reference", "selective_scan"):
        assert backend.choose(toy, torch.zeros(1, 2, 3))[0] == "cuda"


def test_force_overrides_the_environment_variable(toy, monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert backend.choose(toy, torch.zeros(1, 2, 3))[0] == "reference"
    with backend.force("triton"):
        assert backend.choose(toy, torch.zeros(1, 2, 3))[0] == "triton"


def test_forced_backend_that_cannot_take_the_inputs_raises_with_the_reason(toy):
    with backend.force("triton"), pytest.raises(RuntimeError, match=r"backend.force\('triton'\) .* not 3-D"):
        backend.choose(toy, torch.zeros(2, 3))


def test_force_is_per_thread(toy):
    seen = []
    with backend.force("reference"):
        thread = threading.Thread(target=lambda: seen.append(backend.choose(toy, torch.zeros(1, 2, 3))[0]))
        thread.start()
        thread.join()
    assert seen == ["cuda"]


def test_force_rejects_unknown_backends():
    with pytest.raises(ValueError, match="force\\(backend\\) must be one of cuda, triton, cpu, reference, got 'cudnn'"):
        with backend.force("cudnn"):
            pass


def test_unknown_op_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        backend.choose("nope", torch.zeros(1))


@pytest.fixture
def toy_cpu(monkeypatch):
    """A toy op 'toy_cpu' with a cpu backend that takes only float32 (its availability is ``state['available']``),
    a cuda backend and the reference; the tensors are CPU tensors."""
    monkeypatch.setattr(backend, "_REGISTRY", dict(backend._REGISTRY))
    monkeypatch.setattr(backend, "_WARNED_UNAVAILABLE", set())
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    state = {"available": (True, "built")}
    backend.register("toy_cpu", "reference", _impl("reference"))
    backend.register("toy_cpu", "cuda", _impl("cuda"))
    backend.register(
        "toy_cpu",
        "cpu",
        _impl("cpu"),
        lambda: state["available"],
        supports=lambda x: [] if x.dtype == torch.float32 else [f"{x.dtype} input"],
    )
    return state


def test_cpu_tensors_walk_the_cpu_backend_then_the_reference(toy_cpu):
    assert backend.choose("toy_cpu", torch.zeros(2))[0] == "cpu"
    choice = backend.explain("toy_cpu", torch.zeros(2, dtype=torch.float64))
    assert (choice.backend, choice.passed_over, choice.unavailable) == (
        "reference",
        {"cpu": ["torch.float64 input"]},
        {},
    )


def test_a_cpu_decline_for_the_inputs_is_silent(toy_cpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.choose("toy_cpu", torch.zeros(2, dtype=torch.float64))[0] == "reference"


def test_an_unavailable_cpu_backend_warns_once_with_its_reason(toy_cpu):
    toy_cpu["available"] = (False, "g++ failed to compile state_fusion.cpp: error: boom")
    with pytest.warns(RuntimeWarning, match=r"the cpu backend is unavailable \(g\+\+ failed .*boom\)"):
        assert backend.choose("toy_cpu", torch.zeros(2))[0] == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.choose("toy_cpu", torch.zeros(2))[0] == "reference"


def test_an_input_decline_comes_before_the_availability_check(toy_cpu):
    # float64 inputs never ask whether the kernels can be built (that would start their compile).
    def never():
        raise AssertionError("available() was called")

    backend._REGISTRY["toy_cpu"]["cpu"].available = never
    assert backend.choose("toy_cpu", torch.zeros(2, dtype=torch.float64))[0] == "reference"


def test_cuda_tensors_never_walk_the_cpu_backend(toy_cpu, monkeypatch):
    monkeypatch.setattr(backend, "_on_cuda", lambda tensors: True)
    choice = backend.explain("toy_cpu", torch.zeros(2))
    assert choice.backend == "cuda" and choice.passed_over == {}
    backend._REGISTRY["toy_cpu"]["cuda"].available = lambda: (False, "not built")
    choice = backend.explain("toy_cpu", torch.zeros(2))
    assert choice.backend == "reference" and "cpu" not in choice.passed_over
    with backend.force("cpu"), pytest.raises(RuntimeError, match="on a CUDA device"):
        backend.choose("toy_cpu", torch.zeros(2))


def test_the_reference_can_be_forced_over_the_cpu_backend(toy_cpu, monkeypatch):
    with backend.force("reference"):
        assert backend.choose("toy_cpu", torch.zeros(2))[0] == "reference"
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert backend.choose("toy_cpu", torch.zeros(2))[0] == "reference"
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    assert backend.choose("toy_cpu", torch.zeros(2))[0] == "cpu"


def test_cpu_tensors_run_on_the_reference_unless_forced():
    # dwconv2d has no cpu backend; float64 inputs are the reference's whatever the op.
    choice = backend.explain("dwconv2d", torch.zeros(1, 2, 3, 3), torch.zeros(2, 1, 3, 3))
    assert (choice.backend, choice.why, choice.passed_over) == ("reference", "CPU tensors", {})
    choice = backend.explain("selective_scan", torch.zeros(1, 2, 3, dtype=torch.float64))
    assert (choice.backend, choice.why) == ("reference", "CPU tensors")
    assert "float64 inputs" in choice.passed_over["cpu"][0]


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_scan_kernels_decline_d_state_above_one_and_float64(name):
    u = torch.zeros(1, 3, 5)
    supports = backend._REGISTRY["selective_scan"][name].supports
    assert supports(u, u, torch.zeros(3, 1), torch.zeros(1, 1, 5), None) == []
    assert supports(u, u, torch.zeros(3, 2), torch.zeros(1, 2, 5), None) == [
        "d_state N = 2 (the kernels handle N = 1 only)"
    ]
    assert "float64 inputs" in supports(u.double(), u.double(), torch.zeros(3, 1), None, None)[0]


def test_cuda_dwconv_declines_kernel_sizes_without_kernels():
    supports = backend._REGISTRY["dwconv2d"]["cuda"].supports
    assert supports(torch.zeros(1, 2, 4, 4), torch.zeros(2, 1, 11, 11)) == []
    assert supports(torch.zeros(1, 2, 4, 4), torch.zeros(2, 1, 13, 13)) == [
        "kernel size 13 (the kernels handle (3, 5, 7, 9, 11))"
    ]


def test_d_state_above_one_on_a_forced_kernel_backend_names_the_reason(monkeypatch):
    monkeypatch.setattr(backend, "_on_cuda", lambda tensors: True)  # as if on a GPU; the kernels are never called
    monkeypatch.setattr(backend._REGISTRY["selective_scan"]["triton"], "available", lambda: (True, "triton"))
    u = torch.zeros(1, 3, 5)
    with backend.force("triton"), pytest.raises(RuntimeError, match=r"d_state N = 2"):
        selective_scan_fn(u, u, -torch.ones(3, 2), torch.zeros(1, 2, 5))


def test_registered_lists_backends_in_dispatch_order():
    assert backend.registered("selective_scan")[-1] == "reference"
    assert backend.implementation("selective_scan", "reference") is backend._REGISTRY["selective_scan"]["reference"].fn
    with pytest.raises(KeyError, match="no 'cuda' implementation of 'nope'"):
        backend.implementation("nope", "cuda")


# ------------------------------------------------------------------------ a GPU the CUDA build has no code for


@pytest.fixture
def hopper_only_build(monkeypatch):
    """As if the state fusion extension were built for sm_90 only (kernels/build.py's tag) and loaded, Triton were
    usable, and every tensor sat on an sm_80 GPU (A100). Nothing is launched: the kernels are never called."""
    from types import SimpleNamespace

    from spatial_mamba.ops.backends import cuda as _cuda

    extension = SimpleNamespace(cuda_archs="sm90")
    monkeypatch.setitem(_cuda._EXTENSIONS, "_state_fusion_cuda", (extension, "compiled extension (stand-in)"))
    monkeypatch.setattr(_cuda, "_device_capability", lambda t: (8, 0) if isinstance(t, torch.Tensor) else None)
    monkeypatch.setattr(backend, "_on_cuda", lambda tensors: True)
    monkeypatch.setattr(backend._REGISTRY["state_fusion"]["triton"], "available", lambda: (True, "triton"))
    monkeypatch.setattr(backend, "_ANNOUNCED", set())
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    return extension


def test_a_gpu_missing_from_the_build_goes_to_triton_with_a_warning_naming_both(hopper_only_build):
    h, taps = torch.zeros(1, 2, 5, 5), torch.zeros(2, 25)
    assert backend.is_available("state_fusion", "cuda")[0]
    with pytest.warns(RuntimeWarning, match=r"state_fusion runs on the triton") as caught:
        assert backend.choose("state_fusion", h, taps)[0] == "triton"
    message = str(caught[0].message)
    assert "built for sm_90" in message and "(sm_80) cannot run" in message and "TORCH_CUDA_ARCH_LIST=8.0" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per op and backend
        backend.choose("state_fusion", h, taps)


def test_the_same_build_serves_the_gpus_it_has_code_for(hopper_only_build, monkeypatch):
    from spatial_mamba.ops.backends import cuda as _cuda

    h, taps = torch.zeros(1, 2, 5, 5), torch.zeros(2, 25)
    monkeypatch.setattr(_cuda, "_device_capability", lambda t: (9, 0) if isinstance(t, torch.Tensor) else None)
    assert backend.explain("state_fusion", h, taps).backend == "cuda"
    hopper_only_build.cuda_archs = ""  # an extension built before architectures were recorded
    choice = backend.explain("state_fusion", h, taps)
    assert choice.backend == "triton" and "does not record the GPUs it was built for" in choice.passed_over["cuda"][0]


@pytest.mark.parametrize(
    "archs, capability, runs",
    [
        ("sm80_sm90_compute90", (8, 0), True),
        ("sm80_sm90_compute90", (8, 9), True),  # sm_80 machine code runs on every 8.x GPU
        ("sm80_sm90_compute90", (7, 5), False),
        ("sm80_sm90_compute90", (10, 0), True),  # the compute_90 PTX, compiled by the driver
        ("sm80_sm90", (10, 0), False),
        ("sm86", (8, 0), False),  # machine code of a higher minor version does not run
        ("sm90a", (9, 0), True),
        ("sm90a_sm100a", (10, 3), False),  # arch-specific code runs on that GPU only
    ],
)
def test_which_gpus_a_build_runs_on(archs, capability, runs):
    from spatial_mamba.ops.backends import cuda as _cuda

    assert _cuda.runs_on(archs, capability) is runs


def test_cuda_fusion_passes_planes_beyond_its_grid_to_the_next_backend():
    from spatial_mamba.ops.backends import cuda as _cuda

    supports = backend._REGISTRY["state_fusion"]["cuda"].supports
    huge = torch.empty(1, 1, 2**13, 2**13 + 1, device="meta")  # 256 x 257 tiles of 32 x 32
    assert any("the cuda kernels take 65535" in reason for reason in supports(huge, torch.empty(1, 25)))
    assert _cuda._fusion_grid_reasons(torch.empty(2, 3, 56, 56, device="meta")) == []
    many = torch.empty(2**16, 2**15, 1, 1, device="meta")
    assert _cuda._fusion_grid_reasons(many) == ["65536 x 32768 planes (the cuda kernels take fewer than 2**31)"]


# ------------------------------------------------------------------ a GPU run cannot pass without the kernels


def test_gpu_tests_fail_when_a_gpu_has_no_kernels_unless_allowed(monkeypatch):
    from .gpu import ALLOW_MISSING, require_cuda_kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend._REGISTRY["state_fusion"]["cuda"], "available", lambda: (False, "extension not built"))
    monkeypatch.delenv(ALLOW_MISSING, raising=False)
    with pytest.raises(pytest.fail.Exception, match=r"a GPU is present but the CUDA kernels are not \(.*state_fusion"):
        require_cuda_kernels("state_fusion")
    monkeypatch.setenv(ALLOW_MISSING, "1")
    with pytest.raises(pytest.skip.Exception, match="allowed by SPATIAL_MAMBA_ALLOW_MISSING_CUDA=1"):
        require_cuda_kernels("state_fusion")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(ALLOW_MISSING)
    with pytest.raises(pytest.skip.Exception, match="needs a CUDA GPU"):
        require_cuda_kernels("state_fusion")
