"""Post-training quantization modes, wrapping torch.ao.quantization so the backend can change later.

torch marks this API deprecated (in favour of torchao); its warnings are left visible on purpose.
Every mode works on a deep copy and returns a model meant to run on CPU.
"""
from __future__ import annotations

import copy
import itertools
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from torch.nn.utils import prune

from jobs.config import QuantConfig

Batches = Iterable[tuple[Tensor, Tensor]]


def copy_model(model: nn.Module) -> nn.Module:
    """Deep-copy a model, including one pruned with torch.nn.utils.prune."""
    # A pruned module's `weight` is orig * mask computed with autograd on, a non-leaf tensor that
    # deepcopy refuses; hand deepcopy a detached copy instead (prune recomputes it on forward anyway).
    memo = {}
    for module in model.modules():
        for name, _ in module.named_parameters(recurse=False):
            derived = getattr(module, name[: -len("_orig")], None) if name.endswith("_orig") else None
            if isinstance(derived, Tensor) and not derived.is_leaf:
                memo[id(derived)] = derived.detach().clone()
    return copy.deepcopy(model, memo)


def strip_pruning(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` with pruning masks made permanent (plain ``weight`` parameters)."""
    model = copy_model(model)
    for module in model.modules():
        # Copy the names first: prune.remove edits the module's parameter and buffer dicts.
        names = [n[: -len("_mask")] for n, _ in module.named_buffers(recurse=False) if n.endswith("_mask")]
        for name in names:
            if hasattr(module, name + "_orig"):
                prune.remove(module, name)
    return model


def _float_copy(model: nn.Module) -> nn.Module:
    return strip_pruning(model).cpu().eval()


def none(model: nn.Module, cfg: QuantConfig, calibration: Batches) -> nn.Module:
    """No quantization: an unchanged copy of the float model, in eval mode."""
    return copy_model(model).cpu().eval()


def dynamic(model: nn.Module, cfg: QuantConfig, calibration: Batches) -> nn.Module:
    """int8 dynamic quantization of Linear layers (activations quantized on the fly)."""
    torch.backends.quantized.engine = cfg.backend
    return quantize_dynamic(_float_copy(model), {nn.Linear}, dtype=torch.qint8)


def static(model: nn.Module, cfg: QuantConfig, calibration: Batches) -> nn.Module:
    """int8 post-training static quantization in FX graph mode, calibrated on training batches."""
    torch.backends.quantized.engine = cfg.backend
    batches = list(itertools.islice(iter(calibration), cfg.calibration_batches))
    if not batches:
        raise ValueError("static quantization needs at least one calibration batch")
    example_inputs = (batches[0][0].cpu(),)
    # prepare_fx fuses conv-bn-relu / linear-relu and places observers around residual adds itself.
    prepared = prepare_fx(_float_copy(model), get_default_qconfig_mapping(cfg.backend), example_inputs)
    with torch.no_grad():
        for x, _ in batches:
            prepared(x.cpu())
    return convert_fx(prepared)


QUANT_MODES: dict[str, Callable[[nn.Module, QuantConfig, Batches], nn.Module]] = {
    "none": none,
    "dynamic": dynamic,
    "static": static,
}


def quantize(model: nn.Module, cfg: QuantConfig, calibration: Batches) -> nn.Module:
    """Apply the quantization mode ``cfg.mode`` to a float model; the input model is not modified."""
    if cfg.mode not in QUANT_MODES:
        raise KeyError(f"unknown quantization mode {cfg.mode!r}; choose from {sorted(QUANT_MODES)}")
    return QUANT_MODES[cfg.mode](model, cfg, calibration)
