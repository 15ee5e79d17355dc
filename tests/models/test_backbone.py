"""The dense-prediction backbone (``Backbone_SpatialMamba`` in the official ``detection/model.py``)."""

import pytest
import torch

from spatial_mamba import CheckpointError, SpatialMamba, SpatialMambaBackbone


def test_backbone_outputs_are_the_normalised_classifier_stage_features(tmp_path):
    torch.manual_seed(0)
    classifier = SpatialMamba(dims=16, depths=(1, 1, 2, 1), num_classes=7).eval()
    torch.save({"model": classifier.state_dict()}, tmp_path / "cls.pth")
    backbone = SpatialMambaBackbone(dims=16, depths=(1, 1, 2, 1), pretrained=str(tmp_path / "cls.pth")).eval()
    x = torch.randn(2, 3, 61, 45)
    outs = backbone(x)
    stages = classifier.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")
    assert [o.shape[1:] for o in outs] == [(16, 16, 12), (32, 8, 6), (64, 4, 3), (128, 2, 2)]
    for i, (out, stage) in enumerate(zip(outs, stages)):
        norm = getattr(backbone, f"outnorm{i}")
        torch.testing.assert_close(out, norm(stage).permute(0, 3, 1, 2), rtol=0, atol=0)
    assert not hasattr(backbone, "head")


def test_backbone_out_indices_and_bn_norm():
    backbone = SpatialMambaBackbone(dims=16, depths=(1, 1, 1, 1), out_indices=(1, 3), norm_layer="bn").eval()
    outs = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 32, 8, 8), (1, 128, 2, 2)]
    assert isinstance(backbone.outnorm1, torch.nn.BatchNorm2d) and not hasattr(backbone, "outnorm0")


def test_backbone_pretrained_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="empty path"):
        SpatialMambaBackbone(dims=16, depths=(1, 1, 1, 1), pretrained="")
    with pytest.raises(CheckpointError, match="missing.pth"):
        SpatialMambaBackbone(dims=16, depths=(1, 1, 1, 1), pretrained=str(tmp_path / "missing.pth"))
    torch.save({"model": SpatialMamba(dims=24, depths=(1, 1, 1, 1)).state_dict()}, tmp_path / "w24.pth")
    with pytest.raises(CheckpointError, match="w24.pth"):
        SpatialMambaBackbone(dims=16, depths=(1, 1, 1, 1), pretrained=str(tmp_path / "w24.pth"))
    torch.save({"model": SpatialMamba(dims=16, depths=(1, 1, 1, 1)).state_dict()}, tmp_path / "shallow.pth")
    with pytest.raises(CheckpointError, match="missing keys"):
        SpatialMambaBackbone(dims=16, depths=(1, 1, 2, 1), pretrained=str(tmp_path / "shallow.pth"))
    with pytest.raises(ValueError, match="out_indices"):
        SpatialMambaBackbone(dims=16, depths=(1, 1, 1, 1), out_indices=(4,))
