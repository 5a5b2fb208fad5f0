"""Every quantization mode: shapes, pruned weights surviving, weight-only error vs bits, QAT accuracy."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from jobs.config import ModelConfig, QuantConfig, TrainConfig
from jobs.measure import evaluate
from jobs.models import build_model, prunable_parameters
from jobs.quantization import QUANT_MODES, QuantData, fake_quantize_weight, layer_weights, quantize
from jobs.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = 10
SMALL = (1, 8, 8)

INT8_MODES = {"dynamic", "static", "qat"}
WEIGHT_ONLY = sorted(m for m in QUANT_MODES if m.startswith("w"))


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name), SMALL, CLASSES).eval()


def _batches(n: int = 4, batch: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *SMALL, generator=g), torch.randint(0, CLASSES, (batch,), generator=g))
            for _ in range(n)]


def _data(n: int = 4) -> QuantData:
    return QuantData(calibration=_batches(n), train_loader=_batches(n, seed=5), train_cfg=TrainConfig(),
                     device=torch.device("cpu"))


def _pruned(name: str, amount: float = 0.8) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = _model(name)
    for module, param in prunable_parameters(model):
        prune.l1_unstructured(module, param, amount=amount)
    masks = {n: m.weight_mask == 0 for n, m in model.named_modules() if hasattr(m, "weight_mask")}
    return model, masks


def _check(name: str, mode: str) -> None:
    model, pruned = _pruned(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = quantize(model, QuantConfig(mode=mode, calibration_batches=2, qat_epochs=1), _data())
    x = _batches(1, seed=2)[0][0]
    with torch.no_grad():
        assert qmodel(x).shape == (x.shape[0], CLASSES)
    for k, v in model.state_dict().items():  # the input model is left untouched, masks included
        assert torch.equal(v, before[k]), k
    weights = dict(layer_weights(qmodel))
    assert set(weights) == set(pruned), mode
    for layer, zero in pruned.items():
        w = weights[layer]
        assert zero.float().mean().item() == pytest.approx(0.8, abs=0.01)
        assert torch.all(w[zero] == 0), (mode, layer)
        if mode not in ("w1", "w2", "w2_channel", "w3"):  # coarse grids round small weights to 0
            assert (w[~zero] != 0).float().mean().item() > 0.85, (mode, layer)


@pytest.mark.parametrize("mode", sorted(QUANT_MODES))
def test_every_mode_lenet_300_100_keeps_pruned_weights_zero(mode):
    _check("lenet_300_100", mode)


@pytest.mark.parametrize("mode", ["static", "qat", "w4_channel", "dynamic"])
@pytest.mark.parametrize("name", ["lenet5", "resnet18"])
def test_modes_on_conv_nets_keep_pruned_weights_zero(name, mode):
    _check(name, mode)


def test_registry_has_all_modes():
    expected = {"none", "dynamic", "dynamic_fp16", "static", "qat"}
    expected |= {f"w{n}{suffix}" for n in range(1, 17) for suffix in ("", "_channel")}
    assert set(QUANT_MODES) == expected
    assert QUANT_MODES["w5_channel"].__name__ == "w5_channel" and "5-bit" in QUANT_MODES["w5_channel"].__doc__


def test_int8_modes_quantize_weights_and_fp16_stores_half():
    from torch.ao.nn.quantized import dynamic as nnqd

    model = _model("lenet_300_100")
    fp16 = quantize(model, QuantConfig(mode="dynamic_fp16"), _data())
    linears = [m for m in fp16.modules() if isinstance(m, nnqd.Linear)]
    assert len(linears) == 3 and not any(isinstance(m, nn.Linear) for m in fp16.modules())
    x = _batches(1, seed=3)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(fp16(x), model(x), atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="QNNPACK"):
        quantize(model, QuantConfig(mode="dynamic_fp16", backend="qnnpack"), _data())


def test_static_resnet_fuses_and_quantizes_residual_adds():
    qmodel = quantize(_model("resnet18"), QuantConfig(mode="static", calibration_batches=2), _data())
    targets = [str(n.target) for n in qmodel.graph.nodes if n.op == "call_function"]
    assert sum("quantized.add_relu" in t for t in targets) == 8  # one per BasicBlock
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) for m in qmodel.modules())


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack", "x86"])
def test_backends(backend):
    engine = torch.backends.quantized.engine
    try:
        qmodel = quantize(_model("lenet5"), QuantConfig(mode="static", backend=backend, calibration_batches=2), _data())
        assert torch.backends.quantized.engine == backend
        with torch.no_grad():
            assert qmodel(_batches(1)[0][0]).shape == (16, CLASSES)
    finally:
        torch.backends.quantized.engine = engine


def test_quantize_accepts_plain_calibration_batches():
    qmodel = quantize(_model("lenet_300_100"), QuantConfig(mode="static", calibration_batches=2), _batches())
    assert qmodel(_batches(1)[0][0]).shape == (16, CLASSES)
    with pytest.raises(ValueError):
        quantize(_model("lenet_300_100"), QuantConfig(mode="static"), [])
    with pytest.raises(KeyError):
        quantize(_model("lenet_300_100"), QuantConfig(mode="w17"), _batches())


def test_fake_quantize_weight_grids():
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3)
    w[w.abs() < 0.3] = 0  # "pruned"
    for bits in range(1, 17):
        for per_channel in (False, True):
            q = fake_quantize_weight(w, bits, per_channel)
            assert torch.all(q[w == 0] == 0)
            assert torch.equal(torch.sign(q[q != 0]), torch.sign(w[q != 0]))
            groups = list(q) if per_channel else [q]
            originals = list(w) if per_channel else [w]
            for g, o in zip(groups, originals):
                levels = g.unique()
                if bits == 1:
                    a = o[o != 0].abs().mean()
                    assert torch.allclose(levels.abs()[levels != 0], a.expand(int((levels != 0).sum())))
                    assert len(levels) <= 3  # {-a, 0 (pruned), +a}
                else:
                    assert len(levels) <= 2 ** bits - 1
                    assert g.abs().max() == pytest.approx(o.abs().max().item(), rel=1e-6)  # max is on the grid
    ternary = fake_quantize_weight(torch.tensor([[-1.0, -0.4, 0.0, 0.2, 0.6]]), 2, False)
    assert ternary.tolist() == [[-1.0, 0.0, 0.0, 0.0, 1.0]]
    binary = fake_quantize_weight(torch.tensor([[-1.0, 0.0, 0.5]]), 1, False)
    assert binary.tolist() == [[-0.75, 0.0, 0.75]]
    assert torch.equal(fake_quantize_weight(torch.zeros(3, 4), 4, True), torch.zeros(3, 4))


def _output_mse(model: nn.Module, qmodel: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.mean((model(x) - qmodel(x)) ** 2).item()


def test_weight_only_error_decreases_with_bits():
    model = _model("lenet_300_100")
    x = torch.randn(256, *SMALL, generator=torch.Generator().manual_seed(4))
    for suffix in ("", "_channel"):
        errors = [_output_mse(model, quantize(model, QuantConfig(mode=f"w{n}{suffix}")), x) for n in (2, 4, 8, 16)]
        assert errors[0] > errors[1] > errors[2] > errors[3], errors
        w16 = quantize(model, QuantConfig(mode=f"w16{suffix}"))
        with torch.no_grad():
            torch.testing.assert_close(w16(x), model(x), atol=1e-4, rtol=1e-4)
        assert any(isinstance(m, nn.Linear) for m in w16.modules())  # still a float model


def test_per_channel_no_worse_than_per_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
    with torch.no_grad():  # output channels at very different scales
        model[1].weight.mul_(torch.logspace(-2, 1, 16)[:, None])
    x = torch.randn(256, *SMALL)
    for bits in (1, 2, 3, 4, 8):
        per_tensor = _output_mse(model, quantize(model, QuantConfig(mode=f"w{bits}")), x)
        per_channel = _output_mse(model, quantize(model, QuantConfig(mode=f"w{bits}_channel")), x)
        assert per_channel < per_tensor, (bits, per_channel, per_tensor)
        if bits >= 3:  # finer grids: per-channel scales pay off fully
            assert per_channel < 0.5 * per_tensor, (bits, per_channel, per_tensor)


def _learnable(n: int, seed: int) -> TensorDataset:
    templates = torch.randn(CLASSES, *SMALL, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return TensorDataset(templates[y] + 0.8 * torch.randn(n, *SMALL, generator=g), y)


def test_qat_reaches_float_accuracy_and_keeps_masks():
    torch.manual_seed(0)
    train_set, test_set = _learnable(1024, 1), _learnable(512, 2)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    test_loader = DataLoader(test_set, batch_size=256)
    cfg = TrainConfig(epochs=2, lr=0.05)
    model = _model("lenet_300_100")
    train(model, loader, cfg, torch.device("cpu"))
    for module, param in prunable_parameters(model):
        prune.l1_unstructured(module, param, amount=0.5)
    train(model, loader, cfg, torch.device("cpu"))
    cpu = torch.device("cpu")
    float_acc = evaluate(model, test_loader, cpu)["accuracy"]
    data = QuantData(calibration=loader, train_loader=loader, train_cfg=cfg, device=cpu)
    qmodel = quantize(model, QuantConfig(mode="qat", qat_epochs=1), data)
    qat_acc = evaluate(qmodel, test_loader, cpu)["accuracy"]
    assert float_acc > 0.8, float_acc
    assert qat_acc >= float_acc - 0.03, (qat_acc, float_acc)
    # Fine-tuning moved the surviving weights (beyond int8 rounding) but not the pruned ones.
    static = dict(layer_weights(quantize(model, QuantConfig(mode="static"), data)))
    for name, weight in layer_weights(qmodel):
        zero = dict(model.named_modules())[name].weight_mask == 0
        assert torch.all(weight[zero] == 0)
        assert not torch.equal(weight, static[name])
