"""Pruning methods, scopes and rewinding, on top of torch.nn.utils.prune (masks live in the modules)."""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import prune

from jobs.config import PruneConfig
from jobs.models import first_conv, named_prunable  # noqa: F401  (named_prunable re-exported)

Params = list[tuple[nn.Module, str]]


def level_amount(ratio: float, iterations: int) -> float:
    """Fraction of the remaining weights each of ``iterations`` levels removes to reach ``ratio``."""
    return 1.0 - (1.0 - ratio) ** (1.0 / iterations)


def target_sparsity(ratio: float, iterations: int, level: int) -> float:
    """Sparsity the schedule reaches after ``level`` levels (before per-tensor rounding)."""
    return 1.0 - (1.0 - level_amount(ratio, iterations)) ** level


def l1_local(params: Params, amount: float, cfg: PruneConfig) -> None:
    """Remove the smallest-magnitude ``amount`` of each layer's remaining weights."""
    for module, name in params:
        prune.l1_unstructured(module, name, amount=amount)


def l1_global(params: Params, amount: float, cfg: PruneConfig) -> None:
    """Remove the smallest-magnitude ``amount`` of all remaining weights, ranked across layers."""
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)


def random_local(params: Params, amount: float, cfg: PruneConfig) -> None:
    """Remove a random ``amount`` of each layer's remaining weights (control)."""
    for module, name in params:
        prune.random_unstructured(module, name, amount=amount)


def random_global(params: Params, amount: float, cfg: PruneConfig) -> None:
    """Remove a random ``amount`` of all remaining weights across layers (control)."""
    prune.global_unstructured(params, pruning_method=prune.RandomUnstructured, amount=amount)


def ln_structured(params: Params, amount: float, cfg: PruneConfig) -> None:
    """Remove whole output channels (filters / neurons) with the smallest ``prune.norm`` norm."""
    for module, name in params:
        prune.ln_structured(module, name, amount=amount, n=cfg.norm, dim=0)


PRUNE_METHODS: dict[str, Callable[[Params, float, PruneConfig], None]] = {
    "l1_local": l1_local,
    "l1_global": l1_global,
    "random_local": random_local,
    "random_global": random_global,
    "ln_structured": ln_structured,
}
# A layer with its own rate cannot join a global ranking; it is pruned alone by this method.
LOCAL_EQUIVALENT = {"l1_global": "l1_local", "random_global": "random_local"}


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def layer_rates(cfg: PruneConfig, names: list[str]) -> dict[str, float]:
    """Per-layer rate multipliers from ``prune.layer_rates`` (``output`` is the last layer)."""
    rates = {}
    for item in _names(cfg.layer_rates):
        name, factor = (x.strip() for x in item.split(":"))
        name = names[-1] if name == "output" else name
        if name not in names:
            raise ValueError(f"prune.layer_rates: no prunable layer '{name}'; layers: {', '.join(names)}")
        rates[name] = float(factor)
    return rates


def pruned_layers(model: nn.Module, cfg: PruneConfig) -> list[tuple[str, nn.Module]]:
    """The layers ``prune.scope``, ``prune.layers`` and ``prune.ignore`` select."""
    layers = named_prunable(model)
    names = [n for n, _ in layers]
    if cfg.scope == "first_conv":
        chosen = [first_conv(model)]
    elif cfg.scope in ("layers", "isolate"):
        chosen = _names(cfg.layers)
        unknown = [n for n in chosen if n not in names]
        if unknown or not chosen:
            raise ValueError(f"prune.layers: unknown or empty {unknown or chosen}; layers: {', '.join(names)}")
    else:
        chosen = names
    ignored = set(_names(cfg.ignore))
    unknown = ignored - set(names)
    if unknown:
        raise ValueError(f"prune.ignore: no prunable layer {sorted(unknown)}; layers: {', '.join(names)}")
    return [(n, m) for n, m in layers if n in chosen and n not in ignored]


def prune_level(model: nn.Module, cfg: PruneConfig, amount: float) -> None:
    """Apply one pruning level: ``amount`` of the remaining weights of the selected layers."""
    layers = pruned_layers(model, cfg)
    rates = layer_rates(cfg, [n for n, _ in named_prunable(model)])
    shared = [(m, "weight") for n, m in layers if n not in rates]
    if shared:
        PRUNE_METHODS[cfg.method](shared, amount, cfg)
    own = LOCAL_EQUIVALENT.get(cfg.method, cfg.method)
    for name, module in layers:
        if name in rates:
            PRUNE_METHODS[own]([(module, "weight")], min(amount * rates[name], 1.0), cfg)


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


def parse_rewind(setting: str) -> tuple[str, int]:
    """``epoch:3`` → ("epoch", 3); ``init`` → ("init", 0)."""
    match = re.fullmatch(r"(epoch|step):(\d+)", setting)
    return (match.group(1), int(match.group(2))) if match else (setting, 0)


def rewind_to_state(model: nn.Module, rewind_state: dict, fresh_state: Callable[[], dict]) -> None:
    """Lottery ticket (init) or late rewinding (epoch:N, step:N): survivors go back to saved values."""
    load_keeping_masks(model, rewind_state)


def rewind_none(model: nn.Module, rewind_state: dict, fresh_state: Callable[[], dict]) -> None:
    """Fine-tune: keep the trained values of the surviving weights."""


def rewind_reinit(model: nn.Module, rewind_state: dict, fresh_state: Callable[[], dict]) -> None:
    """Control: surviving weights get a new random initialisation."""
    load_keeping_masks(model, fresh_state())


REWINDS: dict[str, Callable[[nn.Module, dict, Callable[[], dict]], None]] = {
    "init": rewind_to_state,
    "epoch": rewind_to_state,
    "step": rewind_to_state,
    "none": rewind_none,
    "reinit": rewind_reinit,
}
