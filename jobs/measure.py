"""Measurements of a trained (possibly pruned or quantized) model: accuracy, cost, size, sparsity, memory.

Every function works on float models, pruned (torch.nn.utils.prune masks) or not, on the CPU;
``evaluate``, ``latency*``, ``serialized_size``, ``sparse_size``, ``quant_error`` and
``weight_histograms`` also take the models of every quantization mode. Nothing here changes the
model passed in (work happens on copies where a model has to move or be stripped). NaN or inf
weights (a diverged model) give NaN or inf measurements, never an exception.

Cost conventions (ShrinkBench, Blalock et al. 2020, ``metrics/flops.py`` and ``metrics/size.py``):
only Linear and Conv2d layers are counted; a MAC is one multiply-accumulate, FLOPs = 2 x MACs
(matching ``dense_flops``, torch's FlopCounterMode, which also ignores biases, BN, ReLU, pooling and
adds); a layer's nonzero MACs are its dense MACs scaled by the density of its weight
(= nonzero weights x output positions); ``compression_ratio = size / size_nonzero`` over all
parameters and ``theoretical_speedup = flops / flops_nonzero``.
"""
from __future__ import annotations

import io
import itertools
import math
import resource
import statistics
import sys
import time
from typing import Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

# FlopCounterMode imports torch._dynamo (about 0.7 s) on first use: import it with the rest,
# so that the first trial of a process does not count it as its compute time.
import torch._dynamo  # noqa: E402,F401  isort: skip

from jobs.models import prunable_parameters
from jobs.quantization import copy_model, layer_weights, strip_pruning

LATENCY_BATCHES = (1, 32)


def evaluate(model: nn.Module, loader, device) -> dict[str, float]:
    """Top-1 ``accuracy`` and ``top5`` accuracy in [0, 1] and mean cross-entropy ``loss`` over ``loader``.

    With fewer than 5 classes every label is within the top 5, so ``top5`` is 1.0.
    """
    model.eval()
    correct, correct5, loss_sum, count = 0, 0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct5 += (top == y[:, None]).any(1).sum().item()
            count += y.numel()
    if count == 0:
        raise ValueError("evaluate() got an empty loader")
    return {"accuracy": correct / count, "top5": correct5 / count, "loss": loss_sum / count}


_DENSE_FLOPS: dict[tuple, int] = {}


def dense_flops(model: nn.Module, input_shape) -> int:
    """FLOPs of one forward pass on a single sample, as counted by torch's FlopCounterMode."""
    # The count depends on the architecture and input shape only; a worker running a whole
    # sweep of one model counts it once, not once per trial.
    key = (type(model).__module__, type(model).__qualname__, repr(model), tuple(input_shape))
    if key not in _DENSE_FLOPS:
        model = copy_model(model).cpu().eval()
        x = torch.zeros(1, *input_shape)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        _DENSE_FLOPS[key] = int(counter.get_total_flops())
    return _DENSE_FLOPS[key]


def _has_pruning(model: nn.Module) -> bool:
    return any(name.endswith("_mask") for name, _ in model.named_buffers())


def _nbytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def serialized_size(model: nn.Module) -> int:
    """Bytes of the serialized state_dict (dense tensors), with pruning masks made permanent first."""
    if _has_pruning(model):
        # Otherwise weight_orig and the mask are both saved, doubling the apparent size.
        model = strip_pruning(model)
    return _nbytes(model.state_dict())


def _csr(weight: Tensor) -> Tensor:
    """``weight`` viewed as (out, rest) in CSR with int32 indices (what cuSPARSE / MKL take)."""
    matrix = weight.detach().cpu().reshape(weight.shape[0], -1).to_sparse_csr()
    return torch.sparse_csr_tensor(matrix.crow_indices().to(torch.int32), matrix.col_indices().to(torch.int32),
                                   matrix.values(), matrix.shape, check_invariants=False)


def sparse_size(model: nn.Module) -> int:
    """Bytes of the serialized state_dict with every Linear / Conv2d weight stored sparse (``torch.save``).

    Format: each such weight reshaped to 2-D (output channels x fan-in) in CSR: float values,
    int32 column indices and int32 row pointers, about ``8 * nonzero + 4 * (rows + 1)`` bytes
    against ``4 * numel`` dense, so it pays off above ~50% sparsity (and is larger than dense for a
    dense model). Every other tensor (biases, BN, buffers) stays dense. Quantized layers are not
    float Linear / Conv2d modules, so an int8 model is measured with its packed dense int8 weights
    (= ``serialized_size``); a float wN model is stored sparse like any float model.
    """
    if _has_pruning(model):
        model = strip_pruning(model)
    state = model.state_dict()  # a fresh OrderedDict; replacing entries leaves the model alone
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            key = f"{name}.weight" if name else "weight"
            state[key] = _csr(state[key])
    return _nbytes(state)


def _median_forward_seconds(model: nn.Module, x: Tensor, repeats: int, warmup: int) -> float:
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
    return statistics.median(times)


def latency_ms_per_sample(model: nn.Module, input_shape, batch_size: int = 32, repeats: int = 20,
                          warmup: int = 3) -> float:
    """Median CPU forward time per sample in milliseconds, over ``repeats`` timed batches."""
    # A copy, so a model living on the GPU or in train mode is left as it was.
    model = copy_model(model).cpu().eval()
    x = torch.randn(batch_size, *input_shape)
    return _median_forward_seconds(model, x, repeats, warmup) / batch_size * 1000.0


def latency(model: nn.Module, input_shape, batch_sizes: Iterable[int] = LATENCY_BATCHES, repeats: int = 20,
            warmup: int = 3) -> dict[str, float]:
    """Median CPU time of one forward pass of a whole batch, in ms: ``latency_ms_b{B}`` for each batch size.

    Per batch, not per sample: ``latency_ms_b32 / 32`` is what ``latency_ms_per_sample`` returns.
    Uses torch's current CPU thread count (``torch.set_num_threads``).
    """
    model = copy_model(model).cpu().eval()
    return {f"latency_ms_b{b}": _median_forward_seconds(model, torch.randn(b, *input_shape), repeats, warmup) * 1000.0
            for b in batch_sizes}


def peak_memory_bytes(device: torch.device | str | None = None) -> dict[str, int]:
    """Peak memory so far: ``peak_rss_bytes`` (CPU), plus ``peak_cuda_bytes`` when ``device`` is a GPU.

    ``peak_rss_bytes`` is the process's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``):
    the whole process since it started (Python, imports, datasets, every model it held), never reset,
    so compare it across trials run one per process. ``peak_cuda_bytes`` is
    ``torch.cuda.max_memory_allocated(device)``: tensors allocated by torch's caching allocator
    since start or the last ``torch.cuda.reset_peak_memory_stats``.
    """
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_bytes": int(maxrss if sys.platform == "darwin" else maxrss * 1024)}  # macOS: bytes
    if device is not None and torch.device(device).type == "cuda":
        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def sparsity(model: nn.Module) -> dict[str, float | int]:
    """Fraction of zero prunable weights, and nonzero / total counts over all effective parameters."""
    prunable = [getattr(m, name) for m, name in prunable_parameters(model)]
    zeros = sum(int((w == 0).sum()) for w in prunable)
    size = sum(w.numel() for w in prunable)
    total = sum(p.numel() for p in _effective_parameters(model))
    nonzero = sum(int((p != 0).sum()) for p in _effective_parameters(model))
    return {"sparsity": zeros / size if size else 0.0, "nonzero_params": nonzero, "total_params": total}


def _effective_parameters(model: nn.Module) -> list[Tensor]:
    # A pruned module's `weight` (orig * mask) stands in for its weight_orig.
    effective = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name.endswith("_orig"):
                param = getattr(module, name[: -len("_orig")])
            effective.append(param)
    return effective


def layer_stats(model: nn.Module, input_shape, optimizer_copies: int = 1) -> pd.DataFrame:
    """One row per Linear / Conv2d layer (module order) for a single input sample of ``input_shape``.

    Columns and formulas (``numel`` counts elements, bytes use each tensor's element size, float32: 4):

    - ``layer`` (qualified module name), ``type`` (``Linear`` / ``Conv2d``)
    - ``params``: weight elements; ``nonzero``: nonzero weight elements;
      ``sparsity = 1 - nonzero / params``; ``bias_params``: bias elements (0 without bias)
    - ``macs``: Conv2d ``C_out * H_out * W_out * (C_in / groups) * kh * kw``; Linear
      ``in_features * out_features * rows`` (rows = 1 for a flat sample)
    - ``macs_nonzero``: ``nonzero * output positions`` (Conv2d ``H_out * W_out``, Linear rows) =
      ``macs * nonzero / params`` (ShrinkBench); ``flops = 2 * macs``, ``flops_nonzero = 2 * macs_nonzero``
      (bias adds are not counted, like FlopCounterMode)
    - ``weight_bytes``: weight + bias; ``activation_bytes``: the layer's output for one sample
    - ``inference_bytes = weight_bytes + activation_bytes``
    - ``training_bytes = weight_bytes * (2 + optimizer_copies) + activation_bytes``: weights,
      gradients, optimizer state (SGD momentum: 1 copy, the default; Adam: 2) and the output kept
      for the backward pass. Per sample: multiply ``activation_bytes`` by the batch size.

    Dense storage throughout: pruned weights still take their bytes unless stored sparse (``sparse_size``).
    """
    model = strip_pruning(model).cpu().eval()
    outputs: dict[str, Tensor] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    def keep(name):
        def hook(module, inputs, output):
            outputs[name] = output.detach()
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in layers]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for name, module in layers:
        if name not in outputs:
            continue  # not on the forward path
        out = outputs[name]
        weight = module.weight
        params, nonzero = weight.numel(), int((weight != 0).sum())
        if isinstance(module, nn.Conv2d):
            positions = math.prod(out.shape[2:])
            macs = out[0].numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        else:
            positions = out[0].numel() // module.out_features
            macs = module.in_features * module.out_features * positions
        bias = module.bias.numel() if module.bias is not None else 0
        weight_bytes = params * weight.element_size() + bias * (module.bias.element_size() if bias else 0)
        activation_bytes = out[0].numel() * out.element_size()
        rows.append({
            "layer": name, "type": type(module).__name__, "params": params, "nonzero": nonzero,
            "sparsity": 1.0 - nonzero / params if params else 0.0, "bias_params": bias,
            "macs": macs, "macs_nonzero": nonzero * positions,
            "flops": 2 * macs, "flops_nonzero": 2 * nonzero * positions,
            "weight_bytes": weight_bytes, "activation_bytes": activation_bytes,
            "inference_bytes": weight_bytes + activation_bytes,
            "training_bytes": weight_bytes * (2 + optimizer_copies) + activation_bytes,
        })
    return pd.DataFrame(rows, columns=[
        "layer", "type", "params", "nonzero", "sparsity", "bias_params", "macs", "macs_nonzero", "flops",
        "flops_nonzero", "weight_bytes", "activation_bytes", "inference_bytes", "training_bytes"])


def compression(model: nn.Module, input_shape) -> dict[str, float | int]:
    """ShrinkBench's size and speed-up metrics of a float model for one sample of ``input_shape``.

    ``size`` / ``size_nonzero``: all (effective) parameters and the nonzero ones, biases and BN included;
    ``compression_ratio = size / size_nonzero``. ``flops`` / ``flops_nonzero``: sums of
    ``layer_stats`` over Linear and Conv2d layers (2 x MACs, nonzero scaled by each layer's weight
    density); ``theoretical_speedup = flops / flops_nonzero``. Also ``macs`` and ``macs_nonzero``.
    Ratios are ``inf`` when nothing is nonzero.
    """
    stats = layer_stats(model, input_shape)
    params = _effective_parameters(model)
    size = sum(p.numel() for p in params)
    size_nonzero = sum(int((p != 0).sum()) for p in params)
    flops, flops_nonzero = int(stats["flops"].sum()), int(stats["flops_nonzero"].sum())
    return {
        "size": size, "size_nonzero": size_nonzero,
        "compression_ratio": size / size_nonzero if size_nonzero else math.inf,
        "macs": int(stats["macs"].sum()), "macs_nonzero": int(stats["macs_nonzero"].sum()),
        "flops": flops, "flops_nonzero": flops_nonzero,
        "theoretical_speedup": flops / flops_nonzero if flops_nonzero else math.inf,
    }


def _cpu_eval(model: nn.Module) -> nn.Module:
    on_cpu = all(t.device.type == "cpu" for t in itertools.chain(model.parameters(), model.buffers()))
    return (model if on_cpu else copy_model(model).cpu()).eval()


def quant_error(float_model: nn.Module, qmodel: nn.Module, loader, max_batches: int | None = None
                ) -> dict[str, float]:
    """How far a quantized model's outputs are from the float model's, on the CPU.

    ``output_mse``: mean squared difference of the logits over all outputs; ``top1_agreement``:
    fraction of samples where both predict the same class. Over the first ``max_batches``
    batches of ``loader`` (all when ``None``); labels are ignored.
    """
    reference, quantized = _cpu_eval(float_model), _cpu_eval(qmodel)
    squared, elements, agree, count = 0.0, 0, 0, 0
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x = x.cpu()
            a, b = reference(x).float(), quantized(x).float()
            squared += float(((a - b) ** 2).sum())
            elements += a.numel()
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            count += x.shape[0]
    if count == 0:
        raise ValueError("quant_error() got no batches")
    return {"output_mse": squared / elements, "top1_agreement": agree / count}


def weight_histograms(model: nn.Module, bins: int = 50) -> pd.DataFrame:
    """Histogram of the nonzero weights of every Linear / Conv2d layer (float or quantized).

    Columns ``layer``, ``bin_left``, ``bin_right``, ``count``: ``bins`` equal-width bins from the
    layer's smallest to largest finite nonzero weight (the last bin includes its right edge), then
    one row per kind of non-finite weight the layer has (a diverged model), with both edges that
    value (``nan``, ``inf``, ``-inf``). Counts add up to the layer's nonzero weights; a layer with
    no nonzero weight has no rows. Quantized layers are histogrammed dequantized.
    """
    rows = []
    for name, weight in layer_weights(model):
        values = weight.detach().cpu().flatten()
        values = values[values != 0].double().numpy()
        finite = values[np.isfinite(values)]
        if finite.size:
            counts, edges = np.histogram(finite, bins=bins)
            rows.extend({"layer": name, "bin_left": float(edges[i]), "bin_right": float(edges[i + 1]),
                         "count": int(counts[i])} for i in range(len(counts)))
        rows.extend({"layer": name, "bin_left": edge, "bin_right": edge, "count": count}
                    for edge, count in _non_finite_counts(values).items() if count)
    return pd.DataFrame(rows, columns=["layer", "bin_left", "bin_right", "count"])


def _non_finite_counts(values: np.ndarray) -> dict[float, int]:
    """How many of ``values`` are NaN, +inf and -inf."""
    return {math.nan: int(np.isnan(values).sum()), math.inf: int(np.isposinf(values).sum()),
            -math.inf: int(np.isneginf(values).sum())}
