"""The package as users install it: the source distribution, the wheel built from it, and that wheel at work in a
virtual environment that does not see this repository.

The environment takes torch, timm and the other dependencies from the interpreter running the tests (a path entry,
so that nothing is downloaded), and spatial_mamba only from the installed wheel: the repository is neither on its
path nor its working directory, and the editable install of the development environment is not loaded.
"""

import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# What a GPU build from the sdist compiles (kernels/build.py's sources and headers) and what the CPU kernels compile
# at their first use (package data).
CUDA_SOURCES = [
    "setup.py",
    "kernels/__init__.py",
    "kernels/build.py",
    "kernels/common/float_io.cuh",
    "kernels/selective_scan/selective_scan.cpp",
    "kernels/selective_scan/selective_scan_fwd.cu",
    "kernels/selective_scan/selective_scan_bwd.cu",
    "kernels/dwconv2d/dwconv2d.cpp",
    "kernels/state_fusion/state_fusion.cpp",
    "kernels/state_fusion/state_fusion_kernels.cu",
    "kernels/state_fusion/observation_kernels.cu",
]
CPU_SOURCES = [
    "spatial_mamba/ops/backends/cpu/selective_scan.cpp",
    "spatial_mamba/ops/backends/cpu/state_fusion.cpp",
    "spatial_mamba/ops/backends/cpu/simd.h",
]


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel built from that sdist, wheel built from the checkout)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)])
    (sdist,) = out.glob("spatial_mamba-*.tar.gz")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    _run([*pip_wheel, "-w", str(out / "from_sdist"), str(sdist)])
    _run([*pip_wheel, "-w", str(out / "from_checkout"), str(ROOT)])
    (from_sdist,) = (out / "from_sdist").glob("*.whl")
    (from_checkout,) = (out / "from_checkout").glob("*.whl")
    return sdist, from_sdist, from_checkout


def test_sdist_carries_the_cuda_and_cpu_kernel_sources(dists):
    sdist = dists[0]
    with tarfile.open(sdist) as archive:
        top = sdist.name[: -len(".tar.gz")]
        names = {name[len(top) + 1 :] for name in archive.getnames()}
    missing = [name for name in CUDA_SOURCES + CPU_SOURCES if name not in names]
    assert not missing, f"{sdist.name} lacks {missing}"
    assert not [name for name in names if name.endswith((".so", ".pyc"))]


def test_wheel_holds_the_package_and_its_kernel_sources_and_nothing_of_the_repository(dists):
    _, from_sdist, from_checkout = dists
    with zipfile.ZipFile(from_sdist) as archive:
        names = set(archive.namelist())
    with zipfile.ZipFile(from_checkout) as archive:
        assert set(archive.namelist()) == names, "pip wheel . and the wheel built from the sdist differ"
    assert {"spatial_mamba/__init__.py", "spatial_mamba/compat.py", "openmmlab_tools/__init__.py"} <= names
    assert set(CPU_SOURCES) <= names
    tops = {name.split("/")[0] for name in names}
    assert tops == {"spatial_mamba", "openmmlab_tools", *(t for t in tops if t.endswith(".dist-info"))}, tops


def _venv_with_wheel(tmp_path: Path, wheel: Path) -> Path:
    """A virtual environment with the wheel installed and this interpreter's dependencies on its path."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # A plain path line: unlike a site directory, it does not run the .pth files there (the editable install's hook).
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)])
    return python


TRAIN_AND_EVALUATE = """
    import sys
    from pathlib import Path

    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    import spatial_mamba
    from spatial_mamba.ops import backend
    from spatial_mamba.ops.backends import cpu as cpu_kernels

    site = Path(sys.argv[1])
    assert Path(spatial_mamba.__file__).resolve().is_relative_to(site.resolve()), spatial_mamba.__file__
    assert not any(Path(p).resolve() == Path(sys.argv[2]).resolve() for p in sys.path if p), sys.path

    # Digits, 8x8 grey levels upsampled to 32x32: 1,400 to train on, 397 held out.
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]

    torch.manual_seed(0)
    model = spatial_mamba.SpatialMamba(dims=16, depths=(1, 1, 1, 1), num_classes=10, drop_path_rate=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for epoch in range(3):
        for batch in train[torch.randperm(len(train))].split(50):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
    probe = torch.zeros(1, 2, 3, dtype=torch.float32)
    print("backend", backend.explain("selective_scan", probe, probe, -torch.ones(2, 1), torch.zeros(1, 1, 3)).backend)
    print("libraries", len(list(cpu_kernels.cache_dir().glob("*.so"))))
    print("accuracy", accuracy)
"""


def test_installed_wheel_builds_its_cpu_kernels_reports_and_learns_without_the_repository(dists, tmp_path):
    python = _venv_with_wheel(tmp_path, dists[1])
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPATIAL_MAMBA_BACKEND")}
    env["SPATIAL_MAMBA_CACHE"] = str(tmp_path / "cache")
    info = _run([str(python), "-m", "spatial_mamba.info"], cwd=work, env=env).stdout
    assert "-> on CPU tensors: cpu" in info, info
    script = work / "train.py"
    script.write_text(textwrap.dedent(TRAIN_AND_EVALUATE))
    out = _run([str(python), str(script), str(site), str(ROOT)], cwd=work, env=env).stdout
    results = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert results["backend"] == "cpu", out
    assert int(results["libraries"]) >= 1, out  # compiled from the installed package data into the cache
    assert float(results["accuracy"]) >= 0.5, out  # ten classes: chance is 0.1
