"""ImageNet-style data: the ImageFolder tree (or Swin's zip layout), the official train/eval transforms, distributed
samplers and timm's Mixup/CutMix (the recipe of the official ``classification/data/build.py``).

The data folder is checked before anything is built: a missing or empty folder, a val split whose classes differ
from train, or more classes than MODEL.NUM_CLASSES each stop with a message naming the path.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from typing import List, Tuple

import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data import auto_augment as timm_auto_augment
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode

from .config import UsageError
from .distributed import DistInfo

__all__ = [
    "build_loader",
    "build_dataset",
    "build_transform",
    "build_mixup",
    "posterize",
    "use_safe_posterize",
    "check_data_path",
    "ShardSampler",
    "ZipImageDataset",
]

logger = logging.getLogger("classification")


def posterize(img: Image.Image, bits_to_keep, **_) -> Image.Image:
    """Keeps the ``bits_to_keep`` high bits of every channel value; 0 bits kept gives a black image.

    Pillow up to 12 computed ``value & ~(2 ** (8 - bits) - 1)``, which for 0 bits is 0 everywhere: a black image,
    what the recipe behind the published numbers drew. Pillow 13 refuses 0 bits, and timm's RandAugment asks for
    them (``PosterizeIncreasing`` at magnitude 10): we keep the old result for every Pillow version."""
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits <= 0:
        return Image.new(img.mode, img.size)  # every channel 0
    return ImageOps.posterize(img, bits)


def _augment_ops(transform):
    """Every timm ``AugmentOp`` inside ``transform``: RandAugment and AugMix keep theirs in ``ops``, AutoAugment in
    ``policy`` (a list of sub-policies, each a list of ops); a ``Compose`` is searched step by step."""
    if isinstance(transform, timm_auto_augment.AugmentOp):
        yield transform
    elif isinstance(transform, transforms.Compose):
        for step in transform.transforms:
            yield from _augment_ops(step)
    elif isinstance(transform, (timm_auto_augment.RandAugment, timm_auto_augment.AugMixAugment)):
        for op in transform.ops:
            yield from _augment_ops(op)
    elif isinstance(transform, timm_auto_augment.AutoAugment):
        for sub_policy in transform.policy:
            for op in sub_policy:
                yield from _augment_ops(op)


def use_safe_posterize(transform) -> int:
    """Makes every posterize op of the RandAugment/AutoAugment/AugMix policies in ``transform`` use :func:`posterize`
    (0 bits -> black image, any Pillow); returns how many ops it changed."""
    changed = 0
    for op in _augment_ops(transform):
        if op.aug_fn is timm_auto_augment.posterize or op.name.startswith("Posterize"):
            op.aug_fn = posterize
            changed += 1
    return changed


def _has_augment_policy(transform) -> bool:
    policies = (timm_auto_augment.RandAugment, timm_auto_augment.AugMixAugment, timm_auto_augment.AutoAugment)
    steps = transform.transforms if isinstance(transform, transforms.Compose) else [transform]
    return any(isinstance(step, policies) for step in steps)


def transform_uses_policy(config) -> bool:
    """Whether AUG.AUTO_AUGMENT names a policy (``none`` or empty turns it off)."""
    return config.AUG.AUTO_AUGMENT not in (None, "", "none")


def build_transform(is_train: bool, config):
    """The official transforms (Swin's ``build_transform``): timm's RandAugment/erasing pipeline for training;
    resize to IMG_SIZE/0.875 and center-crop for evaluation. Images of 32 px or less are not resized."""
    img_size = config.DATA.IMG_SIZE
    resize_im = img_size > 32
    if is_train:
        transform = create_transform(
            input_size=img_size,
            is_training=True,
            color_jitter=config.AUG.COLOR_JITTER if config.AUG.COLOR_JITTER > 0 else None,
            auto_augment=config.AUG.AUTO_AUGMENT if transform_uses_policy(config) else None,
            re_prob=config.AUG.REPROB,
            re_mode=config.AUG.REMODE,
            re_count=config.AUG.RECOUNT,
            interpolation=config.DATA.INTERPOLATION,
        )
        if transform_uses_policy(config) and not _has_augment_policy(transform):
            raise RuntimeError(  # a timm release that builds its policies differently: do not train without the fix
                f"AUG.AUTO_AUGMENT={config.AUG.AUTO_AUGMENT!r}: no RandAugment/AutoAugment/AugMix step found in "
                f"timm's transform {transform}, so its posterize ops cannot be made safe"
            )
        use_safe_posterize(transform)
        if not resize_im:
            # CIFAR-sized images: a padded random crop instead of RandomResizedCrop (as the official code does).
            transform.transforms[0] = transforms.RandomCrop(img_size, padding=4)
        return transform
    steps = []
    if resize_im:
        interpolation = InterpolationMode(config.DATA.INTERPOLATION)
        if config.TEST.CROP:
            steps += [transforms.Resize(int(256 / 224 * img_size), interpolation), transforms.CenterCrop(img_size)]
        else:
            steps.append(transforms.Resize((img_size, img_size), interpolation))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(steps)


def build_mixup(config) -> Mixup | None:
    aug = config.AUG
    if not (aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None):
        return None
    return Mixup(
        mixup_alpha=aug.MIXUP,
        cutmix_alpha=aug.CUTMIX,
        cutmix_minmax=aug.CUTMIX_MINMAX,
        prob=aug.MIXUP_PROB,
        switch_prob=aug.MIXUP_SWITCH_PROB,
        mode=aug.MIXUP_MODE,
        label_smoothing=config.MODEL.LABEL_SMOOTHING,
        num_classes=config.MODEL.NUM_CLASSES,
    )


def _class_folders(split_dir: str) -> List[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def _zip_map_labels(map_file: str) -> List[int]:
    if not os.path.isfile(map_file):
        raise UsageError(f"zip mode (--zip) needs {map_file!r} (lines 'path<TAB>label'); it does not exist")
    labels = []
    with open(map_file) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2 or not parts[1].strip().isdigit():
                    raise UsageError(f"{map_file!r} line {number}: expected 'path<TAB>label', got {line.strip()!r}")
                labels.append(int(parts[1]))
    if not labels:
        raise UsageError(f"{map_file!r} lists no images")
    return labels


def check_data_path(config) -> int:
    """Checks DATA.DATA_PATH and returns the number of classes; raises :class:`UsageError` naming the problem."""
    root = config.DATA.DATA_PATH
    if not root:
        raise UsageError("no data folder: pass --data-path DIR, with DIR/train/<class>/<image> and DIR/val/...")
    if not os.path.isdir(root):
        raise UsageError(f"data path {root!r} (--data-path / DATA.DATA_PATH) does not exist or is not a folder")
    if config.DATA.ZIP_MODE:
        for split in ("train", "val"):
            if not os.path.isfile(os.path.join(root, f"{split}.zip")):
                raise UsageError(f"zip mode (--zip) needs {os.path.join(root, split + '.zip')!r}; it does not exist")
        train, val = (set(_zip_map_labels(os.path.join(root, f"{s}_map.txt"))) for s in ("train", "val"))
        if not val <= train:
            raise UsageError(f"{root!r}: val_map.txt has labels that train_map.txt lacks: {sorted(val - train)[:10]}")
        num_classes = max(train) + 1
    else:
        classes = {}
        for split in ("train", "val"):
            split_dir = os.path.join(root, split)
            if not os.path.isdir(split_dir):
                raise UsageError(
                    f"data path {root!r} has no '{split}' folder: expected {root}/train/<class>/<image> "
                    f"and {root}/val/<class>/<image>"
                )
            classes[split] = _class_folders(split_dir)
            if not classes[split]:
                raise UsageError(f"{split_dir!r} is empty: expected one folder of images per class")
        if classes["train"] != classes["val"]:
            only_train = sorted(set(classes["train"]) - set(classes["val"]))
            only_val = sorted(set(classes["val"]) - set(classes["train"]))
            raise UsageError(
                f"the classes of {os.path.join(root, 'val')!r} differ from those of {os.path.join(root, 'train')!r}: "
                f"{len(only_train)} only in train {only_train[:5]}, {len(only_val)} only in val {only_val[:5]}"
            )
        num_classes = len(classes["train"])
    if num_classes > config.MODEL.NUM_CLASSES:
        raise UsageError(
            f"data path {root!r} has {num_classes} classes but MODEL.NUM_CLASSES is {config.MODEL.NUM_CLASSES}: "
            f"set --opts MODEL.NUM_CLASSES {num_classes} (or pass the --cfg made for this data)"
        )
    if num_classes < config.MODEL.NUM_CLASSES:
        logger.warning(
            "data path %r has %d classes but the classifier has MODEL.NUM_CLASSES=%d outputs",
            root,
            num_classes,
            config.MODEL.NUM_CLASSES,
        )
    return num_classes


class ZipImageDataset(Dataset):
    """Swin's zip layout: ``DATA_PATH/{split}.zip`` holds the images and ``DATA_PATH/{split}_map.txt`` has one
    ``path<TAB>label`` line per image (``path`` inside the zip). ``cache`` holds the encoded bytes of the given
    indices in memory; the rest are read from the zip on demand (one handle per worker process)."""

    def __init__(self, root: str, split: str, transform, cache_indices: range | None = None):
        self.zip_path = os.path.join(root, f"{split}.zip")
        self.transform = transform
        self.samples: List[Tuple[str, int]] = []
        with open(os.path.join(root, f"{split}_map.txt")) as f:
            for line in f:
                if line.strip():
                    path, label = line.rstrip("\n").split("\t")
                    self.samples.append((path.lstrip("/"), int(label)))
        self.targets = [label for _, label in self.samples]
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        self.cache = {}
        if cache_indices is not None:
            for index in cache_indices:
                self.cache[index] = self._read(self.samples[index][0])
            self._close()

    def _read(self, member: str) -> bytes:
        if self._zip is None or self._zip_pid != os.getpid():  # a forked worker must not share the parent's handle
            self._zip, self._zip_pid = zipfile.ZipFile(self.zip_path), os.getpid()
        try:
            return self._zip.read(member)
        except KeyError:
            raise UsageError(f"{self.zip_path!r} has no member {member!r} listed in its map file") from None

    def _close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"], state["_zip_pid"] = None, -1
        return state

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        data = self.cache[index] if index in self.cache else self._read(path)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return self.transform(image), label


class ShardSampler(Sampler):
    """This rank's share of the indices, ``rank::world_size``, without the padding DistributedSampler adds: every
    image is evaluated exactly once, so summed counts give the exact accuracy. With ``shuffle`` the share is
    reshuffled each epoch (``set_epoch``), which is how zip mode's per-rank cache is trained on."""

    def __init__(self, dataset_size: int, rank: int, world_size: int, shuffle: bool = False, seed: int = 0):
        self.indices = list(range(rank, dataset_size, world_size))
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(self.indices)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter([self.indices[i] for i in torch.randperm(len(self.indices), generator=generator).tolist()])

    def __len__(self) -> int:
        return len(self.indices)


def build_dataset(is_train: bool, config, rank: int = 0, world_size: int = 1):
    """The train or val dataset with its transform; zip mode caches this rank's share (or all) of the images."""
    split = "train" if is_train else "val"
    transform = build_transform(is_train, config)
    root = config.DATA.DATA_PATH
    if config.DATA.ZIP_MODE:
        size = sum(1 for line in open(os.path.join(root, f"{split}_map.txt")) if line.strip())
        mode = config.DATA.CACHE_MODE
        cache = range(size) if mode == "full" else range(rank, size, world_size)
        return ZipImageDataset(root, split, transform, cache if mode != "no" else None)
    try:
        return datasets.ImageFolder(os.path.join(root, split), transform=transform)
    except FileNotFoundError as err:  # a class folder without images
        raise UsageError(
            f"{os.path.join(root, split)!r}: {err} (image extensions: {', '.join(IMG_EXTENSIONS)})"
        ) from None


def build_loader(config, dist_info: DistInfo, train: bool = True):
    """Returns the train loader (None when ``train`` is False: evaluation reads only the val split), the val loader
    and the Mixup/CutMix function (None when off)."""
    check_data_path(config)
    batch, world = config.DATA.BATCH_SIZE, dist_info.world_size
    workers = config.DATA.NUM_WORKERS
    common = dict(
        num_workers=workers,
        pin_memory=config.DATA.PIN_MEMORY and dist_info.device.type == "cuda",
        persistent_workers=config.DATA.PERSISTENT_WORKERS and workers > 0,
    )
    dataset_val = build_dataset(False, config, dist_info.rank, world)
    if config.TEST.SEQUENTIAL:  # official: every rank evaluates the whole val set in order
        sampler_val = SequentialSampler(dataset_val)
    else:
        sampler_val = ShardSampler(len(dataset_val), dist_info.rank, world)
    loader_val = DataLoader(dataset_val, batch_size=batch, sampler=sampler_val, drop_last=False, **common)
    if not train:
        logger.info("data: %d val images from %r", len(dataset_val), config.DATA.DATA_PATH)
        return None, loader_val, None
    dataset_train = build_dataset(True, config, dist_info.rank, world)
    if len(dataset_train) < batch * world:
        raise UsageError(
            f"the train split of {config.DATA.DATA_PATH!r} has {len(dataset_train)} images, fewer than one batch "
            f"per process ({batch} x {world} processes); lower --batch-size"
        )
    if config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == "part":
        sampler_train = ShardSampler(len(dataset_train), dist_info.rank, world, shuffle=True, seed=config.SEED)
    else:
        sampler_train = DistributedSampler(
            dataset_train, num_replicas=world, rank=dist_info.rank, shuffle=True, seed=config.SEED
        )
    loader_train = DataLoader(dataset_train, batch_size=batch, sampler=sampler_train, drop_last=True, **common)
    logger.info(
        "data: %d train and %d val images from %r, %d train steps per epoch (batch %d x %d processes)",
        len(dataset_train),
        len(dataset_val),
        config.DATA.DATA_PATH,
        len(loader_train),
        batch,
        world,
    )
    return loader_train, loader_val, build_mixup(config)
