"""What a training forward keeps for the backward, counted like benchmarks/memory.py (saved-tensor hooks, each storage
once): a count of bytes, deterministic and independent of the machine."""

import importlib.util
from pathlib import Path

import timm
import torch

from spatial_mamba.models.ssm import StructureAwareSSM

_spec = importlib.util.spec_from_file_location(
    "benchmarks_memory", Path(__file__).resolve().parents[2] / "benchmarks" / "memory.py"
)
memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory)

# benchmarks/memory.py's activation count for Spatial-Mamba-T at batch 1, 64x64, float32:
#   python benchmarks/memory.py --models T --batch-size 1 --img-size 64   (activations 8.35 MiB)
TINY_B1_64_ACTIVATION_BYTES = 8_754_088
# What torch's own ops keep differs a little between releases: torch 2.1.2 keeps 8,192 bytes more (one 2x2x512 float32
# tensor of the last stage) than torch 2.14.1, where the figure above was measured.
TORCH_RELEASE_SLACK = 16_384


def test_the_mixer_keeps_only_its_input_for_the_backward():
    torch.manual_seed(0)
    mixer = StructureAwareSSM(16)
    x = torch.randn(2, 6, 5, 16, requires_grad=True)
    sizes = memory.saved_bytes(mixer, x)
    assert sizes["activations"] == x.numel() * x.element_size()
    assert sizes["parameters"] == sum(p.numel() * 4 for p in mixer.parameters())


def test_saved_bytes_of_the_tiny_model_do_not_grow_past_the_benchmark_figure():
    torch.manual_seed(0)
    model = timm.create_model("spatial_mamba_tiny", num_classes=1000)
    sizes = memory.saved_bytes(model, torch.randn(1, 3, 64, 64))
    assert sizes["activations"] <= TINY_B1_64_ACTIVATION_BYTES + TORCH_RELEASE_SLACK, sizes


def test_mixer_recomputation_off_keeps_more_and_computes_the_same():
    """``recompute_mixer=False`` trades memory for speed; outputs and gradients must not change."""
    torch.manual_seed(0)
    model = timm.create_model(
        "spatial_mamba_tiny", num_classes=10, dims=16, depths=(1, 1, 1, 1), drop_path_rate=0.0
    ).double()
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    recomputed = memory.saved_bytes(model, x)["activations"]
    outputs = []
    for enable in (True, False):
        model.set_mixer_recompute(enable)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        outputs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    kept = memory.saved_bytes(model, x)["activations"]
    assert kept > 1.5 * recomputed, (kept, recomputed)
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=0, atol=0)
    for a, b in zip(outputs[0][1], outputs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    unrecomputed = timm.create_model("spatial_mamba_tiny", dims=16, depths=(1, 1, 1, 1), recompute_mixer=False)
    assert not any(m.recompute for m in unrecomputed.modules() if isinstance(m, StructureAwareSSM))
