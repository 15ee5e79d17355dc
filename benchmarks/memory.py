"""Training memory of Spatial-Mamba-T/S/B against timm's Swin-T/S/B and ConvNeXt-T.

    python benchmarks/memory.py [--models T S B] [--batch-size 8] [--img-size 224]
        [--out benchmarks/results/memory.json]

The count: one forward pass in training mode (float32, random data) under ``torch.autograd.graph.saved_tensors_hooks``,
adding up the bytes of every storage that autograd keeps for the backward, each storage once, plus the parameters.
It does not depend on the device or the allocator, and it is deterministic. On a CUDA machine the script also
measures ``torch.cuda.max_memory_allocated`` of a whole training step (forward, backward, SGD) at batch 128 under
bfloat16 autocast. Prints the table and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Dict

import timm
import torch

import spatial_mamba  # noqa: F401  (registers spatial_mamba_* with timm)

MiB = 2**20
MODELS = {
    "T": ("spatial_mamba_tiny", "swin_tiny_patch4_window7_224"),
    "S": ("spatial_mamba_small", "swin_small_patch4_window7_224"),
    "B": ("spatial_mamba_base", "swin_base_patch4_window7_224"),
}
EXTRA_PEERS = ("convnext_tiny",)


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """Bytes kept for the backward by one training forward of ``model`` on ``x``: activations and parameters.

    Every storage is counted once, however many tensors (views) autograd saved of it; a parameter saved for the
    backward is counted with the parameters, not the activations.
    """
    params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    saved: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
    del out
    return {"activations": sum(saved.values()), "parameters": sum(params.values())}


def count(name: str, batch: int, img_size: int) -> Dict[str, float]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000)
    sizes = saved_bytes(model, torch.randn(batch, 3, img_size, img_size))
    return {
        "saved_MiB": (sizes["activations"] + sizes["parameters"]) / MiB,
        "activations_MiB": sizes["activations"] / MiB,
        "parameters_MiB": sizes["parameters"] / MiB,
    }


def cuda_peak(name: str, batch: int = 128, img_size: int = 224) -> float:
    """``torch.cuda.max_memory_allocated`` (MiB) of one training step under bfloat16 autocast, after a warm-up step."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).cuda().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, img_size, img_size, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    for step in range(2):
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / MiB
    del model, optimizer, x, y
    torch.cuda.empty_cache()
    return peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.img_size < 32:
        parser.error(f"--batch-size must be >= 1 and --img-size >= 32; got {args.batch_size}, {args.img_size}")

    names = [name for size in args.models for name in MODELS[size]] + list(EXTRA_PEERS)
    results = {}
    print(f"saved for the backward, batch {args.batch_size}, {args.img_size}x{args.img_size}, float32 (MiB)")
    for name in names:
        results[name] = count(name, args.batch_size, args.img_size)
        if torch.cuda.is_available():
            results[name]["cuda_max_allocated_bf16_b128_MiB"] = cuda_peak(name)
        print(
            f"{name:<34} {results[name]['saved_MiB']:9.1f}  (activations {results[name]['activations_MiB']:.1f})"
            + (
                f"  cuda peak {results[name]['cuda_max_allocated_bf16_b128_MiB']:.0f}"
                if torch.cuda.is_available()
                else ""
            ),
            flush=True,
        )
    ratios = {}
    for size in args.models:
        ours, swin = MODELS[size]
        ratios[size] = results[ours]["saved_MiB"] / results[swin]["saved_MiB"]
        print(f"Spatial-Mamba-{size} / Swin-{size}: {ratios[size]:.2f}")
    report = {
        "benchmark": "memory",
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "results": results,
        "ratio_to_swin": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
