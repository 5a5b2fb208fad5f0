"""Measurements: per-layer cost by hand, ShrinkBench ratios, sparse size, top-5, quantization error."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from jobs.config import ModelConfig, QuantConfig
from jobs.measure import (compression, dense_flops, evaluate, latency, layer_stats, peak_memory_bytes, quant_error,
                          serialized_size, sparse_size, sparsity, weight_histograms)
from jobs.models import build_model, prunable_parameters
from jobs.quantization import quantize

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = 10
SMALL = (1, 8, 8)



def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name), SMALL, CLASSES).eval()


def _batches(n: int = 4, batch: int = 16, seed: int = 1, classes: int = CLASSES):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *SMALL, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def _prune(model: nn.Module, amount: float) -> nn.Module:
    for module, name in prunable_parameters(model):
        prune.l1_unstructured(module, name, amount=amount)
    return model


def test_layer_stats_lenet_300_100_by_hand():
    stats = layer_stats(_model("lenet_300_100"), SMALL).set_index("layer")
    assert list(stats.index) == ["1", "3", "5"]
    for layer, (fan_in, fan_out) in {"1": (64, 300), "3": (300, 100), "5": (100, 10)}.items():
        row = stats.loc[layer]
        weight_bytes = 4 * (fan_in * fan_out + fan_out)
        assert row["type"] == "Linear"
        assert row["params"] == row["nonzero"] == fan_in * fan_out and row["bias_params"] == fan_out
        assert row["sparsity"] == 0.0
        assert row["macs"] == row["macs_nonzero"] == fan_in * fan_out
        assert row["flops"] == row["flops_nonzero"] == 2 * fan_in * fan_out
        assert row["weight_bytes"] == weight_bytes and row["activation_bytes"] == 4 * fan_out
        assert row["inference_bytes"] == weight_bytes + 4 * fan_out
        assert row["training_bytes"] == 3 * weight_bytes + 4 * fan_out
    assert stats["flops"].sum() == dense_flops(_model("lenet_300_100"), SMALL)
    adam = layer_stats(_model("lenet_300_100"), SMALL, optimizer_copies=2).set_index("layer")
    assert adam.loc["5", "training_bytes"] == 4 * 4 * (100 * 10 + 10) + 4 * 10


def test_conv_macs_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(4, 8, 3, stride=2, groups=2))
    stats = layer_stats(model, (3, 9, 9)).set_index("layer")
    # 4 x 9 x 9 outputs, 3 x 3 x 3 inputs each; then 8 x 4 x 4 outputs, (4 / 2 groups) x 3 x 3 each.
    assert stats.loc["0", "macs"] == 4 * 9 * 9 * 3 * 3 * 3
    assert stats.loc["1", "macs"] == 8 * 4 * 4 * 2 * 3 * 3
    assert stats.loc["0", "activation_bytes"] == 4 * 4 * 9 * 9
    assert stats.loc["0", "weight_bytes"] == 4 * 4 * 3 * 3 * 3 and stats.loc["0", "bias_params"] == 0
    assert stats["flops"].sum() == dense_flops(model, (3, 9, 9))


def test_dense_flops_are_remembered_per_architecture_and_input_shape(monkeypatch):
    import jobs.measure as measure

    monkeypatch.setattr(measure, "_DENSE_FLOPS", {})
    wide = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    narrow = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    assert dense_flops(wide, SMALL) == 2 * (64 * 32 + 32 * 10)
    assert dense_flops(narrow, SMALL) == 2 * (64 * 16 + 16 * 10)  # same layer types, other widths
    assert dense_flops(conv, SMALL) == 2 * (4 * 9 * 64 + 4 * 10)
    assert dense_flops(conv, (1, 4, 4)) == 2 * (4 * 9 * 16 + 4 * 10)  # same model, another input shape
    assert len(measure._DENSE_FLOPS) == 4
    assert dense_flops(copy.deepcopy(wide), SMALL) == 2 * (64 * 32 + 32 * 10)
    assert len(measure._DENSE_FLOPS) == 4  # counted once per architecture and shape


@pytest.mark.parametrize("name", ["lenet5", "resnet18"])
def test_compression_flops_match_flop_counter_on_dense_models(name):
    model = _model(name)
    result = compression(model, SMALL)
    assert result["flops"] == dense_flops(model, SMALL) == 2 * result["macs"]
    assert result["flops_nonzero"] == result["flops"] and result["theoretical_speedup"] == 1.0
    assert result["size"] == sum(p.numel() for p in model.parameters())


def test_half_pruned_halves_flops_and_size():
    model = _prune(_model("lenet5"), 0.5)
    stats = layer_stats(model, SMALL)
    assert (stats["nonzero"] / stats["params"]).tolist() == pytest.approx([0.5] * 5, abs=0.01)
    assert (stats["flops_nonzero"] / stats["flops"]).tolist() == pytest.approx([0.5] * 5, abs=0.01)
    assert hasattr(model[0], "weight_mask")  # measuring did not strip the input's masks
    result = compression(model, SMALL)
    assert result["theoretical_speedup"] == pytest.approx(2.0, rel=0.01)
    assert result["compression_ratio"] == pytest.approx(2.0, rel=0.02)  # biases are not pruned
    assert result["size"] == sparsity(model)["total_params"]
    assert result["size_nonzero"] == sparsity(model)["nonzero_params"]


def test_sparse_size_against_dense_size():
    dense = _model("lenet_300_100")
    assert sparse_size(dense) > serialized_size(dense)  # CSR values + indices cost more than dense
    pruned = _prune(_model("lenet_300_100"), 0.9)
    assert sparse_size(pruned) < 0.35 * serialized_size(pruned)
    assert serialized_size(pruned) == pytest.approx(serialized_size(dense), rel=0.01)
    # An int8 model is measured dense.
    qmodel = quantize(pruned, QuantConfig(mode="dynamic"), [])
    assert sparse_size(qmodel) == serialized_size(qmodel)


def test_evaluate_top5():
    model = _model("lenet5")
    result = evaluate(model, _batches(), "cpu")
    assert set(result) == {"accuracy", "top5", "loss"}
    assert 0.0 <= result["accuracy"] <= result["top5"] <= 1.0
    three = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    assert evaluate(three, _batches(classes=3), "cpu")["top5"] == 1.0
    # The top-5 of a model that always ranks classes 0 > 1 > ... > 9 is classes 0..4.
    ranked = nn.Sequential(nn.Flatten(), nn.Linear(64, CLASSES))
    with torch.no_grad():
        ranked[1].weight.zero_()
        ranked[1].bias.copy_(-torch.arange(CLASSES, dtype=torch.float))
    x = torch.randn(10, *SMALL)
    result = evaluate(ranked, [(x, torch.arange(CLASSES))], "cpu")
    assert result["accuracy"] == pytest.approx(0.1) and result["top5"] == pytest.approx(0.5)
    qmodel = quantize(model, QuantConfig(mode="static", calibration_batches=2), _batches())
    assert evaluate(qmodel, _batches(), "cpu")["top5"] >= evaluate(qmodel, _batches(), "cpu")["accuracy"]


def test_quant_error():
    model = _prune(_model("lenet_300_100"), 0.5)
    same = quant_error(model, quantize(model, QuantConfig(mode="none")), _batches(), max_batches=2)
    assert same == {"output_mse": 0.0, "top1_agreement": 1.0}
    close = quant_error(model, quantize(model, QuantConfig(mode="dynamic")), _batches())
    coarse = quant_error(model, quantize(model, QuantConfig(mode="w2")), _batches())
    assert 0.0 < close["output_mse"] < coarse["output_mse"]
    assert close["top1_agreement"] >= 0.8
    with pytest.raises(ValueError):
        quant_error(model, model, [])


def test_weight_histograms_count_nonzero_weights():
    model = _prune(_model("lenet_300_100"), 0.7)
    hist = weight_histograms(model, bins=20)
    assert list(hist.columns) == ["layer", "bin_left", "bin_right", "count"]
    stats = layer_stats(model, SMALL).set_index("layer")
    counts = hist.groupby("layer")["count"].sum()
    assert counts.to_dict() == stats["nonzero"].to_dict()
    assert (hist.groupby("layer").size() == 20).all()
    assert (hist["bin_left"] < hist["bin_right"]).all()
    # Quantized layers are histogrammed dequantized; pruned weights stay out.
    qhist = weight_histograms(quantize(model, QuantConfig(mode="static", calibration_batches=2), _batches()))
    assert qhist.groupby("layer")["count"].sum().to_dict() == pytest.approx(stats["nonzero"].to_dict(), rel=0.02)


def test_latency_and_peak_memory():
    model = _model("lenet_300_100")
    result = latency(model, SMALL, repeats=3, warmup=1)
    assert set(result) == {"latency_ms_b1", "latency_ms_b32"} and all(v > 0 for v in result.values())
    qresult = latency(quantize(model, QuantConfig(mode="static"), _batches()), SMALL, batch_sizes=(1, 4), repeats=2)
    assert set(qresult) == {"latency_ms_b1", "latency_ms_b4"}
    memory = peak_memory_bytes()
    assert set(memory) == {"peak_rss_bytes"} and memory["peak_rss_bytes"] > 10 * 2**20
    assert "peak_cuda_bytes" not in peak_memory_bytes("cpu")
