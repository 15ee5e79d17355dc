"""Building the CUDA extensions: finding the toolkit (kernels/build.py), and compiling every extension.

The compile test needs the CUDA toolkit but no GPU. It runs ``setup.py build_ext`` with SPATIAL_MAMBA_BUILD_CUDA=1,
TORCH_CUDA_ARCH_LIST=9.0 and MAX_JOBS=2 into a temporary directory (a few minutes on 2 cores), then loads both
extensions (they link libcudart, which loads without a GPU), checks their functions, that they reject CPU
tensors with a clear error, and that spatial_mamba/ops/backends/cuda/ registers them (custom ops run on meta tensors
through their fake implementations, forward and backward). It is skipped, saying why, when no toolkit is found.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from kernels import build

ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = {
    "_selective_scan_cuda": ("fwd", "bwd", "split_segments"),
    "_dwconv2d_cuda": ("fwd", "dgrad", "wgrad"),
    "_state_fusion_cuda": ("fwd", "bwd", "observe_fwd", "observe_bwd"),
}


def write_script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def fake_toolkit(path: Path) -> Path:
    write_script(path / "bin" / "nvcc", "#!/bin/sh\n")
    (path / "lib64").mkdir()
    (path / "lib64" / "libcudart.so").write_text("")
    return path


@pytest.fixture
def no_cuda_env(monkeypatch, tmp_path):
    """No CUDA_HOME/CUDA_PATH, and no toolkit at the conventional place."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(build, "CONVENTIONAL_CUDA_HOME", tmp_path / "no-cuda-here")


def test_find_cuda_home_honours_cuda_home(tmp_path, monkeypatch):
    toolkit = fake_toolkit(tmp_path / "toolkit")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert build.find_cuda_home() == str(toolkit)


def test_find_cuda_home_rejects_a_cuda_home_that_is_no_toolkit(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match=re.escape(f"CUDA_HOME={tmp_path} is not a CUDA toolkit")):
        build.find_cuda_home()


def test_find_cuda_home_follows_an_nvcc_wrapper_script(tmp_path, monkeypatch, no_cuda_env):
    toolkit = fake_toolkit(tmp_path / "opt" / "cuda-13.0")
    write_script(tmp_path / "wrappers" / "nvcc", f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    monkeypatch.setenv("PATH", str(tmp_path / "wrappers"))
    assert build.find_cuda_home() == str(toolkit)


def test_find_cuda_home_tries_the_cuda_directory_beside_the_wrapper(tmp_path, monkeypatch, no_cuda_env):
    toolkit = fake_toolkit(tmp_path / "usr" / "local" / "cuda")
    write_script(tmp_path / "usr" / "local" / "bin" / "nvcc", '#!/bin/sh\nexec "$REAL_NVCC" "$@"\n')
    monkeypatch.setenv("PATH", str(tmp_path / "usr" / "local" / "bin"))
    assert build.find_cuda_home() == str(toolkit)


def test_find_cuda_home_follows_a_symlinked_nvcc(tmp_path, monkeypatch, no_cuda_env):
    toolkit = fake_toolkit(tmp_path / "toolkit")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(tmp_path / "links"))
    assert build.find_cuda_home() == os.path.realpath(toolkit)


def test_find_cuda_home_names_every_place_it_looked(tmp_path, monkeypatch, no_cuda_env):
    write_script(tmp_path / "wrappers" / "nvcc", "#!/bin/sh\nexec /nowhere/bin/nvcc\n")
    monkeypatch.setenv("PATH", str(tmp_path / "wrappers"))
    with pytest.raises(RuntimeError) as error:
        build.find_cuda_home()
    message = str(error.value)
    for looked_at in ("/nowhere", str(tmp_path / "cuda"), str(tmp_path / "no-cuda-here"), "Set CUDA_HOME"):
        assert looked_at in message


@pytest.fixture
def plan_env(tmp_path, monkeypatch):
    """A fake toolkit as CUDA_HOME; the process's CUDA_HOME, PATH, arch list and cpp_extension are restored after."""
    toolkit = fake_toolkit(tmp_path / "toolkit")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
    return toolkit


def test_cuda_build_plan_builds_both_extensions_against_the_found_toolkit(plan_env):
    ext_modules, cmdclass = build.cuda_build_plan()

    assert cmdclass["build_ext"] is cpp_extension.BuildExtension
    assert cpp_extension.CUDA_HOME == str(plan_env)
    assert {ext.name for ext in ext_modules} == set(build.EXTENSIONS)
    for ext in ext_modules:
        assert all((ROOT / source).is_file() for source in ext.sources), ext.sources
        assert str(plan_env / "lib64") in ext.library_dirs
        assert "-std=c++20" in ext.extra_compile_args["cxx"] and "-std=c++20" in ext.extra_compile_args["nvcc"]
        assert "--use_fast_math" in ext.extra_compile_args["nvcc"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU visible, torch builds for that GPU's arch")
def test_cuda_build_plan_builds_for_ampere_and_hopper_with_ptx_when_no_gpu_is_visible(plan_env):
    ext_modules, _ = build.cuda_build_plan()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == build.DEFAULT_ARCH_LIST == "8.0;9.0+PTX"
    # What the bindings record (their cuda_archs), read by spatial_mamba/ops/backends/cuda/ before each launch.
    for ext in ext_modules:
        assert "-DSPATIAL_MAMBA_CUDA_ARCHS=sm80_sm90_compute90" in ext.extra_compile_args["cxx"]


def test_cuda_build_plan_records_the_architectures_the_user_asked_for(plan_env, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6 9.0a")
    ext_modules, _ = build.cuda_build_plan()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6 9.0a"
    assert "-DSPATIAL_MAMBA_CUDA_ARCHS=sm86_sm90a" in ext_modules[0].extra_compile_args["cxx"]


def test_arch_tag_names_machine_code_before_ptx():
    flags = ["-gencode=arch=compute_90,code=compute_90", "-gencode=arch=compute_90,code=sm_90"]
    flags.append("-gencode=arch=compute_80,code=sm_80")
    assert build.arch_tag(flags) == "sm80_sm90_compute90"
    with pytest.raises(RuntimeError, match="no CUDA architecture"):
        build.arch_tag(["-O3"])


@pytest.fixture(scope="module")
def built_extensions(tmp_path_factory):
    """The extensions compiled by setup.py into a temporary directory: ({name: path of the .so}, build log)."""
    try:
        cuda_home = build.find_cuda_home()
    except RuntimeError as error:
        pytest.skip(f"no CUDA toolkit to compile with: {error}")
    out = tmp_path_factory.mktemp("cuda_build")
    env = dict(os.environ, SPATIAL_MAMBA_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS="2", CUDA_HOME=cuda_home)
    command = [sys.executable, "setup.py", "build_ext", "--build-lib", str(out / "lib"), "--build-temp", str(out)]
    start = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    print(f"setup.py build_ext compiled the CUDA extensions in {time.monotonic() - start:.0f} s")
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"build failed:\n{log[-8000:]}"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    return {name: out / "lib" / "spatial_mamba" / f"{name}{suffix}" for name in FUNCTIONS}, log


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_extensions_are_compiled_for_sm90_with_the_flags_of_the_plan(built_extensions):
    paths, log = built_extensions
    assert all(path.is_file() for path in paths.values()), paths
    compiles = [line for line in log.splitlines() if "nvcc" in line and " -c " in line]
    assert len(compiles) == sum(source.endswith(".cu") for sources in build.EXTENSIONS.values() for source in sources)
    for line in compiles:
        assert "-gencode=arch=compute_90,code=sm_90" in line and "--use_fast_math" in line and "-O3" in line, line


@pytest.mark.slow
def test_extensions_load_without_a_gpu_and_expose_their_functions(built_extensions):
    for name, path in built_extensions[0].items():
        module = load(name, path)
        for function in FUNCTIONS[name]:
            assert callable(getattr(module, function)), f"{name}.{function}"
        assert module.cuda_archs == "sm90", name  # built with TORCH_CUDA_ARCH_LIST=9.0


@pytest.mark.slow
def test_extensions_reject_cpu_tensors_with_a_clear_error(built_extensions):
    paths = built_extensions[0]
    scan = load("_selective_scan_cuda", paths["_selective_scan_cuda"])
    u = torch.zeros(1, 2, 3)
    with pytest.raises(RuntimeError, match="selective_scan \\(cuda\\): u must be a CUDA tensor"):
        scan.fwd(u, u, torch.zeros(2, 1), torch.zeros(1, 1, 3), None, True)
    conv = load("_dwconv2d_cuda", paths["_dwconv2d_cuda"])
    x = torch.zeros(1, 2, 4, 4)
    with pytest.raises(RuntimeError, match="dwconv2d \\(cuda\\): x must be a CUDA tensor"):
        conv.fwd(x, torch.zeros(2, 1, 3, 3), 1)
    fusion = load("_state_fusion_cuda", paths["_state_fusion_cuda"])
    with pytest.raises(RuntimeError, match="state_fusion \\(cuda\\): h must be a CUDA tensor"):
        fusion.fwd(x, torch.zeros(2, 25))
    with pytest.raises(RuntimeError, match="fused_observation \\(cuda\\): h must be a CUDA tensor"):
        fusion.observe_fwd(x, torch.zeros(2, 25), torch.zeros(1, 4, 4), x, torch.zeros(2))


@pytest.mark.slow
def test_built_scan_extension_splits_detection_rows_as_the_rule_says(built_extensions):
    # The binding's split rule (the one the emulation tests check): 8 segments at batch 2, D 128, 66,600 tokens on a
    # 132-SM GPU; none for classification at batch 128.
    scan = load("_selective_scan_cuda", built_extensions[0]["_selective_scan_cuda"])
    assert scan.split_segments(2, 128, 66_600, 132) == 8
    assert scan.split_segments(128, 128, 3_136, 132) == 1


REGISTRATION_CHECK = """
import torch
from spatial_mamba.ops import backend

for op, extension in (
    ("selective_scan", "_selective_scan_cuda"),
    ("dwconv2d", "_dwconv2d_cuda"),
    ("state_fusion", "_state_fusion_cuda"),
    ("fused_observation", "_state_fusion_cuda"),
):
    impl = backend._REGISTRY[op]["cuda"]
    assert impl.available() == (True, f"compiled extension spatial_mamba.{extension}"), impl.available()

# Meta tensors run the custom ops' fake implementations, forward and backward: shapes and dtypes, no GPU.
meta = dict(device="meta", requires_grad=True)
u, delta = torch.empty(2, 4, 10, dtype=torch.bfloat16, **meta), torch.empty(2, 4, 10, dtype=torch.bfloat16, **meta)
A, B, bias = torch.empty(4, 1, **meta), torch.empty(2, 1, 10, dtype=torch.bfloat16, **meta), torch.empty(4, **meta)
hs = backend._REGISTRY["selective_scan"]["cuda"].fn(u, delta, A, B, bias, True)
assert (hs.shape, hs.dtype) == ((2, 4, 1, 10), torch.float32)
hs.sum().backward()
for t in (u, delta, A, B, bias):
    assert (t.grad.shape, t.grad.dtype) == (t.shape, t.dtype)

x, w = torch.empty(2, 3, 7, 9, dtype=torch.float16, **meta), torch.empty(3, 1, 11, 11, **meta)
y = backend._REGISTRY["dwconv2d"]["cuda"].fn(x, w, 1)
assert (y.shape, y.dtype) == (x.shape, x.dtype)
y.sum().backward()
assert (x.grad.shape, x.grad.dtype, w.grad.shape, w.grad.dtype) == (x.shape, x.dtype, w.shape, w.dtype)

h, taps = torch.empty(2, 3, 7, 9, dtype=torch.bfloat16, **meta), torch.empty(3, 25, **meta)
out = backend._REGISTRY["state_fusion"]["cuda"].fn(h, taps)
assert (out.shape, out.dtype) == (h.shape, h.dtype)
out.sum().backward()
assert (h.grad.shape, h.grad.dtype, taps.grad.shape, taps.grad.dtype) == (h.shape, h.dtype, taps.shape, taps.dtype)

# The fused observation: float32 states beside bfloat16 u and C (autocast); every gradient, then only dC.
h, taps, D = torch.empty(2, 3, 7, 9, **meta), torch.empty(3, 25, **meta), torch.empty(3, **meta)
C, u = torch.empty(2, 7, 9, dtype=torch.bfloat16, **meta), torch.empty(2, 3, 7, 9, dtype=torch.bfloat16, **meta)
y = backend._REGISTRY["fused_observation"]["cuda"].fn(h, taps, C, u, D)
assert (y.shape, y.dtype) == (h.shape, h.dtype)
y.sum().backward()
for t in (h, taps, C, u, D):
    assert (t.grad.shape, t.grad.dtype) == (t.shape, t.dtype)
C_only = torch.empty(2, 7, 9, dtype=torch.float16, **meta)
u_fixed = torch.empty(2, 3, 7, 9, dtype=torch.float16, device="meta")
fused = backend._REGISTRY["fused_observation"]["cuda"].fn
fused(h.detach(), taps.detach(), C_only, u_fixed, D.detach()).sum().backward()
assert (C_only.grad.shape, C_only.grad.dtype) == (C_only.shape, C_only.dtype)
print("registered")
"""


@pytest.mark.slow
def test_built_extensions_register_custom_ops_and_backends(built_extensions, tmp_path):
    """A copy of the package with the built extensions beside it, imported by a child process."""
    package = tmp_path / "spatial_mamba"
    shutil.copytree(ROOT / "spatial_mamba", package, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for path in built_extensions[0].values():
        shutil.copy(path, package / path.name)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", REGISTRATION_CHECK], cwd=tmp_path, env=env, capture_output=True)
    assert result.returncode == 0 and b"registered" in result.stdout, result.stderr.decode()[-4000:]
