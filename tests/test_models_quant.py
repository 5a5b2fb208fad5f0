"""Models, quantization modes and measurements on tiny CPU inputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.ao.nn import quantized as nnq
from torch.ao.nn.quantized import dynamic as nnqd
from torch.nn.utils import prune

from jobs.config import ModelConfig, QuantConfig
from jobs.measure import dense_flops, evaluate, latency_ms_per_sample, serialized_size, sparsity
from jobs.models import MODELS, build_model, prunable_parameters
from jobs.quantization import QUANT_MODES, quantize, strip_pruning

CLASSES = 10
SMALL = (1, 8, 8)


def _model(name: str, shape=SMALL, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name), shape, CLASSES).eval()


def _batches(shape=SMALL, n: int = 4, batch: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, CLASSES, (batch,), generator=g))
            for _ in range(n)]


def _quantized_modules(model: nn.Module) -> list[nn.Module]:
    # nnqd.Linear subclasses nnq.Linear, and the fused LinearReLU / ConvReLU2d subclass nnq.Linear / nnq.Conv2d.
    return [m for m in model.modules() if isinstance(m, (nnq.Linear, nnq.Conv2d, nnqd.Linear))]


def _prune_linears(model: nn.Module, amount: float) -> nn.Module:
    for module, name in prunable_parameters(model):
        if isinstance(module, nn.Linear):
            prune.l1_unstructured(module, name, amount=amount)
    return model


def test_resnet18_stems():
    small = build_model(ModelConfig(name="resnet18", small_stem=True), (1, 8, 8), CLASSES)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    big_gray = build_model(ModelConfig(name="resnet18", small_stem=False), (1, 64, 64), CLASSES)
    assert big_gray.conv1.in_channels == 1 and big_gray.conv1.kernel_size == (7, 7)
    assert big_gray(torch.randn(2, 1, 64, 64)).shape == (2, CLASSES)


def test_prunable_parameters_in_module_order():
    model = _model("lenet5")
    kinds = [type(m).__name__ for m, _ in prunable_parameters(model)]
    assert kinds == ["Conv2d", "Conv2d", "Linear", "Linear", "Linear"]


# The int8 modes on a family of each kind (weight-only wN modes: tests/test_quantization.py).
@pytest.mark.parametrize("mode", ["none", "dynamic", "dynamic_fp16", "static", "qat"])
@pytest.mark.parametrize("name", ["lenet_300_100", "lenet5", "small_cnn", "conv2", "resnet20", "vgg11",
                                  "resnet18"])
def test_quant_modes(name, mode):
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = quantize(model, QuantConfig(mode=mode, calibration_batches=2), _batches())
    x = _batches(seed=2)[0][0]
    with torch.no_grad():
        out = qmodel(x)
    assert out.shape == (x.shape[0], CLASSES)
    # The input model must be left untouched.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    if mode == "none":
        assert not _quantized_modules(qmodel)
    else:
        assert _quantized_modules(qmodel)
        # Dynamic mode quantizes Linear layers only; static quantizes convolutions too.
        float_kinds = nn.Linear if mode.startswith("dynamic") else (nn.Linear, nn.Conv2d)
        assert not any(isinstance(m, float_kinds) for m in qmodel.modules())


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quantized_lenet_is_smaller_and_agrees(mode):
    model = _model("lenet_300_100")
    qmodel = quantize(model, QuantConfig(mode=mode, calibration_batches=4), _batches())
    # int8 weights: about a quarter of the float32 bytes, plus scales and pickling overhead.
    assert serialized_size(qmodel) < 0.4 * serialized_size(model)
    x = torch.cat([x for x, _ in _batches(n=4, seed=3)])
    with torch.no_grad():
        agreement = (qmodel(x).argmax(1) == model(x).argmax(1)).float().mean().item()
    assert agreement >= 0.6, agreement


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_pruning_survives_quantization(mode):
    model = _prune_linears(_model("lenet_300_100"), 0.8)
    masks = [m.weight_mask.clone() for m, _ in prunable_parameters(model)]
    qmodel = quantize(model, QuantConfig(mode=mode, calibration_batches=2), _batches())
    # The input keeps its pruning reparametrisation; only the copy was stripped.
    assert all(hasattr(m, "weight_orig") for m, _ in prunable_parameters(model))
    qlinears = [m for m in qmodel.modules() if isinstance(m, nnq.Linear)]
    assert len(qlinears) == len(masks)
    for qlinear, mask in zip(qlinears, masks):
        w = qlinear.weight()
        assert w.is_quantized
        pruned = mask == 0
        assert pruned.float().mean().item() == pytest.approx(0.8, abs=0.01)
        assert torch.all(w.int_repr()[pruned] == 0)
        assert torch.all(w.dequantize()[pruned] == 0)
        # Surviving weights mostly stay nonzero after rounding to int8.
        assert (w.int_repr()[~pruned] != 0).float().mean().item() > 0.9


def test_strip_pruning_makes_masks_permanent():
    model = _prune_linears(_model("lenet_300_100"), 0.5)
    stripped = strip_pruning(model)
    assert not any(n.endswith("_mask") for n, _ in stripped.named_buffers())
    assert hasattr(model[1], "weight_mask")
    torch.testing.assert_close(stripped[1].weight, model[1].weight)
    assert (stripped[1].weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    # serialized_size strips masks itself, so weight_orig + mask are not both counted.
    assert serialized_size(model) == serialized_size(stripped)


def test_evaluate():
    loader = _batches()
    result = evaluate(_model("lenet5"), loader, "cpu")
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["loss"] > 0


def test_dense_flops_lenet_300_100():
    # FlopCounterMode counts aten.addmm as 2*M*N*K (one multiply and one add per MAC) and ignores
    # the bias add and ReLUs, so this is exactly twice the weight count for a batch of 1.
    assert dense_flops(_model("lenet_300_100"), SMALL) == 2 * (64 * 300 + 300 * 100 + 100 * 10)


def test_sparsity():
    model = _model("lenet_300_100")
    dense = sparsity(model)
    total = 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert dense["sparsity"] == 0.0
    assert dense["total_params"] == dense["nonzero_params"] == total
    _prune_linears(model, 0.5)
    pruned = sparsity(model)
    assert pruned["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert pruned["total_params"] == total
    weights = 64 * 300 + 300 * 100 + 100 * 10
    assert pruned["nonzero_params"] == pytest.approx(total - weights / 2, abs=5)


def test_latency():
    model = _model("lenet_300_100")
    assert latency_ms_per_sample(model, SMALL, batch_size=8, repeats=3, warmup=1) > 0
    qmodel = quantize(model, QuantConfig(mode="dynamic"), [])
    assert latency_ms_per_sample(qmodel, SMALL, batch_size=8, repeats=3, warmup=1) > 0
