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
