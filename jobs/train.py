"""Training loop, optimizers and device choice for float models."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from jobs.batches import TensorBatches, in_memory
from jobs.config import TrainConfig

OPTIMIZERS: dict[str, Callable[[list, TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                               weight_decay=cfg.weight_decay),
    "adam": lambda params, cfg: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
}


class Diverged(ArithmeticError):
    """A non-finite training loss: the trial stops at this level, for good (a re-run diverges the same way)."""

    def __init__(self, level: int | None, epoch: int, loss: float):
        super().__init__(f"diverged at level {level} epoch {epoch} (loss {loss})")
        self.level, self.epoch, self.loss = level, epoch, loss


def resolve_device(setting: str) -> torch.device:
    """``auto`` means the GPU when the node has one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                device: torch.device | str | None = None, workers: int | None = None):
    """Batches of ``dataset`` whose order depends only on ``seed``: on ``device`` (default CPU) when in memory.

    In-memory datasets (tensors: every dataset but imagefolder) become ``TensorBatches``; others a
    DataLoader with ``workers`` processes (default: the job's CPU threads but one, left to training).
    Both have ``len``, iterate ``(inputs, labels)`` and expose ``generator`` for per-epoch reseeding.
    """
    tensors = in_memory(dataset)
    if tensors is not None:
        inputs, labels, augment = tensors
        return TensorBatches(inputs, labels, batch_size, shuffle=shuffle, seed=seed, device=device,
                             augment=augment)
    workers = max(0, torch.get_num_threads() - 1) if workers is None else workers
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    # Workers are not persistent: each epoch's workers are seeded from the reseeded generator, so
    # a resumed epoch decodes and augments exactly like an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers,
                      pin_memory=device is not None and torch.device(device).type == "cuda")


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (``None``: float32)."""
    if cfg.amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[cfg.amp]


def memory_format(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.memory_format:
    """Channels-last for ``train.channels_last`` (``auto``: conv nets on the GPU), else contiguous."""
    convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
    wanted = cfg.channels_last == "always" or (cfg.channels_last == "auto" and device.type == "cuda" and convolutional)
    return torch.channels_last if wanted else torch.contiguous_format


def _fake_quantized(model: nn.Module) -> bool:
    from torch.ao.quantization import FakeQuantizeBase

    return any(isinstance(m, FakeQuantizeBase) for m in model.modules())


def lr_at(cfg: TrainConfig, epoch: int, epochs: int) -> float:
    """The learning rate of ``epoch`` (of ``epochs``) under ``train.lr_schedule``; restarts every level."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if cfg.lr_schedule == "step":  # divide by 10 at 1/2 and 3/4 of the level
        return cfg.lr * 0.1 ** ((epoch >= max(1, epochs // 2)) + (epoch >= max(1, (3 * epochs) // 4)))
    return cfg.lr


def train(model: nn.Module, loader, cfg: TrainConfig, device: torch.device, *,
          epochs: int | None = None, start_epoch: int = 0, optimizer_state: dict | None = None,
          epoch_seed: Callable[[int], int] | None = None,
          on_epoch: Callable[[int, float, torch.optim.Optimizer, float], None] | None = None,
          on_step: Callable[[int], None] | None = None, elapsed: float = 0.0, level: int | None = None) -> float:
    """Train epochs ``start_epoch..epochs-1``; return the training time in seconds (incl. ``elapsed``).

    ``epoch_seed(epoch)`` fixes each epoch's data order and the learning rate is a function of
    the epoch, so a run resumed at an epoch boundary sees the same batches and rates as an
    uninterrupted one. ``on_epoch(epoch, mean_loss, optimizer, seconds)`` runs after every
    epoch (checkpointing, curves), ``on_step(step)`` after every optimizer step (late rewinding).
    An epoch whose mean loss is not finite still reaches ``on_epoch`` (its curve shows the
    divergence), then raises ``Diverged`` naming ``level`` and the epoch.
    ``train.amp``, ``train.channels_last`` and ``train.compile`` apply to float models only: a
    fake-quantized (QAT) model trains in float32, contiguous and eager, because its observers
    set the int8 scales. The model leaves in the contiguous format it came in.
    """
    epochs = cfg.epochs if epochs is None else epochs
    # A fresh optimizer per level: momentum from the previous level must not leak into the
    # rewound weights.
    optimizer = OPTIMIZERS[cfg.optimizer]([p for p in model.parameters() if p.requires_grad], cfg)
    quantized = _fake_quantized(model)
    dtype = None if quantized else autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if scaler.is_enabled():
        # The loss scale rides in the optimizer's state dict, so a checkpoint resumes it too.
        optimizer.register_state_dict_post_hook(lambda opt, state: {**state, "grad_scaler": scaler.state_dict()})
    if optimizer_state is not None:
        if scaler.is_enabled() and "grad_scaler" in optimizer_state:
            scaler.load_state_dict(optimizer_state["grad_scaler"])
        optimizer.load_state_dict({k: v for k, v in optimizer_state.items() if k != "grad_scaler"})
    loss_fn = nn.CrossEntropyLoss()
    layout = torch.contiguous_format if quantized else memory_format(cfg, model, device)
    model.to(device, memory_format=layout)
    # Compiled per call: pruning between levels adds hooks, and a fresh wrapper is cheap (guards
    # decide whether dynamo's cached graphs still apply).
    forward = torch.compile(model) if cfg.compile and not quantized else model
    step = start_epoch * len(loader)
    try:
        for epoch in range(start_epoch, epochs):
            start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, epoch, epochs)
            if epoch_seed is not None:
                loader.generator.manual_seed(epoch_seed(epoch))
            # Summed on the device in float64 (what Python floats did) to avoid a sync per step.
            total, count = torch.zeros((), dtype=torch.float64, device=device), 0
            model.train()
            for inputs, targets in loader:
                inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                if inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=layout)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = loss_fn(forward(inputs), targets)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                total += loss.detach().double() * len(targets)
                count += len(targets)
                if on_step is not None:
                    on_step(step)
                # On the CPU the check is free, and the rest of the epoch would train NaN weights; on
                # a GPU it would sync every step, so the sum (NaN or inf once any batch is) waits.
                if device.type == "cpu" and not math.isfinite(total):
                    break
            mean_loss = total.item() / max(count, 1)  # also waits for the GPU to finish the epoch
            elapsed += time.perf_counter() - start
            if on_epoch is not None:
                on_epoch(epoch, mean_loss, optimizer, elapsed)
            if not math.isfinite(mean_loss):
                raise Diverged(level, epoch, mean_loss)
    finally:
        model.to(memory_format=torch.contiguous_format)
    return elapsed
