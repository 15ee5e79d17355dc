"""The official recipe at full strength, in process: the shipped tiny config's training transform (RandAugment with the
posterize case that crashed under Pillow 13, random erasing), Mixup/CutMix with label smoothing, EMA, MESA, gradient
clipping, accumulation, bf16 autocast on the CPU and gradient checkpointing from the config; and the official log
lines word for word."""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment
from timm.data.random_erasing import RandomErasing
from timm.utils import ModelEmaV3

import spatial_mamba
from classification import data as data_module
from classification.config import load_config
from classification.data import build_dataset, build_mixup, build_transform, posterize, use_safe_posterize
from classification.distributed import DistInfo
from classification.engine import GradScalerWithNorm, measure_throughput, resolve_amp, train_one_epoch, validate
from classification.models import build_model
from classification.optim import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "classification" / "configs" / "spatialmamba" / "spatialmamba_tiny.yaml"
# The shipped tiny recipe with only the model and the images shrunk (what a new user tries first).
SHRUNK = ["MODEL.SPATIALMAMBA.EMBED_DIM", "8", "MODEL.SPATIALMAMBA.DEPTHS", "[1, 1, 1, 1]", "DATA.IMG_SIZE", "40"]


def tiny_recipe(*opts):
    return load_config(TINY, [*SHRUNK, *opts])


# Training in process runs on 16 px images (a padded random crop replaces RandomResizedCrop at 32 px or less; the
# transform as shipped, at 40 px, is exercised above): a step at 40 px costs seconds on a small CPU.
SMALL = ["DATA.IMG_SIZE", "16", "MODEL.NUM_CLASSES", "4", "DATA.NUM_WORKERS", "0"]


def old_pillow_posterize(array: np.ndarray, bits: int) -> np.ndarray:
    """What Pillow up to 12 computed (ImageOps.posterize): value & ~(2 ** (8 - bits) - 1), for any bits in 0..8."""
    mask = ~(2 ** (8 - bits) - 1)
    return (array.astype(np.int64) & mask).astype(np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_posterize_matches_old_pillow_for_every_bit_count_including_zero(mode):
    rng = np.random.default_rng(0)
    shape = (9, 7, 3) if mode == "RGB" else (9, 7)
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    image = Image.fromarray(array, mode=mode)
    for bits in range(0, 9):
        out = posterize(image, bits)
        assert out.mode == mode and out.size == image.size
        np.testing.assert_array_equal(np.asarray(out), old_pillow_posterize(array, bits), err_msg=f"bits={bits}")
    assert not np.asarray(posterize(image, 0)).any()  # 0 bits kept: black
    assert not np.asarray(posterize(image, -1)).any()


POLICIES = [
    "rand-m9-mstd0.5-inc1",  # the official default
    "rand-m9-mstd0.5",
    "rand-m10-n3-mstd0",
    "rand-m9-n2-inc1-mmax10",
    "original-mstd0.5",
    "originalr",
    "v0",
    "v0r",
    "augmix-m5-w3-d2",
]


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_string_gets_the_safe_posterize(policy):
    """Every posterize op of the policy uses ours; each is driven to the magnitude that asks for 0 bits (if any) and
    must give a black image rather than Pillow 13's ValueError."""
    config = tiny_recipe("AUG.AUTO_AUGMENT", policy)
    transform = build_transform(True, config)
    ops = list(data_module._augment_ops(transform))
    posterize_ops = [op for op in ops if op.name.startswith("Posterize")]
    assert ops and posterize_ops, f"{policy}: no augment ops found in {transform}"
    assert all(op.aug_fn is posterize for op in posterize_ops)
    assert not any(op.aug_fn is timm_auto_augment.posterize for op in ops)
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    for op in posterize_ops:
        op.prob, op.magnitude_std = 1.0, 0.0
        for magnitude in (0.0, 10.0):
            op.magnitude = magnitude
            (bits,) = op.level_fn(magnitude, op.hparams)
            out = np.asarray(op(image))
            if bits <= 0:
                assert not out.any(), f"{policy} {op.name} m={magnitude}: 0 bits must give a black image"


def test_use_safe_posterize_counts_what_it_changed():
    transform = timm_auto_augment.rand_augment_transform("rand-m9-mstd0.5-inc1", {})
    assert use_safe_posterize(transform) == 1 and use_safe_posterize(transform) == 1  # idempotent
    assert use_safe_posterize(timm_auto_augment.auto_augment_transform("3a", {})) == 0  # no posterize in 3a


def _run_transform(transform, images, seed=0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return [transform(image) for image in images]


def test_default_training_transform_over_thousands_of_images_survives_the_zero_bit_posterize(monkeypatch):
    """The shipped tiny recipe's transform (RandAugment rand-m9-mstd0.5-inc1, random erasing) over 2,000 images,
    seeded: the 0-bit posterize is drawn (counted, so this test fails if it is not reached) and gives a black image.
    The same seeded loop with timm's own posterize reproduces the crash users saw under Pillow 13."""
    config = tiny_recipe()
    transform = build_transform(True, config)
    erasing = transform.transforms[-1]
    assert isinstance(erasing, RandomErasing) and erasing.probability == 0.25 and erasing.mode == "pixel"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)) for _ in range(2000)]

    zero_bits = []

    def spy(img, bits_to_keep, **kwargs):
        out = posterize(img, bits_to_keep, **kwargs)
        if int(bits_to_keep) <= 0:
            zero_bits.append(np.asarray(out))
        return out

    for op in data_module._augment_ops(transform):
        if op.aug_fn is posterize:
            op.aug_fn = spy
    outputs = _run_transform(transform, images)
    assert len(outputs) == 2000 and all(o.shape == (3, 40, 40) and torch.isfinite(o).all() for o in outputs)
    assert zero_bits, "the seeded loop no longer draws the 0-bit posterize: pick a seed that does"
    assert all(not black.any() for black in zero_bits)

    # Without the fix: timm's posterize hands 0 bits to Pillow.
    for op in data_module._augment_ops(transform):
        if op.aug_fn is spy:
            op.aug_fn = timm_auto_augment.posterize
    try:
        ImageOps.posterize(Image.new("RGB", (2, 2)), 0)
    except ValueError:
        with pytest.raises(ValueError, match="bits"):
            _run_transform(transform, images)
    else:  # a Pillow that accepts 0 bits: nothing to reproduce, the fix must still give the same black images
        pass


def test_mixup_cutmix_with_label_smoothing_gives_mixed_smoothed_targets():
    config = tiny_recipe("MODEL.NUM_CLASSES", "4")
    mixup = build_mixup(config)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing) == (0.8, 1.0, 0.1)
    torch.manual_seed(0)
    np.random.seed(0)
    images = torch.randn(8, 3, 40, 40)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mixed, targets = mixup(images.clone(), labels)
    assert targets.shape == (8, 4)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    off = 0.1 / 4
    assert targets.min() >= off - 1e-6 and targets.max() <= 1 - 0.1 + off + 1e-6  # smoothed: no hard 0 or 1
    assert ((targets > off + 1e-4).sum(1) == 2).all()  # every row mixes two classes (flipped batch pairs)
    assert not torch.equal(mixed, images)


def test_grad_clipping_clips_to_the_configured_norm_and_returns_the_norm_before():
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = GradScalerWithNorm(resolve_amp(tiny_recipe("AMP_ENABLE", "False"), torch.device("cpu")))
    loss = (model(torch.full((2, 4), 100.0)) ** 2).sum()
    norm = scaler(loss, optimizer, list(model.parameters()), clip_grad=5.0, update_grad=True)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm > 5.0 * 10
    torch.testing.assert_close(after, torch.tensor(5.0), rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def recipe_state(tmp_path_factory):
    """Two epochs' worth of the full recipe in process on a 4-class ImageFolder: everything on at once."""
    from .conftest import write_image_folder

    folder = write_image_folder(tmp_path_factory.mktemp("recipe"), train_per_class=2, val_per_class=3)
    config = tiny_recipe(
        *SMALL, "DATA.DATA_PATH", str(folder), "DATA.BATCH_SIZE", "4", "TRAIN.EPOCHS", "4", "TRAIN.WARMUP_EPOCHS",
        "1", "TRAIN.ACCUMULATION_STEPS", "2", "TRAIN.USE_CHECKPOINT", "True", "AMP_DTYPE", "bfloat16",
        "MODEL_EMA_DECAY", "0.5", "PRINT_FREQ", "1", "TRAIN.BASE_LR", "0.5",
    )  # fmt: skip
    config.freeze()
    assert config.TRAIN.MESA == 1.0 and config.TRAIN.CLIP_GRAD == 5.0 and config.AUG.REPROB == 0.25
    dist_info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(config)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ema = ModelEmaV3(model, decay=config.MODEL_EMA_DECAY)
    dataset = build_dataset(True, config)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True)
    optimizer = build_optimizer(config, model)
    calls = {"blocks": 0, "teacher": 0, "head_dtypes": set(), "steps": 0}
    scheduler = build_scheduler(config, optimizer, len(loader) // 2)
    amp = resolve_amp(config, dist_info.device)
    scaler = GradScalerWithNorm(amp)
    blocks = [m for m in model.modules() if isinstance(m, spatial_mamba.models.SpatialMambaBlock)]
    for block in blocks:
        # A pre-hook: the recomputation may stop early, before a forward hook would run.
        block.register_forward_pre_hook(lambda *_: calls.__setitem__("blocks", calls["blocks"] + 1))
    model.head.register_forward_hook(lambda m, i, o: calls["head_dtypes"].add(o.dtype))
    ema.module.register_forward_hook(lambda *_: calls.__setitem__("teacher", calls["teacher"] + 1))
    from timm.loss import SoftTargetCrossEntropy

    epoch = 1  # MESA is on from int(0.25 * 4) = 1
    stats = train_one_epoch(config, model, model, SoftTargetCrossEntropy(), loader, optimizer, epoch,
                            build_mixup(config), scheduler, scaler, ema, amp, dist_info.device)  # fmt: skip
    # Steps counted from the optimizer's own state (AdamW keeps a step count per parameter), not with a step hook: on
    # torch 2.1, once torch.compile has run in the process (another test), step hooks no longer fire.
    calls["steps"] = int(max((state["step"] for state in optimizer.state.values()), default=0))
    return dict(config=config, model=model, ema=ema, initial=initial, stats=stats, calls=calls, batches=len(loader),
                blocks=len(blocks), amp=amp, folder=folder)  # fmt: skip


def test_full_recipe_step_uses_bf16_checkpointing_mesa_accumulation_and_ema(recipe_state):
    s = recipe_state
    calls, batches = s["calls"], s["batches"]
    assert batches == 2 and np.isfinite(s["stats"]["loss"])
    assert s["amp"].enabled and calls["head_dtypes"] == {torch.bfloat16}  # bf16 autocast on the CPU
    # TRAIN.USE_CHECKPOINT reached the model: every block runs twice per micro-batch (forward, then recomputed in
    # the backward pass); without the wiring it runs once.
    assert calls["blocks"] == 2 * s["blocks"] * batches
    assert calls["teacher"] == batches  # MESA: the EMA teacher sees every micro-batch
    assert calls["steps"] == batches // 2  # ACCUMULATION_STEPS 2
    model, ema, initial = s["model"].state_dict(), s["ema"].module.state_dict(), s["initial"]
    moved = [k for k, v in model.items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert len(moved) > len(model) // 2
    name = "head.weight"
    assert not torch.equal(ema[name], initial[name]) and not torch.equal(ema[name], model[name])


def test_without_the_config_switch_blocks_run_once():
    config = tiny_recipe(*SMALL)
    model = build_model(config)
    count = [0]
    for block in model.modules():
        if isinstance(block, spatial_mamba.models.SpatialMambaBlock):
            block.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    model.train()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert count[0] == 4  # 4 blocks, no recomputation


OFFICIAL_TRAIN_LINE = re.compile(
    r"^Train: \[1/4\]\[\d+/2\]\teta \d+:\d\d:\d\d lr \d+\.\d{6}\t wd \d+\.\d{4}\t"
    r"time \d+\.\d{4} \(\d+\.\d{4}\)\tdata time \d+\.\d{4} \(\d+\.\d{4}\)\tmodel time \d+\.\d{4} \(\d+\.\d{4}\)\t"
    r"loss \d+\.\d{4} \(\d+\.\d{4}\)\tgrad_norm \d+\.\d{4} \(\d+\.\d{4}\)\tloss_scale \d+\.\d{4} \(\d+\.\d{4}\)\t"
    r"mem \d+MB$"
)


def test_official_log_lines(recipe_state, caplog):
    s = recipe_state
    with caplog.at_level(logging.INFO, logger="classification"):
        loader = torch.utils.data.DataLoader(build_dataset(False, s["config"]), batch_size=4)
        result = validate(s["config"], loader, s["ema"].module, s["amp"], name="network ema")
        throughput_config = s["config"].clone()
        throughput_config.defrost()
        throughput_config.THROUGHPUT_WARMUP, throughput_config.THROUGHPUT_ITERS = 1, 2
        measure_throughput(throughput_config, s["model"], torch.randn(2, 3, 16, 16), s["amp"])
    lines = [r.getMessage() for r in caplog.records]
    assert f" * Acc@1 {result['acc1']:.3f} Acc@5 {result['acc5']:.3f}" in lines
    assert f"Accuracy of the network ema on the 12 test images: {result['acc1']:.1f}%" in lines
    assert result["count"] == 12
    assert "throughput averaged with 2 times" in lines
    assert any(re.fullmatch(r"batch_size 2 throughput \d+\.\d+(e[+-]\d+)?", line) for line in lines)
    assert any(re.fullmatch(r"batch_size 2 mem cost \d+\.\d+ MB", line) for line in lines)


def test_official_train_and_epoch_lines(tmp_path, caplog):
    from .conftest import write_image_folder

    folder = write_image_folder(tmp_path, train_per_class=2, val_per_class=1)
    config = tiny_recipe(
        *SMALL, "DATA.DATA_PATH", str(folder), "DATA.BATCH_SIZE", "4", "TRAIN.EPOCHS", "4", "TRAIN.WARMUP_EPOCHS", "1",
        "PRINT_FREQ", "1", "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0", "TRAIN.MESA", "-1.0",
    )  # fmt: skip
    model = build_model(config)
    loader = torch.utils.data.DataLoader(build_dataset(True, config), batch_size=4, drop_last=True)
    optimizer = build_optimizer(config, model)
    amp = resolve_amp(config, torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="classification"):
        train_one_epoch(config, model, model, torch.nn.CrossEntropyLoss(), loader, optimizer, 1, None,
                        build_scheduler(config, optimizer, len(loader)), GradScalerWithNorm(amp), None, amp,
                        torch.device("cpu"))  # fmt: skip
    lines = [r.getMessage() for r in caplog.records]
    train_lines = [line for line in lines if line.startswith("Train:")]
    assert len(train_lines) == 2 and all(OFFICIAL_TRAIN_LINE.match(line) for line in train_lines), train_lines
    assert sum(bool(re.fullmatch(r"EPOCH 1 training takes \d+:\d\d:\d\d", line)) for line in lines) == 1


def test_stale_fusion_switch_freezes_each_kernel_at_its_first_evaluation():
    import copy

    from classification.stale_fusion import freeze_fusion_kernels_at_first_eval

    torch.manual_seed(0)
    model = build_model(tiny_recipe(*SMALL))
    assert freeze_fusion_kernels_at_first_eval(model) == 4  # one per block
    fusion = model.layers[0].blocks[0].self_attention.state_fusion
    reference = copy.deepcopy(fusion)  # the same weights, without the hook
    reference._forward_hooks.clear()
    h = torch.randn(2, fusion.kernel_3.shape[0], 6, 5)
    fusion.eval(), reference.eval()
    with torch.no_grad():
        first = fusion(h)
        torch.testing.assert_close(first, reference(h))  # first evaluation: the current kernels
        update = 0.1 * torch.randn_like(fusion.kernel_3_1)
        for module in (fusion, reference):  # a training update of the fusion kernels
            module.kernel_3.mul_(0.5)
            module.kernel_3_1.add_(update)
            module.alpha.add_(0.3)
        stale, fresh = fusion(h), reference(h)
    torch.testing.assert_close(stale, first)  # the kernel of the first evaluation, as the official cache
    assert (stale - fresh).abs().max() > 0.1 * fresh.abs().max()  # ... not that of the current weights
    fusion.train(), reference.train()
    with torch.no_grad():
        torch.testing.assert_close(fusion(h), reference(h))  # training mode is left alone


def test_device_comes_from_local_rank_not_the_global_rank(monkeypatch):
    from classification import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: None)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    info = distributed.init_distributed()
    assert chosen == [1] and info.device == torch.device("cuda", 1) and (info.rank, info.local_rank) == (3, 1)


def test_official_import_names():
    import classification.models as models

    assert spatial_mamba.Backbone_SpatialMamba is spatial_mamba.SpatialMambaBackbone
    assert models.Backbone_SpatialMamba is spatial_mamba.SpatialMambaBackbone
    model = models.build_model(tiny_recipe(*SMALL))
    assert isinstance(model, spatial_mamba.SpatialMamba) and model.head.out_features == 4


@pytest.mark.parametrize("dt_init", ["simple", "zero"])
def test_official_dt_init_choices(dt_init):
    """simple: weight and bias 0.1 * N(0, 1); zero: 0.1 * U[0, 1) (official dt initialisation)."""
    torch.manual_seed(0)
    model = build_model(tiny_recipe("MODEL.SPATIALMAMBA.DT_INIT", dt_init, "MODEL.SPATIALMAMBA.EMBED_DIM", "64"))
    ssm = model.layers[0].blocks[0].self_attention
    weight, bias = ssm.dt_projs_weight.detach(), ssm.dt_projs_bias.detach()
    if dt_init == "zero":
        assert 0 <= weight.min() and weight.max() < 0.1 and 0 <= bias.min() and bias.max() < 0.1
    else:
        assert weight.min() < 0 < weight.max() and abs(weight.std().item() - 0.1) < 0.03
        assert bias.min() < 0 < bias.max() and abs(bias.std().item() - 0.1) < 0.03


def test_unknown_dt_init_is_refused_naming_the_choices():
    from classification.config import UsageError, check_config

    with pytest.raises(UsageError, match="DT_INIT must be random, constant, simple or zero, got 'uniform'"):
        check_config(tiny_recipe("MODEL.SPATIALMAMBA.DT_INIT", "uniform"))
