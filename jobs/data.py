"""Datasets a trial can train on, as a plain registry of loader functions.

Adding a dataset is one function returning a ``DataBundle`` plus one line in ``DATASETS``.
Every dataset is normalised to roughly zero mean and unit variance, so the same learning
rates and quantization calibration behave comparably across them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from jobs.config import DatasetConfig


@dataclass
class DataBundle:
    """A dataset's train and test splits with what a model needs to know about them."""

    train: Dataset
    test: Dataset
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int


class DatasetMissingError(RuntimeError):
    """A torchvision dataset is not on disk and downloading is switched off."""


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
    # One scalar mean/std like MNIST's Normalize: per-pixel statistics would divide by zero
    # on the border pixels that are blank in every image. Train statistics only, so nothing
    # about the test split leaks into preprocessing.
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

    def split(n: int) -> TensorDataset:
        # Balanced classes in a shuffled order, so a prefix (train_size) still covers all.
        y = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
        x = templates[y] + _SYNTHETIC_NOISE * torch.randn(n, 1, 8, 8, generator=g)
        # Rescale to unit variance to match the standardised real datasets.
        return TensorDataset(x / (1 + _SYNTHETIC_NOISE**2) ** 0.5, y)

    train = split(600)
    test = split(200)
    return DataBundle(train=train, test=test, input_shape=(1, 8, 8), num_classes=10)


def _torchvision(cfg: DatasetConfig, cls_name: str, mean: tuple[float, ...], std: tuple[float, ...],
                 input_shape: tuple[int, int, int], num_classes: int) -> DataBundle:
    """Load both splits of a torchvision dataset, turning 'not found' into advice."""
    # Imported here: torchvision adds more than a second on top of torch, and the offline
    # datasets (and listing the registry) never need it.
    import torchvision
    from torchvision import transforms

    cls = getattr(torchvision.datasets, cls_name)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    splits = []
    for train in (True, False):
        try:
            splits.append(cls(root=cfg.root, train=train, download=cfg.download, transform=transform))
        except RuntimeError as e:
            # torchvision signals a missing (or md5-mismatched) dataset only through this
            # message; any other RuntimeError is a different problem and must surface as is.
            if cfg.download or "not found" not in str(e):
                raise
            raise DatasetMissingError(
                f"dataset {cfg.name!r} ({cls_name}) not found or incomplete under "
                f"{os.path.abspath(cfg.root)} (dataset.root={cfg.root!r}; torchvision said: {e}). "
                "Set dataset.download: true on a machine with internet (e.g. the login node) with the "
                "same dataset.root, then rerun; compute nodes only read."
            ) from e
    return DataBundle(train=splits[0], test=splits[1], input_shape=input_shape, num_classes=num_classes)


def _mnist(cfg: DatasetConfig) -> DataBundle:
    """MNIST from torchvision's on-disk layout under ``cfg.root``."""
    return _torchvision(cfg, "MNIST", (0.1307,), (0.3081,), (1, 28, 28), 10)


def _cifar10(cfg: DatasetConfig) -> DataBundle:
    """CIFAR-10 from torchvision's on-disk layout under ``cfg.root``, without augmentation."""
    return _torchvision(cfg, "CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), (3, 32, 32), 10)


DATASETS: dict[str, Callable[[DatasetConfig], DataBundle]] = {
    "digits": _digits,
    "synthetic": _synthetic,
    "mnist": _mnist,
    "cifar10": _cifar10,
}


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
