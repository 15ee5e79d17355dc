"""First-call time of ``torch.compile`` (default inductor backend) on the CPU, from an empty compile cache.

    .venv/bin/python benchmarks/compile_cpu.py --model narrow|spatial_mamba_tiny --mode train|eval
                                                [--img-size 224] [--batch 1]

One model and mode per process, so that nothing compiled earlier is reused: inductor's on-disk caches point at a new
temporary folder, removed at the end. ``narrow`` is the small model of the compile tests (dims 16, one block per
stage, 7 classes); ``spatial_mamba_tiny`` is Spatial-Mamba-T. ``train`` times forward, backward (of the mean
logsumexp of the logits) and an SGD step, with the model in training mode (the token mixer under activation
checkpointing, as by default); ``eval`` times a forward under ``torch.no_grad``. Prints the first call (tracing and
compilation included), the second call, and one eager call for comparison, in seconds. Shapes are static
(``dynamic=False``); the whole model is one graph (``fullgraph=True``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("narrow", "spatial_mamba_tiny"), required=True)
    parser.add_argument("--mode", choices=("train", "eval"), required=True)
    parser.add_argument("--img-size", type=int, default=None, help="default: 32 for narrow, 224 otherwise")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 for narrow, 1 otherwise")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="spatial_mamba_compile_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # before torch is imported
    os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    try:
        run(args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run(args):
    import torch

    import spatial_mamba

    torch.manual_seed(0)
    if args.model == "narrow":
        model = spatial_mamba.SpatialMamba(dims=16, depths=(1, 1, 1, 1), num_classes=7, drop_path_rate=0.0)
        size, batch = args.img_size or 32, args.batch or 2
    else:
        model = spatial_mamba.spatial_mamba_tiny()
        size, batch = args.img_size or 224, args.batch or 1
    model.train(args.mode == "train")
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size)

    def step(forward):
        start = time.perf_counter()
        if args.mode == "eval":
            with torch.no_grad():
                forward(x)
        else:
            optimizer.zero_grad()
            forward(x).logsumexp(1).mean().backward()
            optimizer.step()
        return time.perf_counter() - start

    first, second, eager = step(compiled), step(compiled), step(model)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model} {args.mode} batch {batch} "
        f"{size}x{size}: first compiled call {first:.1f} s, second {second:.2f} s, eager {eager:.2f} s"
    )


if __name__ == "__main__":
    main()
