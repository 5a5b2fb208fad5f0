"""Training loop, optimizers and device choice for float models."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from jobs.config import TrainConfig

OPTIMIZERS: dict[str, Callable[[list, TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                               weight_decay=cfg.weight_decay),
    "adam": lambda params, cfg: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
}


def resolve_device(setting: str) -> torch.device:
    """``auto`` means the GPU when the node has one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader whose shuffling order depends only on ``seed``."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def lr_at(cfg: TrainConfig, epoch: int, epochs: int) -> float:
    """The learning rate of ``epoch`` (of ``epochs``) under ``train.lr_schedule``; restarts every level."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if cfg.lr_schedule == "step":  # divide by 10 at 1/2 and 3/4 of the level
        return cfg.lr * 0.1 ** ((epoch >= max(1, epochs // 2)) + (epoch >= max(1, (3 * epochs) // 4)))
    return cfg.lr


def train(model: nn.Module, loader: DataLoader, cfg: TrainConfig, device: torch.device, *,
          epochs: int | None = None, start_epoch: int = 0, optimizer_state: dict | None = None,
          epoch_seed: Callable[[int], int] | None = None,
          on_epoch: Callable[[int, float, torch.optim.Optimizer, float], None] | None = None,
          on_step: Callable[[int], None] | None = None, elapsed: float = 0.0) -> float:
    """Train epochs ``start_epoch..epochs-1``; return the training time in seconds (incl. ``elapsed``).

    ``epoch_seed(epoch)`` fixes each epoch's data order and the learning rate is a function of
    the epoch, so a run resumed at an epoch boundary sees the same batches and rates as an
    uninterrupted one. ``on_epoch(epoch, mean_loss, optimizer, seconds)`` runs after every
    epoch (checkpointing, curves), ``on_step(step)`` after every optimizer step (late rewinding).
    """
    epochs = cfg.epochs if epochs is None else epochs
    # A fresh optimizer per level: momentum from the previous level must not leak into the
    # rewound weights.
    optimizer = OPTIMIZERS[cfg.optimizer]([p for p in model.parameters() if p.requires_grad], cfg)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    loss_fn = nn.CrossEntropyLoss()
    model.to(device).train()
    step = start_epoch * len(loader)
    for epoch in range(start_epoch, epochs):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch, epochs)
        if epoch_seed is not None:
            loader.generator.manual_seed(epoch_seed(epoch))
        total, count = 0.0, 0
        model.train()
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            step += 1
            total += loss.item() * len(targets)
            count += len(targets)
            if on_step is not None:
                on_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - start
        if on_epoch is not None:
            on_epoch(epoch, total / max(count, 1), optimizer, elapsed)
    return elapsed
