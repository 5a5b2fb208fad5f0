"""Every registered model on small inputs; initial weights from a file; fine-tuning only the head."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

from jobs.config import ModelConfig
from jobs.models import (MODELS, build_model, first_conv, layer_names, load_weights, output_layer,
                         output_layer_name, prunable_parameters)

CLASSES = 10
SHAPES = [(1, 8, 8), (3, 32, 32)]


def _build(name: str, shape=(1, 8, 8), classes: int = CLASSES, seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name, **options), shape, classes)


def _out(model: nn.Module, shape, seed: int = 1) -> torch.Tensor:
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("shape", SHAPES, ids=["1x8x8", "3x32x32"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model(name, shape):
    model = _build(name, shape).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, CLASSES)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), out)
    names = layer_names(model)
    assert len(names) == len(prunable_parameters(model)) >= 1
    assert [model.get_submodule(n) for n in names] == [m for m, _ in prunable_parameters(model)]
    assert names[-1] == output_layer_name(model)
    assert isinstance(output_layer(model), nn.Linear) and output_layer(model).out_features == CLASSES
    if name != "lenet_300_100":
        assert isinstance(model.get_submodule(first_conv(model)), nn.Conv2d)


def test_first_conv_names():
    assert first_conv(_build("resnet20")) == "conv1"
    assert first_conv(_build("vgg11")) == "features.0"
    assert first_conv(_build("lenet5")) == "0"
    with pytest.raises(ValueError, match="no convolution"):
        first_conv(_build("lenet_300_100"))


def test_small_images_keep_their_pixels():
    # Max-pools are left out once the map is 1 px wide; small stems do not downsample first.
    assert sum(isinstance(m, nn.MaxPool2d) for m in _build("vgg19", (1, 8, 8)).modules()) == 3
    assert sum(isinstance(m, nn.MaxPool2d) for m in _build("vgg19", (3, 32, 32)).modules()) == 4
    alex = _build("alexnet", (1, 8, 8))
    assert alex.features[0].kernel_size == (3, 3) and alex.features[0].in_channels == 1
    assert [type(alex.features[i]) for i in (2, 5, 12)] == [nn.MaxPool2d, nn.MaxPool2d, nn.MaxPool2d]
    big = _build("alexnet", (1, 64, 64), small_stem=False)
    assert big.features[0].kernel_size == (11, 11) and big.features[0].in_channels == 1
    assert _out(big, (1, 64, 64)).shape == (2, CLASSES)
    with pytest.raises(ValueError, match="small_stem"):
        _build("alexnet", (3, 32, 32), small_stem=False)
    r50 = _build("resnet50", (1, 8, 8))
    assert r50.conv1.kernel_size == (3, 3) and isinstance(r50.maxpool, nn.Identity)


def test_resnet20_projection_shortcuts():
    model = _build("resnet20")
    assert [n for n in layer_names(model) if "shortcut" in n] == ["layer2.0.shortcut.0", "layer3.0.shortcut.0"]
    assert sum(p.numel() for p in model.parameters()) == 272_186


def test_small_cnn_is_configurable():
    model = _build("small_cnn", (3, 32, 32), channels="8,16,32", kernel_sizes="5,3,4")
    convs = [m for m, _ in prunable_parameters(model) if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.padding[0]) for c in convs] == [(8, 5, 2), (16, 3, 1), (32, 4, 2)]
    assert _out(model, (3, 32, 32)).shape == (2, CLASSES)
    deep = _build("small_cnn", (1, 8, 8), channels="4,4,4,4,4", kernel_sizes="3,3,3,3,3")
    assert _out(deep, (1, 8, 8)).shape == (2, CLASSES)
    with pytest.raises(ValueError, match="same number"):
        _build("small_cnn", channels="32,64", kernel_sizes="3")


# One model per family: loading is generic, and saving the big ones costs seconds each.
@pytest.mark.parametrize("name", ["lenet_300_100", "conv4", "vgg11", "resnet20", "resnet18", "small_cnn"])
def test_weights_round_trip(name, tmp_path):
    source = _build(name, seed=1)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    loaded = _build(name, seed=2, weights=str(path))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())
    torch.testing.assert_close(_out(loaded, (1, 8, 8)), _out(source, (1, 8, 8)))


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "vgg11", "alexnet"])
def test_weights_with_other_classes_keep_the_new_head(name, tmp_path, caplog):
    source = _build(name, classes=100, seed=1)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    fresh = _build(name, seed=2)
    with caplog.at_level(logging.WARNING, "jobs.models"):
        loaded = _build(name, seed=2, weights=str(path))
    head = output_layer_name(loaded)
    assert head in caplog.text
    assert output_layer(loaded).out_features == CLASSES
    for key, value in loaded.state_dict().items():
        expected = fresh.state_dict()[key] if key.startswith(head + ".") else source.state_dict()[key]
        assert torch.equal(value, expected), key
    assert sorted(load_weights(_build(name), str(path))) == [f"{head}.bias", f"{head}.weight"]


def test_torchvision_weights_file(tmp_path):
    # What a user saves on the login node: torchvision.models.resnet18(weights=...).state_dict().
    path = tmp_path / "resnet18.pt"
    imagenet = torchvision.models.resnet18(weights=None)
    torch.save({"model": imagenet.state_dict()}, path)
    model = _build("resnet18", (3, 64, 64), small_stem=False, weights=str(path))
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert model.fc.out_features == CLASSES
    # Everything but the output layer must fit: the small stem's 3x3 conv1 does not.
    with pytest.raises(ValueError, match=r"conv1\.weight.*small_stem"):
        _build("resnet18", (3, 32, 32), small_stem=True, weights=str(path))
    with pytest.raises(ValueError, match="missing"):
        _build("resnet34", (3, 64, 64), small_stem=False, weights=str(path))


def test_weights_of_a_pruned_model(tmp_path):
    source = _build("lenet5", seed=1)
    for module, name in prunable_parameters(source):
        prune.l1_unstructured(module, name, amount=0.5)
    path = tmp_path / "pruned.pt"
    torch.save(source.state_dict(), path)
    loaded = _build("lenet5", weights=str(path))
    assert torch.equal(loaded[0].weight, source[0].weight)
    assert (loaded[0].weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_missing_or_bad_weights_file(tmp_path):
    missing = tmp_path / "nowhere" / "resnet18.pt"
    with pytest.raises(FileNotFoundError, match=r"nowhere/resnet18\.pt.*login node"):
        _build("resnet18", weights=str(missing))
    bad = tmp_path / "bad.pt"
    torch.save([1, 2, 3], bad)
    with pytest.raises(ValueError, match="not a state dict"):
        _build("lenet5", weights=str(bad))
    torch.save(_build("lenet5"), bad)  # the whole module instead of its state dict
    with pytest.raises(ValueError, match="save model.state_dict"):
        _build("lenet5", weights=str(bad))


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "alexnet"])
def test_finetune_head_trains_only_the_output_layer(name):
    model = _build(name, finetune="head").train()
    head = output_layer_name(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{head}.weight", f"{head}.bias"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, CLASSES, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    assert changed == [f"{head}.bias", f"{head}.weight"]
    full = _build(name, finetune="full")
    assert all(p.requires_grad for p in full.parameters())


def test_finetune_head_with_pruning_and_weights(tmp_path):
    # Pruning reuses the frozen Parameter as weight_orig, so frozen layers stay frozen when pruned.
    path = tmp_path / "w.pt"
    torch.save(_build("conv2", seed=1).state_dict(), path)
    model = _build("conv2", weights=str(path), finetune="head")
    for module, name in prunable_parameters(model):
        prune.l1_unstructured(module, name, amount=0.3)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["10.bias", "10.weight_orig"]


def test_unknown_finetune_mode():
    cfg = dataclasses.replace(ModelConfig(name="lenet5"), finetune="some")
    with pytest.raises(ValueError, match="full or head"):
        build_model(cfg, (1, 8, 8), CLASSES)
