"""MM_SpatialMamba in mmseg and the UPerNet configs: registration through the configs, the official settings, where
SyncBN sits, the multi-scale flip TTA of the official "ms" numbers, our tools' flags and mmseg's own analysis tools."""

from __future__ import annotations

import copy
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmseg", reason="needs the OpenMMLab stack: bash tools/setup_env.sh --mm")
pytestmark = pytest.mark.mm

from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

from spatial_mamba import SpatialMamba  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "segmentation" / "configs" / "spatialmamba"
NARROW = dict(dims=16, depths=(1, 1, 1, 1), d_state=1, drop_path_rate=0.0)

import spatial_mamba.openmmlab  # noqa: E402,F401  what the configs' custom_imports load: registers MM_SpatialMamba
from openmmlab_tools import cli  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "detection"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from narrow_upernet import run_mmseg_tool, write_config  # noqa: E402
from scenes import write_ade20k  # noqa: E402


def _config(variant: str) -> Config:
    return Config.fromfile(CONFIGS / f"upernet_spatialmamba_8xb2-160k_ade20k-512x512_{variant}.py")


# Explicit arguments of each official config (official `segmentation/configs/spatialmamba/`).
SEGMENTATION_CONFIGS = {
    "tiny": (64, (2, 4, 8, 4), 0.2, [64, 128, 256, 512], 256),
    "small": (64, (2, 4, 21, 5), 0.3, [64, 128, 256, 512], 256),
    "base": (96, (2, 4, 21, 5), 0.5, [96, 192, 384, 768], 384),
}


@pytest.mark.parametrize("variant", sorted(SEGMENTATION_CONFIGS))
def test_segmentation_config_has_the_official_backbone_schedule_and_optimiser(variant):
    dims, depths, dpr, head, aux = SEGMENTATION_CONFIGS[variant]
    cfg = _config(variant)
    backbone = cfg.model.backbone
    assert set(backbone) == {"type", "dims", "depths", "d_state", "drop_path_rate", "out_indices", "pretrained"}
    assert (backbone.dims, tuple(backbone.depths), backbone.drop_path_rate, backbone.d_state) == (dims, depths, dpr, 1)
    assert cfg.model.decode_head.in_channels == head and cfg.model.auxiliary_head.in_channels == aux
    assert cfg.model.decode_head.num_classes == cfg.model.auxiliary_head.num_classes == 150
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_cfg.val_interval == 16000
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ("AdamW", 6e-5, 0.01)
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys["norm"] == dict(decay_mult=0.0)
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.end) == ("LinearLR", 1e-6, 1500)
    assert (poly.type, poly.power, poly.begin, poly.end) == ("PolyLR", 1.0, 1500, 160000)
    # The file name's 8xb2 is what runs: 2 images per GPU, 16 in all on the README's 8 GPUs.
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16


def test_tta_runs_scales_075_1_125_of_the_test_scale_each_with_and_without_flip(tmp_path):
    from mmcv.transforms import Compose
    from PIL import Image

    cfg = _config("tiny")
    assert cfg.tta_model.type == "SegTTAModel"
    image = np.zeros((300, 400, 3), np.uint8)
    image[:, :10] = 255  # a bright left edge, to tell flipped views apart
    Image.fromarray(image).save(tmp_path / "scene.png")
    Image.fromarray(np.ones((300, 400), np.uint8)).save(tmp_path / "labels.png")
    with DefaultScope.overwrite_default_scope("mmseg"):
        import mmseg.datasets  # noqa: F401  registers the transforms

        pipeline = Compose(cfg.tta_pipeline)
        result = pipeline(
            dict(
                img_path=str(tmp_path / "scene.png"),
                seg_map_path=str(tmp_path / "labels.png"),
                reduce_zero_label=True,
                seg_fields=[],
            )
        )
    views = [(tuple(s.img_shape), bool(s.flip)) for s in result["data_samples"]]
    # keep_ratio Resize into (2048 r, 512 r): the short side becomes 512 r.
    expected = [((int(512 * r), int(512 * r * 4 / 3 + 0.5)), f) for r in (0.75, 1.0, 1.25) for f in (False, True)]
    assert sorted(views) == sorted(expected)
    for inputs, sample in zip(result["inputs"], result["data_samples"]):
        left_is_bright = inputs[:, :, :5].float().mean() > inputs[:, :, -5:].float().mean()
        assert left_is_bright != sample.flip


def test_segmentor_pretrained_argument_reaches_the_backbone(tmp_path):
    from mmseg.registry import MODELS

    torch.manual_seed(0)
    classifier = SpatialMamba(**NARROW, num_classes=10)
    path = tmp_path / "cls.pth"
    torch.save({"model": classifier.state_dict()}, path)
    cfg = _config("tiny")
    cfg.model.backbone.update(NARROW, pretrained=None)
    cfg.model.pretrained = str(path)  # mmseg's EncoderDecoder passes its own ``pretrained`` to the backbone
    cfg.model.decode_head.update(in_channels=[16, 32, 64, 128], channels=16, norm_cfg=dict(type="BN"))
    cfg.model.auxiliary_head.update(in_channels=64, channels=16, norm_cfg=dict(type="BN"))
    with DefaultScope.overwrite_default_scope("mmseg"):
        segmentor = MODELS.build(cfg.model)
    segmentor.init_weights()
    for name, tensor in classifier.state_dict().items():
        if not name.startswith(("head.", "norm.")):
            assert torch.equal(segmentor.backbone.state_dict()[name], tensor), name


def test_swin_arguments_are_rejected_by_name_in_mmseg_too():
    from mmseg.registry import MODELS

    with DefaultScope.overwrite_default_scope("mmseg"), pytest.raises(TypeError, match="window_size"):
        MODELS.build(dict(type="MM_SpatialMamba", **NARROW, window_size=7))


def test_config_custom_imports_register_the_backbone_without_mmdet():
    code = (
        "import sys; sys.modules['mmdet'] = None; from mmengine.config import Config; "
        f"Config.fromfile({str(CONFIGS / 'upernet_spatialmamba_8xb2-160k_ade20k-512x512_small.py')!r}); "
        "from mmseg.registry import MODELS; cls = MODELS.get('MM_SpatialMamba'); "
        "assert cls is not None and cls.__module__ == 'spatial_mamba.openmmlab', cls"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_syncbn_sits_in_the_heads_and_sync_bn_torch_also_converts_the_backbone():
    """What is synchronised where: the heads' SyncBN comes from mmseg's config (mmengine turns it into BatchNorm when
    no launcher is used); the backbone's stem and downsampling BatchNorm stay per-GPU (docs/official_bugs.md, #19)
    unless ``sync_bn='torch'``, which the runner applies to the whole model in a distributed run."""
    from mmengine.model import convert_sync_batchnorm, revert_sync_batchnorm
    from mmseg.registry import MODELS

    cfg = _config("tiny")
    cfg.model.backbone.update(NARROW, pretrained=None)
    cfg.model.decode_head.update(in_channels=[16, 32, 64, 128], channels=16)
    cfg.model.auxiliary_head.update(in_channels=64, channels=16)
    with DefaultScope.overwrite_default_scope("mmseg"):
        segmentor = MODELS.build(cfg.model)

    def syncbn(model):
        return {n.split(".")[0] for n, m in model.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)}

    backbone_bn = [n for n, m in segmentor.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert syncbn(segmentor) == {"decode_head", "auxiliary_head"} and backbone_bn
    assert syncbn(convert_sync_batchnorm(copy.deepcopy(segmentor), "torch")) == {
        "backbone",
        "decode_head",
        "auxiliary_head",
    }
    assert syncbn(revert_sync_batchnorm(segmentor)) == set()


def test_distributed_syncbn_needs_a_gpu_in_this_torch():
    """Why no test runs SyncBN synchronised: torch's SyncBatchNorm refuses CPU tensors once a process group exists
    (checked with one gloo process; a second would not change the device check). When this test fails, torch has
    gained CPU support and a two-process gloo test of the synchronised heads becomes possible."""
    code = (
        "import torch, torch.distributed as dist; "
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:29531', rank=0, world_size=1); "
        "bn = torch.nn.SyncBatchNorm(4).train()\n"
        "try:\n    bn(torch.randn(2, 4, 3, 3))\nexcept ValueError as e:\n    print('REFUSED', e)\n"
        "dist.destroy_process_group()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "REFUSED SyncBatchNorm expected input tensor to be on GPU" in result.stdout, result.stdout


def test_get_flops_counts_the_scan_and_the_merged_state_fusion_kernel(tmp_path, monkeypatch, capsys):
    from spatial_mamba import flops as flops_module

    state_fusion_module = importlib.import_module("spatial_mamba.ops.state_fusion")  # the package re-exports a function
    config = tmp_path / "narrow.py"
    config.write_text(
        f"_base_ = '{CONFIGS / 'upernet_spatialmamba_8xb2-160k_ade20k-512x512_tiny.py'}'\n"
        "model = dict(backbone=dict(dims=16, depths=(1, 2, 1, 1)), decode_head=dict(in_channels=[16, 32, 64, 128]),"
        " auxiliary_head=dict(in_channels=64))\n"
    )
    height, width = 128, 96
    total = cli.flops(cli.MMSEG, [str(config), "--shape", str(height), str(width)])
    assert "Flops:" in capsys.readouterr().out
    monkeypatch.setattr(flops_module, "scan_flops", lambda *args: 0)
    without_scan = cli.flops(cli.MMSEG, [str(config), "--shape", str(height), str(width)])
    monkeypatch.setattr(state_fusion_module, "depthwise_conv2d_replicate", lambda h, weight, dilation: h.clone())
    without_fusion = cli.flops(cli.MMSEG, [str(config), "--shape", str(height), str(width)])

    # Per block of stage i: the scan does 7·L·D·N multiply-adds (N = 1) and the merged 11x11 state-fusion kernel
    # 121·L·D; the official counter saw neither.
    stages = [(depth, 2 * 16 * 2**i, (height // 4 >> i) * (width // 4 >> i)) for i, depth in enumerate((1, 2, 1, 1))]
    assert total - without_scan == sum(depth * 7 * length * d_inner for depth, d_inner, length in stages)
    assert without_scan - without_fusion == sum(depth * 121 * length * d_inner for depth, d_inner, length in stages)


def test_test_script_tta_wraps_the_segmentor_and_swaps_in_the_tta_pipeline(tmp_path, monkeypatch):
    built = []

    class Runner:
        def test(self):
            return {}

    monkeypatch.setattr(cli, "_build_runner", lambda cfg: built.append(cfg) or Runner())
    checkpoint = tmp_path / "iter_160000.pth"
    checkpoint.write_bytes(b"")
    cli.test(
        cli.MMSEG, [str(CONFIGS / "upernet_spatialmamba_8xb2-160k_ade20k-512x512_tiny.py"), str(checkpoint), "--tta"]
    )
    (cfg,) = built
    assert cfg.model.type == "SegTTAModel" and cfg.model.module.type == "EncoderDecoder"
    assert cfg.model.module.backbone.pretrained is None  # the checkpoint holds every weight
    assert cfg.test_dataloader.dataset.pipeline == cfg.tta_pipeline
    assert cfg.load_from == str(checkpoint)


def test_out_and_show_dir_write_label_maps_and_drawings_where_mmseg_does(tmp_path, monkeypatch):
    built = []

    class Runner:
        def test(self):
            return {}

    monkeypatch.setattr(cli, "_build_runner", lambda cfg: built.append(cfg) or Runner())
    checkpoint = tmp_path / "iter_160000.pth"
    checkpoint.write_bytes(b"")
    config = str(CONFIGS / "upernet_spatialmamba_8xb2-160k_ade20k-512x512_tiny.py")
    cli.test(cli.MMSEG, [config, str(checkpoint), "--out", "preds", "--show-dir", "vis", "--wait-time", "1"])
    (cfg,) = built
    assert (cfg.test_evaluator.output_dir, cfg.test_evaluator.keep_results) == ("preds", True)
    hook = cfg.default_hooks.visualization
    assert (hook.type, hook.draw, hook.get("show", False)) == ("SegVisualizationHook", True, False)
    assert cfg.visualizer.save_dir == "vis"


# --- mmseg's own tools (shipped in the installed package) on our configs ---------------------------------------------
@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """The narrow UPerNet of the end-to-end test on two generated scenes."""
    tmp = tmp_path_factory.mktemp("mmseg_tools")
    write_ade20k(tmp / "ade", [("validation", 2)])
    return tmp, write_config(tmp / "narrow.py", tmp / "ade")


def test_mmseg_benchmark_runs_our_segmentor_from_the_config(narrow):
    tmp, config = narrow
    # mmseg's benchmark takes no --cfg-options and reports FPS only after 200 test images (too slow for CI on 2
    # cores): here it runs our segmentor on the two scenes, and the result file says that no FPS was measured.
    out = run_mmseg_tool("analysis_tools/benchmark.py", config, "unused.pth", "--work-dir", tmp / "fps", cwd=tmp)
    assert "Average fps of 1 evaluations" in out, out[-2000:]
    (result,) = (tmp / "fps").glob("fps_*.json")
    assert json.loads(result.read_text())["config"] == str(config)


def test_mmseg_get_flops_is_broken_upstream_for_every_model(narrow):
    """mmseg 1.2.2's analysis_tools/get_flops.py hands both ``input_shape`` and ``inputs`` to mmengine 0.10.7's
    ``get_model_complexity_info``, which refuses that before looking at the model (the segmentation README points to
    our ``tools/get_flops.py`` instead). When this test fails, the upstream tool works again: test it on our config as
    mmdet's is."""
    tmp, config = narrow
    with pytest.raises(AssertionError, match='"input_shape" and "inputs" cannot be both set'):
        run_mmseg_tool("analysis_tools/get_flops.py", config, "--shape", "64", "64", cwd=tmp)


def test_mmseg_get_flops_counts_our_segmentor_on_the_mmengine_it_was_written_for(narrow):
    """With mmengine 0.7.2, the last that takes both ``input_shape`` and ``inputs`` (tools/setup_env.sh --mm installs
    it beside the venv's own; segmentation/README.md), mmseg's own get_flops.py builds our segmentor from the config
    and counts it: its parameter count is the segmentor's without the auxiliary head, which the tool drops."""
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    old_mmengine = Path(sys.prefix) / "mmengine-0.7.2"
    assert (old_mmengine / "mmengine").is_dir(), f"{old_mmengine} is missing: run tools/setup_env.sh --mm"
    tmp, config = narrow
    out = run_mmseg_tool(
        "analysis_tools/get_flops.py", config, "--shape", "64", "64", cwd=tmp, first_on_path=(old_mmengine,)
    )
    assert "Input shape: (64, 64)" in out, out[-2000:]
    flops = re.search(r"Flops: ([0-9.]+)M", out)
    params = re.search(r"Params: ([0-9.]+)M", out)
    assert flops and params, out[-2000:]

    register_all_modules()
    cfg = Config.fromfile(config)
    model = MODELS.build(cfg.model)
    expected = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("auxiliary_head."))
    assert float(params.group(1)) == pytest.approx(expected / 1e6, abs=0.0005)
    assert float(flops.group(1)) > 0
