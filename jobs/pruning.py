"""Pruning methods and rewinding, on top of torch.nn.utils.prune (masks live in the modules)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.utils import prune

from jobs.models import prunable_parameters

Params = list[tuple[nn.Module, str]]


def level_amount(ratio: float, iterations: int) -> float:
    """Fraction of the remaining weights each of ``iterations`` levels removes to reach ``ratio``."""
    return 1.0 - (1.0 - ratio) ** (1.0 / iterations)


def target_sparsity(ratio: float, iterations: int, level: int) -> float:
    """Sparsity the schedule reaches after ``level`` levels (before per-tensor rounding)."""
    return 1.0 - (1.0 - level_amount(ratio, iterations)) ** level


def l1_local(params: Params, amount: float) -> None:
    """Remove the smallest-magnitude ``amount`` of each layer's remaining weights."""
    for module, name in params:
        prune.l1_unstructured(module, name, amount=amount)


def l1_global(params: Params, amount: float) -> None:
    """Remove the smallest-magnitude ``amount`` of all remaining weights, ranked across layers."""
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)


def random_local(params: Params, amount: float) -> None:
    """Remove a random ``amount`` of each layer's remaining weights (control)."""
    for module, name in params:
        prune.random_unstructured(module, name, amount=amount)


def random_global(params: Params, amount: float) -> None:
    """Remove a random ``amount`` of all remaining weights across layers (control)."""
    prune.global_unstructured(params, pruning_method=prune.RandomUnstructured, amount=amount)


PRUNE_METHODS: dict[str, Callable[[Params, float], None]] = {
    "l1_local": l1_local,
    "l1_global": l1_global,
    "random_local": random_local,
    "random_global": random_global,
}


def refresh_masked_weights(model: nn.Module) -> None:
    """Recompute ``weight = weight_orig * mask`` now, instead of at the next forward."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                setattr(module, hook._tensor_name, hook.apply_mask(module))


@torch.no_grad()
def load_keeping_masks(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a dense state dict into a (possibly pruned) model; masks stay as they are."""
    own = model.state_dict()
    for key, value in state.items():
        target = key if key in own else f"{key}_orig"
        own[target].copy_(value)
    refresh_masked_weights(model)


def rewind_init(model: nn.Module, init_state: dict, fresh_state: Callable[[], dict]) -> None:
    """Lottery ticket: surviving weights go back to their values at initialisation."""
    load_keeping_masks(model, init_state)


def rewind_none(model: nn.Module, init_state: dict, fresh_state: Callable[[], dict]) -> None:
    """Fine-tune: keep the trained values of the surviving weights."""


def rewind_reinit(model: nn.Module, init_state: dict, fresh_state: Callable[[], dict]) -> None:
    """Control: surviving weights get a new random initialisation."""
    load_keeping_masks(model, fresh_state())


REWINDS: dict[str, Callable[[nn.Module, dict, Callable[[], dict]], None]] = {
    "init": rewind_init,
    "none": rewind_none,
    "reinit": rewind_reinit,
}


def prune_level(model: nn.Module, method: str, amount: float) -> None:
    """Apply one pruning level to every prunable layer of ``model``."""
    PRUNE_METHODS[method](prunable_parameters(model), amount)
