"""The models section: inference and training throughput and peak memory of timm models under AMP bfloat16."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict

import timm
import torch
import torch.nn.functional as F

import spatial_mamba  # noqa: F401  (registers spatial_mamba_* with timm)

if TYPE_CHECKING:
    from .report import Run

NUM_CLASSES = 1000
DEFAULT_MODELS = (
    "spatial_mamba_tiny",
    "spatial_mamba_small",
    "spatial_mamba_base",
    "swin_tiny_patch4_window7_224",
    "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224",
    "convnext_tiny",
)
SMOKE_MODELS = ("spatial_mamba_tiny", "swin_tiny_patch4_window7_224")


def create_model(name: str, img_size: int) -> torch.nn.Module:
    # Swin's attention windows and relative-position tables depend on the input size; the other models do not.
    kwargs = {"img_size": img_size} if name.startswith("swin") and img_size != 224 else {}
    return timm.create_model(name, num_classes=NUM_CLASSES, **kwargs)


def train_step(model, optimizer, images, labels, amp: Dict[str, object]) -> Callable[[], None]:
    """One AMP training step: forward under autocast, cross-entropy, backward, zero_grad, optimizer step."""

    def step():
        with torch.autocast(**amp):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def amp(device: torch.device) -> Dict[str, object]:
    """The autocast arguments of every model step: bfloat16 on ``device``."""
    return {"device_type": device.type, "dtype": torch.bfloat16}


def bench_models(run: Run):
    run.results["model_settings"] = {
        "batch_size": run.batch_size,
        "img_size": run.img_size,
        "amp_dtype": "bfloat16",
        "inference": "model.eval(), torch.inference_mode(), autocast bf16, forward only",
        "train": "model.train(), autocast bf16, cross-entropy, backward, AdamW step (lr 1e-4)",
        "warmup": run.model_warmup,
        "iters": run.model_iters,
        "peak_memory": "torch.cuda.max_memory_allocated in MiB (2**20 bytes), reset before each phase",
    }
    models = run.results.setdefault("models", {})
    for name in run.models:
        entry: Dict[str, object] = {}
        models[name] = entry
        if run.over_budget():
            entry.update(run.skipped())
            run.save()
            continue
        _bench_model(run, name, entry)
        run.free_memory()
        run.save()


def _bench_model(run: Run, name: str, entry: Dict[str, object]):
    device, batch = run.device, run.batch_size
    try:
        model = create_model(name, run.img_size).to(device)
    except Exception as error:
        entry["error"] = run.failed(f"model {name} (creation)", error)["error"]
        return
    entry["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    run.log(f"model {name}: {entry['params_m']:.1f} M parameters, batch {batch}, {run.img_size}x{run.img_size}")
    entry["peak_memory_mb"] = {"inference": None, "train": None}
    images = torch.randn(batch, 3, run.img_size, run.img_size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    autocast = amp(device)

    def infer():
        with torch.inference_mode(), torch.autocast(**autocast):
            model(images)

    model.eval()
    _model_phase(run, name, entry, "inference", infer)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _model_phase(run, name, entry, "train", train_step(model, optimizer, images, labels, autocast))


def _model_phase(run: Run, name: str, entry: Dict[str, object], phase: str, step: Callable[[], None]):
    """Times ``step`` (one batch) into entry[f"{phase}_throughput_img_s"], with its peak memory on a GPU."""
    key = f"{phase}_throughput_img_s"
    entry[key] = None
    if run.over_budget():
        entry[f"{phase}_skipped"] = run.skipped()["skipped"]
        return
    if run.device.type == "cuda":
        run.free_memory()
        torch.cuda.reset_peak_memory_stats(run.device)
    try:
        timing = run.time(step, "model")
        entry[key] = run.batch_size / (timing["ms"] * 1e-3)
        entry[f"{phase}_ms_per_batch"] = timing
        if run.device.type == "cuda":
            entry["peak_memory_mb"][phase] = torch.cuda.max_memory_allocated(run.device) / 2**20
        run.log(f"model {name:<32} {phase:<9} {entry[key]:9.1f} img/s  ({timing['ms']:.1f} ms per batch)")
    except Exception as error:
        entry[f"{phase}_error"] = run.failed(f"model {name} ({phase})", error)["error"]
    run.free_memory()
