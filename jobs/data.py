"""Datasets a trial can train on, as a plain registry of loader functions.

Adding a torchvision dataset is one ``_Spec`` line in ``_TORCHVISION``; any other dataset is
one function returning a ``DataBundle`` plus one line in ``DATASETS``. ``dataset.normalize``
standardises inputs to roughly zero mean and unit variance (the dataset's published
statistics), so the same learning rates and quantization calibration behave comparably;
``dataset.augment`` adds the dataset's standard training augmentation, never to the test split.
Every dataset but imagefolder is held in memory as tensors (``jobs.batches.ImageTensors`` or a
``TensorDataset``), normalised once; ``jobs.train.make_loader`` batches those on the device.
"""
from __future__ import annotations

import functools
import os
import shlex
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from jobs.batches import Augment, ImageTensors
from jobs.config import DatasetConfig


@dataclass
class DataBundle:
    """A dataset's train and test splits with what a model needs to know about them."""

    train: Dataset
    test: Dataset
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int


class DatasetMissingError(RuntimeError):
    """A dataset is not on disk and cannot (or may not) be downloaded here."""


# digits and synthetic ignore dataset.augment: they are 8x8 tensors, where the standard
# recipes (crops with padding, flips) do not apply and a one-pixel shift moves an eighth of
# the image; both are small test/teaching sets and are left exactly as they are.


def _digits(cfg: DatasetConfig) -> DataBundle:
    """scikit-learn's bundled 8x8 digits: small, offline, real handwriting."""
    # Imported here: sklearn costs about a second, and jobs.config imports this module just
    # to list the registry's names.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    # The split is fixed (not derived from the trial seed) so every trial of a sweep is
    # scored on the same test images and seeds only vary initialisation and data order.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    x_tr = torch.as_tensor(x_tr, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    x_te = torch.as_tensor(x_te, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    if cfg.normalize:
        # One scalar mean/std like MNIST's Normalize: per-pixel statistics would divide by
        # zero on the border pixels that are blank in every image. Train statistics only, so
        # nothing about the test split leaks into preprocessing.
        mean, std = x_tr.mean(), x_tr.std()
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return DataBundle(
        train=TensorDataset(x_tr, torch.as_tensor(y_tr, dtype=torch.long)),
        test=TensorDataset(x_te, torch.as_tensor(y_te, dtype=torch.long)),
        input_shape=(1, 8, 8),
        num_classes=10,
    )


_SYNTHETIC_NOISE = 2.0  # noise std relative to the templates: ~60-70% after one epoch, not 100%


def _synthetic(cfg: DatasetConfig) -> DataBundle:
    """Noisy copies of ten fixed random 8x8 templates: generated offline, for tests."""
    # A private generator with a fixed seed keeps the data identical across trial seeds,
    # processes and machines, and leaves the global RNG untouched.
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(10, 1, 8, 8, generator=g)
    scale = (1 + _SYNTHETIC_NOISE**2) ** 0.5 if cfg.normalize else 1.0

    def split(n: int) -> TensorDataset:
        # Balanced classes in a shuffled order, so a prefix (train_size) still covers all.
        y = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
        x = templates[y] + _SYNTHETIC_NOISE * torch.randn(n, 1, 8, 8, generator=g)
        # Rescaled to unit variance (normalize) to match the standardised real datasets.
        return TensorDataset(x / scale, y)

    train = split(600)
    test = split(200)
    return DataBundle(train=train, test=test, input_shape=(1, 8, 8), num_classes=10)


def _compose(pre: list, cfg: DatasetConfig, mean: tuple[float, ...], std: tuple[float, ...]):
    """``pre`` transforms, then ToTensor, then Normalize if ``dataset.normalize``."""
    from torchvision import transforms as T

    return T.Compose([*pre, T.ToTensor(), *([T.Normalize(mean, std)] if cfg.normalize else [])])


@dataclass(frozen=True)
class _Spec:
    """A torchvision dataset: class, published statistics, shape and training augmentation."""

    cls_name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, int, int]
    num_classes: int
    padding: int  # augment: random crop back to size after this much zero (black) padding
    flip: bool  # augment: random horizontal flip as well


# Digits and clothes get no flips: a mirrored 2 or 7 (or shoe) is not the same class's image.
_TORCHVISION: dict[str, _Spec] = {
    "mnist": _Spec("MNIST", (0.1307,), (0.3081,), (1, 28, 28), 10, padding=2, flip=False),
    "fashion_mnist": _Spec("FashionMNIST", (0.2860,), (0.3530,), (1, 28, 28), 10, padding=2, flip=False),
    "cifar10": _Spec("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), (3, 32, 32), 10,
                     padding=4, flip=True),
    "cifar100": _Spec("CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), (3, 32, 32), 100,
                      padding=4, flip=True),
}


def _as_tensors(split, cfg: DatasetConfig, spec: _Spec, train: bool) -> ImageTensors:
    """A loaded torchvision split as normalised float tensors, converted once for the whole split."""
    pixels = torch.as_tensor(split.data)  # uint8: MNIST-style (N, H, W), CIFAR-style (N, H, W, C)
    pixels = pixels[:, None] if pixels.dim() == 3 else pixels.permute(0, 3, 1, 2)
    # The same operations as ToTensor then Normalize, in the same order: the same float values.
    x = pixels.contiguous().float().div(255)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    if cfg.normalize:
        x = x.sub(mean).div(std)
    augment = None
    if train and cfg.augment:
        black = tuple(((0 - mean) / std).flatten().tolist()) if cfg.normalize else (0.0,) * len(spec.mean)
        augment = Augment(spec.padding, spec.flip, black)
    return ImageTensors(x, torch.as_tensor(split.targets, dtype=torch.long), augment)


def _missing_advice(name: str, root: str) -> str:
    return (f"Run `sweep data download {name} --root {shlex.quote(os.path.abspath(root))}` on a machine with internet "
            "(e.g. the login node), or set dataset.download: true there with the same dataset.root, "
            "then rerun; compute nodes only read.")


def _torchvision(cfg: DatasetConfig, spec: _Spec) -> DataBundle:
    """Load both splits of a torchvision dataset, turning 'not found' into advice."""
    # Imported here: torchvision adds more than a second on top of torch, and the offline
    # datasets (and listing the registry) never need it.
    import torchvision

    cls = getattr(torchvision.datasets, spec.cls_name)
    splits = []
    for train in (True, False):
        try:
            # No transform: the split is converted to tensors once and augmented on whole batches.
            splits.append(_as_tensors(cls(root=cfg.root, train=train, download=cfg.download), cfg, spec, train))
        except RuntimeError as e:
            # torchvision signals a missing (or md5-mismatched) dataset only through this
            # message; any other RuntimeError is a different problem and must surface as is.
            if cfg.download or "not found" not in str(e):
                raise
            raise DatasetMissingError(
                f"dataset {cfg.name!r} ({spec.cls_name}) not found or incomplete under "
                f"{os.path.abspath(cfg.root)} (dataset.root={cfg.root!r}; torchvision said: {e}). "
                + _missing_advice(cfg.name, cfg.root)
            ) from e
    return DataBundle(train=splits[0], test=splits[1], input_shape=spec.input_shape, num_classes=spec.num_classes)


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGEFOLDER_LAYOUT = "<root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg"


def _imagefolder(cfg: DatasetConfig) -> DataBundle:
    """A ``train/`` + ``val/`` folder-per-class tree at ``dataset.root`` (e.g. hymenoptera_data), 224 px."""
    import torchvision
    from torchvision import transforms as T

    root = os.path.abspath(cfg.root)
    evaluation = [T.Resize(256), T.CenterCrop(224)]
    augment = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
    splits = []
    for split, pre in (("train", augment if cfg.augment else evaluation), ("val", evaluation)):
        try:
            splits.append(torchvision.datasets.ImageFolder(os.path.join(root, split),
                                                           transform=_compose(pre, cfg, *_IMAGENET)))
        except FileNotFoundError as e:  # no folder, no class folders, or a class without images
            raise DatasetMissingError(
                f"dataset 'imagefolder' not found or incomplete under {root} (dataset.root={cfg.root!r}; {e}). "
                f"Expected {IMAGEFOLDER_LAYOUT}. imagefolder has no download: copy the tree to the shared "
                "root from a machine that has it and point dataset.root at it."
            ) from e
    train, val = splits
    if train.classes != val.classes:
        raise ValueError(f"imagefolder under {root}: train/ and val/ have different class folders "
                         f"(train: {train.classes}, val: {val.classes}); labels would not match")
    # ImageFolder lists samples class by class; a fixed shuffle lets a train_size prefix
    # cover every class (the trial's loader shuffles again per epoch).
    order = torch.randperm(len(train.samples), generator=torch.Generator().manual_seed(0)).tolist()
    train.samples = train.imgs = [train.samples[i] for i in order]
    train.targets = [s[1] for s in train.samples]
    return DataBundle(train=train, test=val, input_shape=(3, 224, 224), num_classes=len(train.classes))


DATASETS: dict[str, Callable[[DatasetConfig], DataBundle]] = {
    "digits": _digits,
    "synthetic": _synthetic,
    "imagefolder": _imagefolder,
    **{name: functools.partial(_torchvision, spec=spec) for name, spec in _TORCHVISION.items()},
}

# Input shape of each dataset without loading it (the planner lists a model's layers with it).
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8), "synthetic": (1, 8, 8), "imagefolder": (3, 224, 224),
    **{name: spec.input_shape for name, spec in _TORCHVISION.items()},
}

_NOTHING_TO_DOWNLOAD = {"digits": "bundled with scikit-learn", "synthetic": "generated on the fly"}


def download(name: str, root: str) -> str:
    """Fetch both splits of dataset ``name`` into ``root``; return one line saying where it now lives."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    if name in _NOTHING_TO_DOWNLOAD:
        return f"{name}: nothing to download ({_NOTHING_TO_DOWNLOAD[name]})"
    if name not in _TORCHVISION:
        raise ValueError(f"{name} has no download: copy a tree laid out as {IMAGEFOLDER_LAYOUT} to the "
                         "shared data root and set dataset.root to it")
    import torchvision

    cls = getattr(torchvision.datasets, _TORCHVISION[name].cls_name)
    for train in (True, False):  # returns at once for files already present (and intact)
        cls(root=root, train=train, download=True)
    folder = getattr(cls, "base_folder", None) or cls.__name__
    return f"{name}: {os.path.join(os.path.abspath(root), folder)}"


def load_dataset(cfg: DatasetConfig) -> DataBundle:
    """Load the configured dataset, keeping only the first ``train_size`` training samples if set."""
    try:
        loader = DATASETS[cfg.name]
    except KeyError:
        raise ValueError(f"unknown dataset {cfg.name!r}; known: {', '.join(sorted(DATASETS))}") from None
    bundle = loader(cfg)
    if cfg.train_size > 0:
        available = len(bundle.train)
        # Refuse rather than silently use fewer samples: two trials that differ only in an
        # oversized train_size would otherwise be the same experiment under different ids.
        if cfg.train_size > available:
            raise ValueError(f"dataset.train_size={cfg.train_size} but {cfg.name!r} has only "
                             f"{available} training samples")
        bundle.train = Subset(bundle.train, range(cfg.train_size))
    return bundle
