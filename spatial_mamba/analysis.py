"""What the model does, as tensors a notebook can plot: the mixing matrix of a token mixer and the effective
receptive field of a network.

**Mixing matrix.** For one image, a token mixer (``StructureAwareSSM``) is linear in its scan input u once u, Δ, B
and C are fixed: with L = H·W tokens in raster order, the output before ``out_norm`` is y = M·u for each inner
channel, with

    M = Σ_n diag(C_n)·F·S_n + diag(D),    S_n[t, s] = Δ_s B_{n,s} Π_{r=s+1..t} exp(Δ_r A_n)  (s ≤ t, else 0),

where S_n is the scan (the paper's eq. for x_t), F the structure-aware state fusion (eq. for h_t: 25 taps per
channel, replicate borders) and the rest the observation (eq. for y_t). Without F (``fusion=False``) this is
Mamba's matrix, lower-triangular: a raster scan mixes token t only with the tokens before it.

**Effective receptive field** (RepLKNet, Ding et al. 2022; VMamba): the gradient of the central location of the last
feature map (ReLU, then the sum over channels) with respect to the input image; |gradient| summed over colour
channels and averaged over images.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, NamedTuple, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config
from torch import nn

from .checkpoint import extract_state_dict, load_checkpoint, load_file
from .models.ssm import StructureAwareSSM
from .ops.state_fusion import FUSION_OFFSETS, fusion_taps

__all__ = [
    "ERF_FRACTIONS",
    "MixerCapture",
    "MixingSummary",
    "ScanInputs",
    "capture_mixer",
    "create_model",
    "effective_receptive_field",
    "erf_area_fractions",
    "image_transform",
    "mixing_matrix",
    "scan_inputs",
    "summarise_mixing_matrix",
]

# The contribution fractions whose image area RepLKNet and VMamba report.
ERF_FRACTIONS = (0.2, 0.3, 0.5, 0.99)


class ScanInputs(NamedTuple):
    """One mixer's scan and observation inputs for one image, in float64, over L = H·W tokens in raster order."""

    u: torch.Tensor  # (D, L) scan input: SiLU of the depthwise convolution of in_proj's x half
    delta: torch.Tensor  # (D, L) Δ = softplus(dt_projs(x_proj_dt(u)) + dt_projs_bias)
    A: torch.Tensor  # (D, N) = -exp(A_logs)
    B: torch.Tensor  # (N, L), shared by all channels
    C: torch.Tensor  # (N, L), shared by all channels
    D: torch.Tensor  # (D,) = Ds
    height: int
    width: int


def _check_mixer_input(mixer: nn.Module, x: torch.Tensor) -> None:
    if not isinstance(mixer, StructureAwareSSM):
        raise TypeError(f"expected a StructureAwareSSM token mixer (a block's self_attention), got {type(mixer)}")
    d_model = mixer.in_proj.in_features
    if x.dim() != 4 or x.shape[0] != 1 or x.shape[3] != d_model:
        raise ValueError(f"expected the mixer input of one image, (1, H, W, C={d_model}); got {tuple(x.shape)}")


def scan_inputs(mixer: StructureAwareSSM, x: torch.Tensor) -> ScanInputs:
    """u, Δ, A, B, C and D of ``mixer`` for its input ``x`` (1, H, W, C), recomputed in float64 from its weights the
    way ``StructureAwareSSM._mix`` computes them."""
    _check_mixer_input(mixer, x)
    _, height, width, _ = x.shape
    weights = {name: p.detach().double() for name, p in mixer.named_parameters()}
    xs, _ = F.linear(x.detach().double(), weights["in_proj.weight"]).chunk(2, dim=-1)  # z only gates after out_norm
    conv = mixer.conv2d
    xs = F.conv2d(
        xs.permute(0, 3, 1, 2),
        weights["conv2d.weight"],
        weights["conv2d.bias"],
        padding=conv.padding,
        groups=conv.groups,
    )
    u = F.silu(xs)[0].flatten(1)  # row-major flatten: raster order t = row·W + col
    dts, B, C = torch.split(weights["x_proj_weight"] @ u, [mixer.dt_rank, mixer.d_state, mixer.d_state])
    # torch's softplus is log1p(exp(v)) up to v = 20 and v above, as the scan's.
    delta = F.softplus(weights["dt_projs_weight"] @ dts + weights["dt_projs_bias"][:, None])
    return ScanInputs(u, delta, -torch.exp(weights["A_logs"]), B, C, weights["Ds"], height, width)


def _fusion_neighbours(height: int, width: int) -> torch.Tensor:
    """(25, L): the token each fusion tap reads for every token t, borders clamped (replicate padding)."""
    rows, cols = torch.arange(height)[:, None], torch.arange(width)[None, :]
    return torch.stack(
        [
            ((rows + dy).clamp(0, height - 1) * width + (cols + dx).clamp(0, width - 1)).flatten()
            for dy, dx in FUSION_OFFSETS
        ]
    )


def mixing_matrix(
    mixer: StructureAwareSSM, x: torch.Tensor, fusion: bool = True, channels: Sequence[int] | None = None
) -> torch.Tensor:
    """The exact per-channel mixing matrices M (channels, L, L), float64, with y = M·u for the mixer input ``x``.

    Args:
        mixer: a block's token mixer (``model.layers[s].blocks[b].self_attention``).
        x: its input for one image, (1, H, W, C), as the block hands it over (after ``ln_1``; ``capture_mixer``).
        fusion: ``True`` for Spatial-Mamba's M = Σ_n diag(C_n)·F·S_n + diag(D); ``False`` for Mamba's
            Σ_n diag(C_n)·S_n + diag(D), lower-triangular.
        channels: inner channels to compute (default all D). Memory is about 3·len(channels)·L²·8 bytes, so at
            large L compute a few at a time (``summarise_mixing_matrix``).
    With u from ``scan_inputs`` (D, L), ``M[i] @ u[channels[i]]`` is the tensor the mixer normalises with ``out_norm``,
    channel ``channels[i]``, in raster order t = row·W + col.
    """
    inputs = scan_inputs(mixer, x)
    d_inner, length = inputs.u.shape
    index = torch.arange(d_inner) if channels is None else torch.as_tensor(channels, dtype=torch.long).flatten()
    if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < d_inner:
        raise ValueError(f"channels must lie in [0, {d_inner}) (the mixer's inner channels); got {index.tolist()}")
    delta, A = inputs.delta[index], inputs.A[index]
    if fusion:
        neighbours = _fusion_neighbours(inputs.height, inputs.width)
        p = {name: t.detach().double() for name, t in mixer.state_fusion.named_parameters()}
        taps = fusion_taps(p["kernel_3"], p["kernel_3_1"], p["kernel_3_2"], p["alpha"])[index]  # (c, 25)
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    M = torch.zeros(len(index), length, length, dtype=torch.float64)
    for n in range(A.shape[1]):
        # Π_{r=s+1..t} exp(Δ_r A) = exp(A·cum_t − A·cum_s), cum the cumulative sum of Δ; masked to s ≤ t first.
        decay = A[:, n, None] * delta.cumsum(-1)
        scan = (decay[:, :, None] - decay[:, None, :]).masked_fill_(future, -torch.inf).exp_()
        scan.mul_((delta * inputs.B[n])[:, None])  # S_n (c, t, s)
        if fusion:  # row t of diag(C_n)·F·S_n is C_t Σ_k tap_k S_n[ρ_k(t)]: 25 row gathers, not an L×L×L product
            for k, rows in enumerate(neighbours):
                M.addcmul_(taps[:, k, None, None] * inputs.C[n][:, None], scan[:, rows])
        else:
            M.addcmul_(inputs.C[n][:, None], scan)
    M.diagonal(dim1=-2, dim2=-1).add_(inputs.D[index][:, None])
    return M


class MixingSummary(NamedTuple):
    mean_abs: torch.Tensor  # (L, L) mean over the inner channels of |M|: what a heatmap shows
    output: torch.Tensor  # (D, L) M·u per channel: the mixer's output before out_norm (with fusion)


def summarise_mixing_matrix(
    mixer: StructureAwareSSM, x: torch.Tensor, fusion: bool = True, chunk: int = 32
) -> MixingSummary:
    """The channel reduction of ``mixing_matrix`` and its output M·u, computed ``chunk`` channels at a time so that
    memory stays at about 3·chunk·L²·8 bytes (Spatial-Mamba-T's first stage at 224, L = 3136: 7.6 GB for chunk 32,
    its second, L = 784: 0.5 GB)."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of channels, got {chunk}")
    u = scan_inputs(mixer, x).u
    total, outputs = 0, []
    for channels in torch.arange(u.shape[0]).split(chunk):
        M = mixing_matrix(mixer, x, fusion, channels)
        total = total + M.abs().sum(0)
        outputs.append(torch.einsum("cts,cs->ct", M, u[channels]))
    return MixingSummary(total / u.shape[0], torch.cat(outputs))


class MixerCapture(NamedTuple):
    mixer: StructureAwareSSM
    x: torch.Tensor  # (1, H, W, C) the mixer's input
    y: torch.Tensor  # (1, H, W, D) the mixer's own output before out_norm (float32 for a float32 model)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode for the duration (BatchNorm statistics, no DropPath), then the caller's mode again."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def capture_mixer(model: nn.Module, image: torch.Tensor, stage: int, block: int) -> MixerCapture:
    """Runs ``model`` (a ``SpatialMamba`` or ``SpatialMambaBackbone``) in evaluation mode on ``image`` (1, 3, H, W)
    and returns the token mixer of block ``block`` of stage ``stage`` with its input and its output before
    ``out_norm`` (forward pre-hooks on the mixer and on its ``out_norm``)."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image (1, channels, H, W); got {tuple(image.shape)}")
    stages = getattr(model, "layers", None)
    if not isinstance(stages, nn.ModuleList):
        raise TypeError(f"expected a Spatial-Mamba model with stages in .layers, got {type(model).__name__}")
    if not 0 <= stage < len(stages):
        raise ValueError(f"stage must be in [0, {len(stages)}), got {stage}")
    if not 0 <= block < len(stages[stage].blocks):
        raise ValueError(f"stage {stage} has blocks [0, {len(stages[stage].blocks)}); got block {block}")
    mixer = stages[stage].blocks[block].self_attention
    seen = {}

    def keep(name):
        # Clones: the block and the mixer overwrite some temporaries in place (docs/architecture.md, the block).
        return lambda module, args: seen.__setitem__(name, args[0].detach().clone())

    handles = [mixer.register_forward_pre_hook(keep("x")), mixer.out_norm.register_forward_pre_hook(keep("y"))]
    try:
        with _eval_mode(model), torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return MixerCapture(mixer, seen["x"], seen["y"])


def effective_receptive_field(model: nn.Module, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The effective receptive field (H, W), float64, of ``model`` over ``images`` (N, 3, H, W), already normalised.

    For each image: the gradient of the last feature map's central location (h // 2, w // 2), ReLU then summed over
    channels, with respect to the image; its absolute value summed over the colour channels; then the mean over the
    images. The ReLU is RepLKNet's: without it a map that ends in a LayerNorm (Spatial-Mamba's ``forward_features``)
    has a channel sum of Σγ·n + Σβ, which is constant (zero) for the initial γ = 1, β = 0 and so has no gradient.
    ``model.forward_features`` must return an NCHW map, or NHWC where ``model.output_fmt`` says so (timm's
    convention; Spatial-Mamba's is NHWC). Runs in evaluation mode, so the images of a batch do not interact, and
    leaves the parameters' ``.grad`` untouched.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty image batch (N, channels, H, W); got {tuple(images.shape)}")
    layout = getattr(model, "output_fmt", "NCHW")
    layout = getattr(layout, "value", layout)  # timm's Format enum or a plain string
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"forward_features must return an NCHW or NHWC map; {type(model).__name__} gives {layout}")
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    with _eval_mode(model), torch.enable_grad():
        for batch in images.split(batch_size):
            batch = batch.detach().clone().requires_grad_(True)
            features = model.forward_features(batch)
            if features.dim() != 4:
                raise ValueError(f"forward_features must return a 4-D map; got {tuple(features.shape)}")
            if layout == "NHWC":
                features = features.permute(0, 3, 1, 2)
            height, width = features.shape[-2:]
            centre = F.relu(features[:, :, height // 2, width // 2]).sum()
            (grad,) = torch.autograd.grad(centre, batch)
            total += grad.abs().sum(1).sum(0).double()
    return total / images.shape[0]


def erf_area_fractions(erf: torch.Tensor, fractions: Sequence[float] = ERF_FRACTIONS) -> Dict[float, float]:
    """For each fraction f: the smallest fraction of the image's pixels that holds f of the total contribution of
    ``erf`` (its largest pixels first). 1/(H·W) is a single pixel; a large value means a spread-out field."""
    values = erf.detach().flatten().double().sort(descending=True).values
    if values.numel() == 0 or values[-1] < 0 or not values.sum() > 0:
        raise ValueError("expected a non-negative effective receptive field with a positive total")
    if any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1]; got {list(fractions)}")
    cumulative = values.cumsum(0) / values.sum()
    counts = torch.searchsorted(cumulative, torch.tensor(fractions, dtype=torch.float64)) + 1
    return {f: min(int(c), values.numel()) / values.numel() for f, c in zip(fractions, counts)}


def create_model(name: str, checkpoint: str | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` in evaluation mode; with ``checkpoint`` (official training layout, key
    ``model``, or a plain state dict) the classifier takes the checkpoint's number of classes and the weights load
    with ``strict=False`` (missing and unexpected keys are logged)."""
    model = timm.create_model(name, **kwargs)
    if checkpoint is not None:
        state_dict = extract_state_dict(load_file(checkpoint), source=f"checkpoint {checkpoint!r}")
        classifier = model.pretrained_cfg.get("classifier", "head")
        classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
        head = state_dict.get(f"{classifier}.weight")
        if head is not None and head.shape[0] != model.num_classes:
            model.reset_classifier(head.shape[0])
        load_checkpoint(model, checkpoint, strict=False)
    return model.eval()


def image_transform(model: nn.Module, img_size: int) -> Tuple[object, Tuple[float, ...], Tuple[float, ...]]:
    """The model's evaluation preprocessing (timm's data config: resize, centre crop, normalisation) at
    ``img_size``², as a transform of a PIL image, with the normalisation's mean and std."""
    config = resolve_data_config(model=model)
    config["input_size"] = (3, img_size, img_size)
    return create_transform(**config), config["mean"], config["std"]
