"""CPU inference benchmark of Spatial-Mamba-T: PyTorch eager, torch.compile and ONNX Runtime, in one process.

    .venv/bin/python benchmarks/cpu_export.py --onnx model.onnx [--batch-sizes 1 8] [--img-size 224] [--iters 5] \\
        [--out benchmarks/results]

``--onnx`` is a file written by ``tools/export_onnx.py --model spatial_mamba_tiny`` (dynamic batch and size).
Prints the median forward time of each runtime per batch size and the ratios to eager, the largest logit difference
of the compiled model from eager, and torch.compile's compile time (its first call); writes ``cpu_export.json`` into
the ``--out`` folder. With ``--checkpoint`` (the one the file was exported from) the ONNX Runtime logits are compared
with eager too; without it the two hold different random weights and only the timings compare (the export tool
itself checks the file's logits).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import timm
import torch

import spatial_mamba  # noqa: F401  (registers spatial_mamba_* with timm)


def _median_time(fn, iters: int, warmup: int = 1) -> tuple:
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        out = fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", required=True, help="ONNX file from tools/export_onnx.py")
    parser.add_argument("--checkpoint", default=None, help="checkpoint the ONNX file was exported from")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", required=True, help="folder for cpu_export.json")
    args = parser.parse_args()
    if not Path(args.onnx).is_file():
        parser.error(f"--onnx file not found: {args.onnx!r}; write it with tools/export_onnx.py")

    import onnxruntime as ort

    torch.manual_seed(0)
    kwargs = {}
    if args.checkpoint:
        kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=args.checkpoint))
    model = timm.create_model("spatial_mamba_tiny", **kwargs).eval()
    session = ort.InferenceSession(args.onnx, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    compiled = torch.compile(model)

    results = {}
    compile_s = None
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            eager_s, eager_all, ref = _median_time(lambda x=x: model(x), args.iters)
            start = time.perf_counter()
            compiled(x)
            first_call = time.perf_counter() - start
            compile_s = first_call if compile_s is None else compile_s
            compiled_s, compiled_all, out_c = _median_time(lambda x=x: compiled(x), args.iters)
        feed = {name: x.numpy()}
        ort_s, ort_all, out_o = _median_time(lambda feed=feed: session.run(None, feed)[0], args.iters)
        results[str(batch)] = dict(
            eager_s=eager_s,
            compile_s=compiled_s,
            onnxruntime_s=ort_s,
            compile_speedup=eager_s / compiled_s,
            onnxruntime_speedup=eager_s / ort_s,
            compile_first_call_s=first_call,
            max_logit_diff_onnxruntime=float(np.abs(out_o - ref.numpy()).max()) if args.checkpoint else None,
            max_logit_diff_compile=float((out_c - ref).abs().max()),
            all_s=dict(eager=eager_all, compile=compiled_all, onnxruntime=ort_all),
        )
        r = results[str(batch)]
        print(
            f"batch {batch} @ {args.img_size}: eager {eager_s * 1e3:.0f} ms, torch.compile {compiled_s * 1e3:.0f} ms "
            f"({r['compile_speedup']:.2f}x), onnxruntime {ort_s * 1e3:.0f} ms ({r['onnxruntime_speedup']:.2f}x); "
            f"max |logit diff| compile {r['max_logit_diff_compile']:.2g}, onnxruntime {r['max_logit_diff_onnxruntime']}"
        )
    print(f"torch.compile first call (compilation) {compile_s:.0f} s")
    record = dict(
        benchmark="cpu_export",
        model="spatial_mamba_tiny",
        img_size=args.img_size,
        iters=args.iters,
        torch=torch.__version__,
        onnxruntime=ort.__version__,
        threads=torch.get_num_threads(),
        cpu=platform.machine(),
        cpu_count=os.cpu_count(),
        compile_first_call_s=compile_s,
        results=results,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_export.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out / 'cpu_export.json'}")


if __name__ == "__main__":
    main()
