"""MM_SpatialMamba in mmdet: registration through the configs, arguments, checkpoint loading and equality with the
classifier (docs/official_bugs.md, #16 and #17). Narrow backbones on small inputs, CPU only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("mmdet", reason="needs the OpenMMLab stack: bash tools/setup_env.sh --mm")
pytestmark = pytest.mark.mm

from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

from spatial_mamba import (  # noqa: E402
    CheckpointError,
    SpatialMamba,
    compat,  # noqa: E402
)
from spatial_mamba.models.spatial_mamba import SpatialMambaTrunk  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "detection" / "configs" / "spatialmamba"
NARROW = dict(dims=16, depths=(1, 1, 1, 1), d_state=1, drop_path_rate=0.0)


import spatial_mamba.openmmlab  # noqa: E402,F401  what the configs' custom_imports load: registers MM_SpatialMamba


def _build(**kwargs):
    from mmdet.registry import MODELS

    with DefaultScope.overwrite_default_scope("mmdet"):
        return MODELS.build(dict(type="MM_SpatialMamba", **kwargs))


def _trained_classifier_checkpoint(path: Path, dims=16) -> tuple[SpatialMamba, SpatialMamba]:
    """Writes a checkpoint with the classification trainer's own writer; returns (model, model_ema)."""
    from classification.checkpoint import save_checkpoint
    from classification.config import _C

    torch.manual_seed(0)
    model = SpatialMamba(**{**NARROW, "dims": dims}, num_classes=10)
    ema = SpatialMamba(**{**NARROW, "dims": dims}, num_classes=10)
    with torch.no_grad():  # move every tensor, BN statistics included, away from any initialisation
        for name, tensor in [*model.state_dict().items(), *ema.state_dict().items()]:
            if name.endswith("running_var"):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
            elif tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn_like(tensor))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    save_checkpoint(
        str(path), _C.clone(), 3, model, optimizer, scheduler, compat.grad_scaler("cpu", enabled=True), 0.5, ema, 0.6
    )
    return model, ema


def _assert_holds_weights(backbone, classifier: SpatialMamba) -> None:
    own = backbone.state_dict()
    shared = {k: v for k, v in classifier.state_dict().items() if not k.startswith(("head.", "norm."))}
    assert set(own) - set(shared) == {f"outnorm{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    for name, tensor in shared.items():
        torch.testing.assert_close(own[name], tensor, rtol=0, atol=0, msg=name)


def test_registered_backbone_returns_four_nchw_maps_at_strides_4_to_32():
    backbone = _build(**NARROW).eval()
    outs = backbone(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 128, 2, 3)]


def test_swin_arguments_are_rejected_by_name_not_swallowed():
    with pytest.raises(TypeError, match="embed_dims"):
        _build(**NARROW, embed_dims=96, window_size=7)


def test_backbone_network_is_built_once(monkeypatch):
    """The trunk (stem and stages, shared with the classifier) is built once (docs/official_bugs.md, #17)."""
    calls = []
    original = SpatialMambaTrunk.__init__

    def counting_init(self, *args, **kwargs):
        calls.append(kwargs.get("dims"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(SpatialMambaTrunk, "__init__", counting_init)
    _build(**NARROW)
    assert calls == [16]


def test_checkpoint_written_by_our_classification_trainer_loads_as_pretrained(tmp_path):
    path = tmp_path / "latest_ckpt.pth"
    model, ema = _trained_classifier_checkpoint(path)
    _assert_holds_weights(_build(**NARROW, pretrained=str(path)), model)
    _assert_holds_weights(_build(**NARROW, pretrained=str(path), key="model_ema"), ema)


def test_backbone_outputs_equal_classifier_stage_features_with_the_same_weights(tmp_path):
    path = tmp_path / "latest_ckpt.pth"
    classifier, _ = _trained_classifier_checkpoint(path)
    backbone = _build(**NARROW, pretrained=str(path))
    with torch.no_grad():
        for i in range(4):  # non-trivial output norms, so that the check covers their use too
            getattr(backbone, f"outnorm{i}").weight.normal_()
            getattr(backbone, f"outnorm{i}").bias.normal_()
    classifier.eval(), backbone.eval()
    image = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        stages = classifier.forward_intermediates(image, intermediates_only=True)
        outs = backbone(image)
    for i, (out, stage) in enumerate(zip(outs, stages)):
        norm = getattr(backbone, f"outnorm{i}")
        expected = F.layer_norm(stage.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(out, expected.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_missing_empty_or_foreign_checkpoints_fail_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(CheckpointError, match=str(missing)):
        _build(**NARROW, pretrained=str(missing))
    with pytest.raises(CheckpointError, match="empty path"):
        _build(**NARROW, pretrained="")  # the official default, which kept a random backbone
    foreign = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}}, foreign)
    with pytest.raises(CheckpointError, match=str(foreign)):
        _build(**NARROW, pretrained=str(foreign))


def test_checkpoint_of_another_width_fails_naming_the_path(tmp_path):
    wider = tmp_path / "wider.pth"
    _trained_classifier_checkpoint(wider, dims=24)
    with pytest.raises(CheckpointError, match=str(wider)):
        _build(**NARROW, pretrained=str(wider))


def test_init_cfg_pretrained_loads_the_checkpoint_in_init_weights(tmp_path):
    path = tmp_path / "latest_ckpt.pth"
    model, _ = _trained_classifier_checkpoint(path)
    backbone = _build(**NARROW, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    assert not torch.equal(backbone.patch_embed.conv1.conv.weight, model.patch_embed.conv1.conv.weight)
    backbone.init_weights()
    _assert_holds_weights(backbone, model)
    with pytest.raises(ValueError, match="only one"):
        _build(**NARROW, pretrained=str(path), init_cfg=dict(type="Pretrained", checkpoint=str(path)))


def test_detector_init_weights_keeps_the_pretrained_backbone(tmp_path):
    from mmdet.registry import MODELS

    path = tmp_path / "latest_ckpt.pth"
    classifier, _ = _trained_classifier_checkpoint(path)
    cfg = Config.fromfile(CONFIGS / "mask_rcnn_spatialmamba_fpn_coco_tiny.py")
    cfg.model.backbone.update(NARROW, pretrained=str(path))
    cfg.model.neck.in_channels = [16, 32, 64, 128]
    with DefaultScope.overwrite_default_scope("mmdet"):
        detector = MODELS.build(cfg.model)
    detector.init_weights()  # what the runner calls before training
    _assert_holds_weights(detector.backbone, classifier)


# Explicit arguments of each official config (official `detection/configs/spatialmamba/`).
DETECTION_CONFIGS = {
    "mask_rcnn_spatialmamba_fpn_coco_tiny.py": (64, (2, 4, 8, 4), 0.2, [64, 128, 256, 512], 12, [8, 11]),
    "mask_rcnn_spatialmamba_fpn_coco_small.py": (64, (2, 4, 21, 5), 0.3, [64, 128, 256, 512], 12, [8, 11]),
    "mask_rcnn_spatialmamba_fpn_coco_base.py": (96, (2, 4, 21, 5), 0.5, [96, 192, 384, 768], 12, [8, 11]),
    "mask_rcnn_spatialmamba_fpn_coco_tiny_3x.py": (64, (2, 4, 8, 4), 0.2, [64, 128, 256, 512], 36, [27, 33]),
    "mask_rcnn_spatialmamba_fpn_coco_small_3x.py": (64, (2, 4, 21, 5), 0.3, [64, 128, 256, 512], 36, [27, 33]),
}


@pytest.mark.parametrize("name", sorted(DETECTION_CONFIGS))
def test_detection_config_has_the_official_backbone_schedule_and_optimiser(name):
    dims, depths, dpr, neck, epochs, milestones = DETECTION_CONFIGS[name]
    cfg = Config.fromfile(CONFIGS / name)
    backbone = cfg.model.backbone
    assert set(backbone) == {"type", "dims", "depths", "d_state", "drop_path_rate", "out_indices", "pretrained"}
    assert (backbone.dims, tuple(backbone.depths), backbone.drop_path_rate) == (dims, depths, dpr)
    assert backbone.d_state == 1 and tuple(backbone.out_indices) == (0, 1, 2, 3)
    assert cfg.model.neck.in_channels == neck
    assert cfg.train_cfg.max_epochs == epochs
    assert cfg.param_scheduler[0].end == 1000 and cfg.param_scheduler[1].milestones == milestones
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ("AdamW", 1e-4, 0.05)
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys["norm"] == dict(decay_mult=0.0)
    # 8 GPUs x 2 images, the batch the learning rate was set for.
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
    pipeline_types = [step.type for step in cfg.train_dataloader.dataset.pipeline]
    assert ("RandomChoice" in pipeline_types) == (epochs == 36)


def test_config_custom_imports_register_the_backbone_without_mmseg():
    code = (
        "import sys; sys.modules['mmseg'] = None; from mmengine.config import Config; "
        f"Config.fromfile({str(CONFIGS / 'mask_rcnn_spatialmamba_fpn_coco_small_3x.py')!r}); "
        "from mmdet.registry import MODELS; cls = MODELS.get('MM_SpatialMamba'); "
        "assert cls is not None and cls.__module__ == 'spatial_mamba.openmmlab', cls"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_model_package_imports_no_training_framework():
    code = (
        "import sys, spatial_mamba, spatial_mamba.models, spatial_mamba.checkpoint, spatial_mamba.flops; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('mmengine', 'mmcv', 'mmdet', 'mmseg', 'openmmlab_tools')))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
