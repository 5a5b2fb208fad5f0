"""Model registry: builders take (ModelConfig, input shape (C, H, W), number of classes)."""
from __future__ import annotations

from typing import Callable

import torchvision
from torch import nn

from jobs.config import ModelConfig

Shape = tuple[int, int, int]


def lenet_300_100(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """Fully connected LeNet-300-100 of the lottery-ticket paper."""
    c, h, w = input_shape
    # ReLU modules rather than functional calls so FX quantization can fuse linear-relu.
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(c * h * w, 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def lenet5(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """Small LeNet-5-style conv net; padded convs keep it valid for any input of at least 8x8."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * (h // 4) * (w // 4), 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def resnet18(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """torchvision ResNet-18, randomly initialised, with its stem adapted to the input."""
    c = input_shape[0]
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if cfg.small_stem:
        # The ImageNet stem downsamples 4x before the first block, far too much for 8..32 px images.
        model.conv1 = nn.Conv2d(c, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif c != 3:
        model.conv1 = nn.Conv2d(c, 64, 7, 2, 3, bias=False)
    return model


MODELS: dict[str, Callable[[ModelConfig, Shape, int], nn.Module]] = {
    "lenet_300_100": lenet_300_100,
    "lenet5": lenet5,
    "resnet18": resnet18,
}


def build_model(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """Build the model named by ``cfg.name`` for inputs of ``input_shape`` and ``num_classes`` outputs."""
    if cfg.name not in MODELS:
        raise KeyError(f"unknown model {cfg.name!r}; choose from {sorted(MODELS)}")
    return MODELS[cfg.name](cfg, tuple(input_shape), num_classes)


def prunable_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` for every Linear and Conv2d, in module order."""
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
