"""In-memory datasets batched by index on the training device, with augmentation on whole batches.

A split that fits in memory is held as two tensors (inputs already normalised, labels). ``TensorBatches``
moves them to the device once, shuffles them per epoch with a permutation drawn from its own
``torch.Generator`` and cuts batches by index, so there are no DataLoader workers, no per-sample
Python calls and no per-batch host-to-device copies. Augmentation (random crop with padding, optional
horizontal flip: what torchvision's ``RandomCrop`` + ``RandomHorizontalFlip`` did per sample) is one
gather per batch, with every random draw taken from that same generator: reseeding it at an epoch
boundary reproduces the epoch's batches exactly, augmentation included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset


@dataclass(frozen=True)
class Augment:
    """Random crop back to the input size after ``padding`` pixels of ``fill``, and a flip if ``flip``."""

    padding: int
    flip: bool
    fill: tuple[float, ...]  # per channel: the normalised value of a black pixel, which torchvision pads with


def draw(aug: Augment, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Crop offsets ``(n, 2)`` in ``[0, 2 * padding]`` and flip flags ``(n,)`` for ``n`` samples."""
    offsets = torch.randint(0, 2 * aug.padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if aug.flip else torch.zeros(n, dtype=torch.bool)
    return offsets, flips


def apply(x: Tensor, aug: Augment, offsets: Tensor, flips: Tensor) -> Tensor:
    """Crop and flip a batch ``x`` (B, C, H, W) with per-sample ``offsets`` and ``flips``, on x's device."""
    b, c, h, w = x.shape
    p = aug.padding
    fill = torch.tensor(aug.fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    padded = fill.expand(b, c, h + 2 * p, w + 2 * p).clone()
    padded[:, :, p:p + h, p:p + w] = x
    offsets, flips = offsets.to(x.device), flips.to(x.device)
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (B, H)
    cols = torch.arange(w, device=x.device).expand(b, w)
    # A flip of the crop reads the crop's columns right to left: one gather does both.
    cols = offsets[:, 1:] + torch.where(flips[:, None], w - 1 - cols, cols)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class ImageTensors(TensorDataset):
    """A whole split as ``(inputs, labels)`` tensors; ``augment`` (training splits only) crops and flips.

    Indexing one sample augments it with the global RNG, like a torchvision transform would;
    ``TensorBatches`` instead augments whole batches from its own generator.
    """

    def __init__(self, inputs: Tensor, labels: Tensor, augment: Augment | None = None):
        super().__init__(inputs, labels)
        self.augment = augment

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        if self.augment is None:
            return x, y
        return apply(x[None], self.augment, *draw(self.augment, 1, None))[0], y


def in_memory(dataset: Dataset) -> tuple[Tensor, Tensor, Augment | None] | None:
    """``(inputs, labels, augment)`` of a tensor-backed dataset (or a Subset of one), else ``None``."""
    if isinstance(dataset, Subset):
        inner = in_memory(dataset.dataset)
        if inner is None:
            return None
        indices = dataset.indices
        index = slice(indices.start, indices.stop, indices.step) if isinstance(indices, range) else \
            torch.as_tensor(list(indices), dtype=torch.long)
        return inner[0][index], inner[1][index], inner[2]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1], getattr(dataset, "augment", None)
    return None


class TensorBatches:
    """Batches of an in-memory split on ``device``; a drop-in for the DataLoader it replaces.

    ``generator`` (``None`` unless ``shuffle``) is reseeded by ``jobs.train.train`` every epoch.
    Its draws mirror the DataLoader's (one int64 base seed, then ``randperm``, and a second ``randperm``
    once an epoch is exhausted), so without augmentation the batches are exactly those a
    ``DataLoader(shuffle=True, generator=...)`` gave, and trials finished before keep their numbers.
    """

    def __init__(self, inputs: Tensor, labels: Tensor, batch_size: int, *, shuffle: bool, seed: int = 0,
                 device: torch.device | str | None = None, augment: Augment | None = None):
        device = torch.device("cpu" if device is None else device)
        self.inputs, self.labels = inputs.to(device), labels.to(device)
        self.batch_size, self.shuffle, self.augment, self.device = batch_size, shuffle, augment, device
        self.generator = torch.Generator().manual_seed(seed) if shuffle else None

    def __len__(self) -> int:
        """Batches per epoch (the last one may be short)."""
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        # The DataLoader's worker base seed: drawn (and unused) so the generator's stream stays the same.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        params = None if self.augment is None else [p.to(self.device) for p in draw(self.augment, n, self.generator)]
        order = order.to(self.device)
        for start in range(0, n, self.batch_size):
            # Unshuffled batches are views; shuffled ones one gather each.
            index = order[start:start + self.batch_size] if self.shuffle else slice(start, start + self.batch_size)
            x = self.inputs[index]
            if params is not None:
                x = apply(x, self.augment, params[0][start:start + self.batch_size],
                          params[1][start:start + self.batch_size])
            yield x, self.labels[index]
        if self.shuffle:  # RandomSampler draws its (empty) remainder permutation at the end of an epoch
            torch.randperm(n, generator=self.generator)
