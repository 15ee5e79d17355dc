"""Prints ptxas' register, spill and shared-memory figures for every kernel instantiation, as a Markdown table.

    python -m kernels.ptxas_report [--arch 90]

Compiles each .cu file of kernels/ with the flags of the extension build (-O3 --use_fast_math, C++20) for one
architecture and ``-Xptxas -v``; needs the CUDA toolkit (kernels/build.py finds it), no GPU. The table in
kernels/README.md comes from this script.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from kernels import build

ROOT = Path(__file__).resolve().parent.parent


def kernel_sources():
    return [source for sources in build.EXTENSIONS.values() for source in sources if source.endswith(".cu")]


def _demangle(name: str) -> str:
    result = subprocess.run(["c++filt", name], capture_output=True, text=True)
    text = result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else name
    text = text.replace("spatial_mamba::(anonymous namespace)::", "").replace("spatial_mamba::", "")
    text = text.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("void ", "")
    return re.sub(r"\(.*\)$", "", text)


def report(arch: str) -> list[tuple[str, str, int, int, int, int]]:
    """[(source, kernel, registers, spill store bytes, spill load bytes, static shared bytes)]."""
    nvcc = str(Path(build.find_cuda_home()) / "bin" / "nvcc")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in kernel_sources():
            command = [nvcc, "-std=c++20", "-O3", "--use_fast_math", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
            command += ["-Xptxas", "-v", f"-I{ROOT / 'kernels'}", "-c", str(ROOT / source), "-o", f"{tmp}/k.o"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"nvcc failed on {source}:\n{result.stderr[-4000:]}")
            name, spills = None, (0, 0)
            for line in result.stderr.splitlines():
                if match := re.search(r"Compiling entry function '(\S+)'", line):
                    name = _demangle(match.group(1))
                elif match := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
                    spills = (int(match.group(1)), int(match.group(2)))
                elif (match := re.search(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?$", line)) and name:
                    rows.append((Path(source).name, name, int(match.group(1)), *spills, int(match.group(2) or 0)))
                    name = None
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90", help="compute capability without the dot (default 90)")
    args = parser.parse_args(argv)
    print("| source | kernel | registers | spill stores (B) | spill loads (B) | static smem (B) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in report(args.arch):
        print("| " + " | ".join(str(value) for value in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
