"""Spatial-Mamba classifier (``classification/models/spatialmamba.py`` in the official repository), its timm API
and the registered constructors."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from torch import nn

from .. import compat
from ..checkpoint import checkpoint_filter_fn, extract_state_dict, load_file
from .block import SpatialMambaLayer
from .layers import Stem
from .ssm import StructureAwareSSM

__all__ = ["SpatialMamba", "SpatialMambaTrunk", "check_image_batch", "feature_indices"]


def _is_traced() -> bool:
    """True under FX symbolic tracing, TorchScript, torch.compile and torch.export, where the eager input checks
    would see proxies or symbolic shapes (and the compiled graph checks shapes itself)."""
    return (
        compat.is_fx_tracing()
        or torch.jit.is_scripting()
        or torch.jit.is_tracing()
        or compat.is_compiling()
        or compat.is_exporting()
    )


def check_image_batch(x: Any, in_chans: int) -> None:
    """Rejects a batch the stem cannot take, naming what was expected (instead of failing inside a convolution)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected an image tensor of shape (B, {in_chans}, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"expected a 4-D image batch (B, {in_chans}, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channels (B, {in_chans}, H, W), got shape {tuple(x.shape)}; "
            "channels-last or greyscale images must be converted first"
        )
    if not torch.is_floating_point(x):
        raise TypeError(f"expected a floating-point, normalised image batch, got dtype {x.dtype}")


def _expand_dims(dims: Union[int, Sequence[int]], num_stages: int) -> List[int]:
    if isinstance(dims, int):
        return [dims * 2**i for i in range(num_stages)]
    dims = list(dims)
    if len(dims) != num_stages:
        raise ValueError(f"dims must be an int or have one entry per stage ({num_stages}), got {dims}")
    return dims


def feature_indices(indices: Union[int, Sequence[int]] | None, num_stages: int) -> List[int]:
    """timm's convention: None is every stage, an int n the last n stages, a sequence explicit (negative from the
    end) indices; returned sorted and absolute."""
    if indices is None:
        return list(range(num_stages))
    if isinstance(indices, int):
        if not 1 <= indices <= num_stages:
            raise ValueError(f"indices as an int must be in 1..{num_stages}, got {indices}")
        return list(range(num_stages - indices, num_stages))
    take = sorted({i + num_stages if i < 0 else i for i in indices})
    if not take or any(not 0 <= i < num_stages for i in take):
        raise ValueError(f"feature indices must be in [-{num_stages}, {num_stages}), got {list(indices)}")
    return take


# FX treats the token mixer as one leaf: its scan checks shapes and dispatches on the backend in Python. Its
# parameters stay in the traced module, so gradients flow through it.
register_notrace_module(StructureAwareSSM)


class SpatialMambaTrunk(nn.Module):
    """Stem and the four stages: what the classifier and the dense backbone share, with the one stage walk.

    Has no final norm or head, so a subclass without them (the backbone) has no method that could reach them.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        depths: Sequence[int] = (2, 2, 9, 2),
        dims: Union[int, Sequence[int]] = (96, 192, 384, 768),
        d_state: int | None = 1,
        dt_init: str = "random",
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        use_checkpoint: bool = False,
        recompute_mixer: bool = True,
    ):
        super().__init__()
        if patch_size != 4:
            raise ValueError(f"the stem downsamples by 4; patch_size must be 4, got {patch_size}")
        depths = list(depths)
        if not depths or any(not isinstance(d, int) or d < 1 for d in depths):
            raise ValueError(f"depths must be a non-empty sequence of block counts >= 1, got {depths}")
        dims = _expand_dims(dims, len(depths))
        if d_state is None:
            d_state = math.ceil(dims[0] / 6)
        if d_state < 1:
            raise ValueError(f"d_state must be >= 1, got {d_state}")
        self.in_chans = in_chans
        self.dims = dims
        self.depths = depths
        self.d_state = d_state
        self.grad_checkpointing = use_checkpoint

        self.patch_embed = Stem(in_chans, dims[0])
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.layers.append(
                SpatialMambaLayer(
                    dims[i],
                    depth,
                    drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    downsample=i < len(depths) - 1,
                    d_state=d_state,
                    dt_init=dt_init,
                    mlp_ratio=mlp_ratio,
                    attn_drop_rate=attn_drop_rate,
                    use_checkpoint=use_checkpoint,
                )
            )
        self.set_mixer_recompute(recompute_mixer)
        # Each stage's feature is its last block's output, before the downsampling (which layers.{i} includes).
        self.feature_info = [
            dict(num_chs=dims[i], reduction=4 * 2**i, module=f"layers.{i}.blocks.{depths[i] - 1}")
            for i in range(len(depths))
        ]

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Only Linear and LayerNorm are re-initialised; the SSM's bare Parameters keep their own init
        # (classification/models/spatialmamba.py, SpatialMamba._init_weights).
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # The official set; A_logs stays decayed as in the official recipe (docs/official_bugs.md, #10).
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {"relative_position_bias_table"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recomputes each block in the backward pass (the official ``--use-checkpoint`` never reached the model)."""
        self.grad_checkpointing = enable
        for layer in self.layers:
            layer.use_checkpoint = enable

    @torch.jit.ignore
    def set_mixer_recompute(self, enable: bool = True) -> None:
        """In training, each token mixer keeps only its input for the backward pass and recomputes the rest there
        (on by default): about half the activation memory, for one more forward of each mixer (docs/performance.md,
        Training memory)."""
        self.recompute_mixer = bool(enable)
        for module in self.modules():
            if isinstance(module, StructureAwareSSM):
                module.recompute = self.recompute_mixer

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99999,)),
                (r"^norm", (99999,)),
            ],
        )

    def walk_stages(
        self, x: torch.Tensor, take: Sequence[int] = (), stop_early: bool = False
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Stem, then each stage's blocks and downsampling: the one walk every forward uses.

        Returns the last token map (B, h, w, C) and the outputs of the stages in ``take`` before their downsampling,
        channels-last. With ``stop_early`` the walk ends at the last stage in ``take``, before its downsampling.
        """
        if not _is_traced():
            check_image_batch(x, self.in_chans)
        x = self.pos_drop(self.patch_embed(x))
        stages = self.layers[: max(take) + 1] if stop_early and len(take) > 0 else self.layers
        last = len(stages) - 1
        features = []
        for i, layer in enumerate(stages):
            x = layer.forward_blocks(x)
            if i in take:
                features.append(x)
            if layer.downsample is not None and not (stop_early and i == last):
                x = layer.downsample(x)
        return x, features


class SpatialMamba(SpatialMambaTrunk):
    """Spatial-Mamba (Xiao et al., ICLR 2025): stem, four stages of SSM blocks with state fusion, LN + mean-pool head.

    Constructor arguments and state-dict keys are the official ones, so official checkpoints load strictly. Unknown
    keyword arguments are a ``TypeError`` (the official constructor swallowed them, so a misspelt option built the
    default model).
    """

    # forward_features returns channels-last token maps (B, h, w, C).
    output_fmt = "NHWC"

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (2, 2, 9, 2),
        dims: Union[int, Sequence[int]] = (96, 192, 384, 768),
        d_state: int | None = 1,
        dt_init: str = "random",
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        use_checkpoint: bool = False,
        recompute_mixer: bool = True,
        global_pool: str = "avg",
    ):
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            depths=depths,
            dims=dims,
            d_state=d_state,
            dt_init=dt_init,
            mlp_ratio=mlp_ratio,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            use_checkpoint=use_checkpoint,
            recompute_mixer=recompute_mixer,
        )
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.dims[-1]
        self.norm = nn.LayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    # --- timm API -------------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # --- forward --------------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> final channels-last token map (B, h, w, C4), after the final LayerNorm."""
        x, _ = self.walk_stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = self.avgpool(x.flatten(1, 2).transpose(1, 2)).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Union[int, Sequence[int]] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API: each selected stage's output before its downsampling, strides 4/8/16/32.

        ``norm`` applies the final LayerNorm to the last stage's output (the only one of its width). With
        ``stop_early`` the walk ends at the last selected stage; the final features then exist only when that is
        the last stage.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take = feature_indices(indices, len(self.layers))
        if stop_early and not intermediates_only and max(take) < len(self.layers) - 1:
            raise ValueError(
                f"stop_early with indices {take} ends before the last stage, so there are no final features; "
                "pass intermediates_only=True"
            )
        x, features = self.walk_stages(x, take, stop_early)
        intermediates = []
        for i, feat in zip(take, features):
            if norm and i == len(self.dims) - 1:
                feat = self.norm(feat)
            intermediates.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, Sequence[int]] | None = None, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drops the stages after the last one in ``indices`` (and that stage's downsampling), optionally the final
        norm and the head, so that ``forward_intermediates`` computes only what it returns. The final norm goes too
        when the last stage goes: it has the last stage's width."""
        take = feature_indices(indices, len(self.layers))
        last = max(take)
        self.layers = self.layers[: last + 1]
        self.layers[-1].downsample = None
        if prune_norm or last < len(self.dims) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


# --- registered constructors ------------------------------------------------------------------------------------------
def _cfg(**kwargs) -> Dict[str, Any]:
    # Official eval transform: resize 256 (crop_pct 224/256), centre crop 224, bicubic, ImageNet mean/std
    # (classification/data/build.py).
    return dict(
        url="",
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.875,
        crop_mode="center",
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.conv1.conv",
        classifier="head",
        license="apache-2.0",
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "spatial_mamba_tiny.in1k": _cfg(),
        "spatial_mamba_small.in1k": _cfg(),
        "spatial_mamba_base.in1k": _cfg(),
    }
)

# Official variant hyper-parameters (classification/configs/spatialmamba/spatialmamba_{tiny,small,base}.yaml).
VARIANTS: Dict[str, Dict[str, Any]] = {
    "spatial_mamba_tiny": dict(dims=64, depths=(2, 4, 8, 4), d_state=1, drop_path_rate=0.2),
    "spatial_mamba_small": dict(dims=64, depths=(2, 4, 21, 5), d_state=1, drop_path_rate=0.3),
    "spatial_mamba_base": dict(dims=96, depths=(2, 4, 21, 5), d_state=1, drop_path_rate=0.5),
}


def _read_pretrained_file(variant: str, kwargs: Dict[str, Any]) -> None:
    """On torch < 2.4, reads a pretrained cfg's ``file`` with our restricted loader and hands timm its state dict.

    timm reads the file with ``torch.load(weights_only=True)``, which only torch >= 2.4 lets us extend to the yacs
    ``CfgNode`` of official checkpoints. The state dict is chosen as timm chooses it (EMA weights first)."""
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    )
    if not cfg.file or cfg.state_dict is not None:
        return
    checkpoint = load_file(cfg.file)
    keys = [
        k
        for k in ("state_dict_ema", "model_ema", "state_dict", "model")
        if isinstance(checkpoint, dict) and k in checkpoint
    ]
    state_dict = extract_state_dict(checkpoint[keys[0]] if keys else checkpoint, source=f"checkpoint {cfg.file!r}")
    kwargs["pretrained_cfg_overlay"] = {**(kwargs.get("pretrained_cfg_overlay") or {}), "state_dict": state_dict}


def _create(variant: str, pretrained: bool = False, **kwargs) -> SpatialMamba:
    if pretrained and not compat.HAS_SAFE_GLOBALS:
        _read_pretrained_file(variant, kwargs)
    model_args = {**VARIANTS[variant], **kwargs}
    return build_model_with_cfg(
        SpatialMamba,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **model_args,
    )


@register_model
def spatial_mamba_tiny(pretrained: bool = False, **kwargs) -> SpatialMamba:
    return _create("spatial_mamba_tiny", pretrained, **kwargs)


@register_model
def spatial_mamba_small(pretrained: bool = False, **kwargs) -> SpatialMamba:
    return _create("spatial_mamba_small", pretrained, **kwargs)


@register_model
def spatial_mamba_base(pretrained: bool = False, **kwargs) -> SpatialMamba:
    return _create("spatial_mamba_base", pretrained, **kwargs)
