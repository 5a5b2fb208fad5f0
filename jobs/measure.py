"""Measurements of a trained (possibly pruned or quantized) model: accuracy, cost, size, sparsity."""
from __future__ import annotations

import io
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from jobs.models import prunable_parameters
from jobs.quantization import copy_model, strip_pruning


def evaluate(model: nn.Module, loader, device) -> dict[str, float]:
    """Top-1 accuracy in [0, 1] and mean cross-entropy of ``model`` over ``loader``."""
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += y.numel()
    if count == 0:
        raise ValueError("evaluate() got an empty loader")
    return {"accuracy": correct / count, "loss": loss_sum / count}


def dense_flops(model: nn.Module, input_shape) -> int:
    """FLOPs of one forward pass on a single sample, as counted by torch's FlopCounterMode."""
    model = copy_model(model).cpu().eval()
    x = torch.zeros(1, *input_shape)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def _has_pruning(model: nn.Module) -> bool:
    return any(name.endswith("_mask") for name, _ in model.named_buffers())


def serialized_size(model: nn.Module) -> int:
    """Bytes of the serialized state_dict, with pruning masks made permanent first."""
    if _has_pruning(model):
        # Otherwise weight_orig and the mask are both saved, doubling the apparent size.
        model = strip_pruning(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def latency_ms_per_sample(model: nn.Module, input_shape, batch_size: int = 32, repeats: int = 20,
                          warmup: int = 3) -> float:
    """Median CPU forward time per sample in milliseconds, over ``repeats`` timed batches."""
    # A copy, so a model living on the GPU or in train mode is left as it was.
    model = copy_model(model).cpu().eval()
    x = torch.randn(batch_size, *input_shape)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
    return statistics.median(times) / batch_size * 1000.0


def sparsity(model: nn.Module) -> dict[str, float | int]:
    """Fraction of zero prunable weights, and nonzero / total counts over all effective parameters."""
    prunable = [getattr(m, name) for m, name in prunable_parameters(model)]
    zeros = sum(int((w == 0).sum()) for w in prunable)
    size = sum(w.numel() for w in prunable)
    # Effective tensors: a pruned module's `weight` (orig * mask) stands in for its weight_orig.
    effective = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name.endswith("_orig"):
                param = getattr(module, name[: -len("_orig")])
            effective.append(param)
    total = sum(p.numel() for p in effective)
    nonzero = sum(int((p != 0).sum()) for p in effective)
    return {"sparsity": zeros / size if size else 0.0, "nonzero_params": nonzero, "total_params": total}
