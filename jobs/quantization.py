"""Quantization modes of the final level's model, wrapping torch.ao.quantization (the only module touching it).

torch marks this API deprecated (in favour of torchao); its warnings are left visible on purpose.
Every mode works on a deep copy (the input model is never modified) and has the signature
``fn(model, cfg: QuantConfig, data: QuantData) -> nn.Module``.

Modes (``QUANT_MODES``):

- ``none``: an unchanged float copy.
- ``dynamic`` / ``dynamic_fp16``: Linear weights stored as int8 / float16, activations quantized
  on the fly (int8) or kept float (fp16). Conv layers stay float.
- ``static``: int8 post-training quantization in FX graph mode: conv-bn-relu and linear-relu
  fusion, quantized residual adds (``quantized.add_relu`` in ResNets), observers calibrated on
  ``cfg.calibration_batches`` training batches.
- ``qat``: FX quantization-aware training: fake-quantized fine-tuning for ``cfg.qat_epochs``
  epochs at ``QAT_LR_FACTOR`` times the training learning rate, then conversion to int8.
- ``wN`` / ``wN_channel`` (N = 1..16): weight-only symmetric uniform quantization per tensor /
  per output channel, see ``fake_quantize_weight``. The result is a float model whose Linear and
  Conv2d weights hold the quantized values; activations stay float.

Pruned weights stay exactly zero in every mode: pruning masks are made permanent first, zero maps
to the integer 0 in every scheme used here (symmetric int8 weights have zero point 0; fp16 and the
wN grids contain 0), and QAT masks the gradients of pruned weights and re-applies the masks after
fine-tuning.

The int8 and fp16 modes return CPU models (torch's quantized kernels run on the CPU); ``none`` and
the wN modes return float models, ``none`` on the CPU and wN on the input model's device.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping, quantize_dynamic
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx
from torch.nn.utils import prune

from jobs.config import QuantConfig, TrainConfig
from jobs.train import train

Batches = Iterable[tuple[Tensor, Tensor]]

# QAT fine-tunes at a tenth of the float training learning rate: the model is already trained,
# and a full learning rate would undo much of that in the first steps.
QAT_LR_FACTOR = 0.1

WEIGHT_ONLY_BITS = range(1, 17)


@dataclass
class QuantData:
    """What a quantization mode may need besides the model and its settings.

    ``calibration``: (x, y) training batches; ``static`` uses the first ``cfg.calibration_batches``
    and ``qat`` takes its example input from the first one.
    ``train_loader``: batches for QAT fine-tuning (``None``: the calibration batches).
    ``train_cfg``: the trial's training settings (optimizer, momentum, weight decay, lr; QAT uses
    ``lr * QAT_LR_FACTOR`` for ``cfg.qat_epochs`` epochs).
    ``device``: where QAT fine-tuning runs; conversion to int8 always happens on the CPU.
    ``epoch_seed``: optional, passed to ``jobs.train.train`` (reseeds ``train_loader.generator``
    per QAT epoch, so a resumed trial fine-tunes on the same batches as an uninterrupted one).
    """

    calibration: Batches = ()
    train_loader: Iterable[tuple[Tensor, Tensor]] | None = None
    train_cfg: TrainConfig = field(default_factory=TrainConfig)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    epoch_seed: Callable[[int], int] | None = None


def as_quant_data(data: QuantData | Batches | None) -> QuantData:
    """Accept a ``QuantData`` or, as before it existed, a plain iterable of calibration batches."""
    if isinstance(data, QuantData):
        return data
    return QuantData(calibration=() if data is None else data)


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


def _weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def layer_weights(model: nn.Module) -> list[tuple[str, Tensor]]:
    """``(qualified name, float weight)`` of every Linear / Conv2d layer, float or quantized, in module order.

    Float layers give their effective weight (``weight_orig * mask`` when pruned); int8 layers
    (static, dynamic, qat, fused variants) their dequantized weight; fp16 dynamic layers their
    weight as float32. Lets measurements look at the weights of any mode's model.
    """
    from torch.ao.nn import quantized as nnq
    from torch.ao.nn.quantized import dynamic as nnqd

    out = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            out.append((name, module.weight.detach()))
        elif isinstance(module, (nnq.Linear, nnq.Conv2d, nnqd.Linear)):
            w = module.weight()
            out.append((name, (w.dequantize() if w.is_quantized else w).detach().float()))
    return out


def none(model: nn.Module, cfg: QuantConfig, data: QuantData) -> nn.Module:
    """No quantization: an unchanged copy of the float model, in eval mode."""
    return copy_model(model).cpu().eval()


def dynamic(model: nn.Module, cfg: QuantConfig, data: QuantData) -> nn.Module:
    """int8 dynamic quantization of Linear layers (activations quantized on the fly)."""
    torch.backends.quantized.engine = cfg.backend
    return quantize_dynamic(_float_copy(model), {nn.Linear}, dtype=torch.qint8)


def dynamic_fp16(model: nn.Module, cfg: QuantConfig, data: QuantData) -> nn.Module:
    """float16 weights of Linear layers (dynamic quantization API); needs the x86 or fbgemm backend."""
    if cfg.backend == "qnnpack":
        # torch: "quantized::linear_prepack_fp16 is currently not supported by QNNPACK".
        raise ValueError("dynamic_fp16 needs quant.backend x86 or fbgemm; QNNPACK has no fp16 linear kernels")
    torch.backends.quantized.engine = cfg.backend
    return quantize_dynamic(_float_copy(model), {nn.Linear}, dtype=torch.float16)


def _first_batches(data: QuantData, count: int) -> list[tuple[Tensor, Tensor]]:
    return list(itertools.islice(iter(data.calibration), count))


def static(model: nn.Module, cfg: QuantConfig, data: QuantData) -> nn.Module:
    """int8 post-training static quantization in FX graph mode, calibrated on training batches."""
    torch.backends.quantized.engine = cfg.backend
    batches = _first_batches(data, cfg.calibration_batches)
    if not batches:
        raise ValueError("static quantization needs at least one calibration batch")
    example_inputs = (batches[0][0].cpu(),)
    # prepare_fx fuses conv-bn-relu / linear-relu and places observers around residual adds itself.
    prepared = prepare_fx(_float_copy(model), get_default_qconfig_mapping(cfg.backend), example_inputs)
    with torch.no_grad():
        for x, _ in batches:
            prepared(x.cpu())
    return convert_fx(prepared)


def qat(model: nn.Module, cfg: QuantConfig, data: QuantData) -> nn.Module:
    """int8 quantization-aware training in FX graph mode, then conversion; pruned weights stay zero.

    Fine-tunes ``cfg.qat_epochs`` epochs on ``data.train_loader`` (``jobs.train.train`` with the
    trial's optimizer, momentum and weight decay, at a constant ``lr * QAT_LR_FACTOR``) on
    ``data.device``, then converts on the CPU. A weight that is zero when quantization starts
    (pruned) gets its gradient masked during fine-tuning, and the mask is multiplied in again
    before conversion.
    """
    torch.backends.quantized.engine = cfg.backend
    batches = _first_batches(data, 1)
    loader = data.train_loader if data.train_loader is not None else data.calibration
    if not batches:
        raise ValueError("qat needs at least one calibration batch (for the example input)")
    float_model = strip_pruning(model).cpu()
    masks = {name: (m.weight != 0) for name, m in _weighted_layers(float_model) if not bool((m.weight != 0).all())}
    prepared = prepare_qat_fx(float_model.train(), get_default_qat_qconfig_mapping(cfg.backend),
                              (batches[0][0].cpu(),))
    # Fusion keeps a layer's qualified name and its weight parameter (LinearReLU, ConvBnReLU2d, ...).
    modules = dict(prepared.named_modules())
    masked: list[tuple[Tensor, Tensor]] = []
    for name, mask in masks.items():
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, Tensor) or weight.shape != mask.shape:
            raise RuntimeError(f"qat: cannot find the weight of pruned layer {name!r} after FX preparation")
        masked.append((weight, mask))
    device = torch.device(data.device)
    hooks = []
    for weight, mask in masked:
        device_mask = mask.to(device)
        hooks.append(weight.register_hook(lambda grad, m=device_mask: grad * m))
    if not hasattr(loader, "__len__"):
        loader = list(loader)  # train() counts steps with len(loader)
    # A constant rate: a level's schedule (cosine, step) would decay it within the short fine-tuning.
    train_cfg = dataclasses.replace(data.train_cfg, epochs=cfg.qat_epochs, lr=data.train_cfg.lr * QAT_LR_FACTOR,
                                    lr_schedule="constant")
    try:
        train(prepared, loader, train_cfg, device, epoch_seed=data.epoch_seed)
    finally:
        for hook in hooks:
            hook.remove()
    prepared.cpu().eval()
    with torch.no_grad():
        for weight, mask in masked:
            weight.mul_(mask)
    return convert_fx(prepared)


def fake_quantize_weight(w: Tensor, bits: int, per_channel: bool) -> Tensor:
    """Symmetric uniform quantization of ``w`` to ``bits`` bits, returned as float values on w's grid.

    Per tensor, or per output channel (dim 0) with ``per_channel``. For N >= 2 bits:
    ``scale = max|w| / (2^(N-1) - 1)``, ``w_q = clamp(round(w / scale), -(2^(N-1)-1), 2^(N-1)-1) * scale``
    (2^N - 1 levels, symmetric around an exact 0; N = 2 is ternary {-s, 0, s}).
    N = 1 is binary (BinaryConnect / XNOR-Net style): ``w_q = sign(w) * mean|w|`` with the mean
    over the nonzero weights of the tensor / channel, so levels are {-a, +a}.
    In every case a zero weight stays exactly zero (round(0) = 0, sign(0) = 0): pruned weights survive.
    An all-zero tensor / channel stays all zero.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    dims = tuple(range(1, w.dim())) if per_channel and w.dim() > 1 else tuple(range(w.dim()))
    magnitude = w.abs()
    if bits == 1:
        count = (w != 0).sum(dim=dims, keepdim=True).clamp(min=1)
        alpha = magnitude.sum(dim=dims, keepdim=True) / count
        return torch.sign(w) * alpha
    qmax = 2 ** (bits - 1) - 1
    scale = magnitude.amax(dim=dims, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def _weight_only(bits: int, per_channel: bool) -> Callable[[nn.Module, QuantConfig, QuantData], nn.Module]:
    granularity = "per output channel" if per_channel else "per tensor"

    def mode(model: nn.Module, cfg: QuantConfig, data: QuantData) -> nn.Module:
        qmodel = strip_pruning(model).eval()
        with torch.no_grad():
            for _, layer in _weighted_layers(qmodel):
                layer.weight.copy_(fake_quantize_weight(layer.weight, bits, per_channel))
        return qmodel

    mode.__name__ = f"w{bits}_channel" if per_channel else f"w{bits}"
    mode.__qualname__ = mode.__name__
    mode.__doc__ = (f"Weight-only {bits}-bit symmetric uniform quantization {granularity} of every Linear and "
                    f"Conv2d weight (float model, activations float); see fake_quantize_weight.")
    return mode


QUANT_MODES: dict[str, Callable[[nn.Module, QuantConfig, QuantData], nn.Module]] = {
    "none": none,
    "dynamic": dynamic,
    "dynamic_fp16": dynamic_fp16,
    "static": static,
    "qat": qat,
}
for _bits in WEIGHT_ONLY_BITS:
    for _per_channel in (False, True):
        _fn = _weight_only(_bits, _per_channel)
        QUANT_MODES[_fn.__name__] = _fn


def quantize(model: nn.Module, cfg: QuantConfig, data: QuantData | Batches | Any = None) -> nn.Module:
    """Apply the quantization mode ``cfg.mode`` to a float model; the input model is not modified.

    ``data`` is a ``QuantData``; a plain iterable of (x, y) batches is accepted as its ``calibration``.
    """
    if cfg.mode not in QUANT_MODES:
        raise KeyError(f"unknown quantization mode {cfg.mode!r}; choose from {sorted(QUANT_MODES)}")
    return QUANT_MODES[cfg.mode](model, cfg, as_quant_data(data))
