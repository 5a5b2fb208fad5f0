"""Model registry: builders take (ModelConfig, input shape (C, H, W), number of classes).

Also: initial weights from a file (``model.weights``), which parameters train (``model.finetune``)
and the layer helpers the pruning scope uses. The CIFAR architectures live in ``jobs.cifar_models``.
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from jobs import cifar_models as cifar
from jobs.config import ModelConfig

Shape = tuple[int, int, int]
PRUNABLE = (nn.Linear, nn.Conv2d)
log = logging.getLogger(__name__)


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


def small_cnn(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """Configurable CNN: per entry of ``model.channels`` / ``model.kernel_sizes`` conv(k, pad k//2)-ReLU-maxpool2."""
    channels = [int(x) for x in cfg.channels.split(",")]
    kernels = [int(x) for x in cfg.kernel_sizes.split(",")]
    if len(channels) != len(kernels):
        raise ValueError(f"small_cnn: model.channels ({cfg.channels!r}) and model.kernel_sizes "
                         f"({cfg.kernel_sizes!r}) need the same number of entries (one per conv layer)")
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for width, k in zip(channels, kernels):
        layers += [nn.Conv2d(c, width, k, padding=k // 2), nn.ReLU()]
        c, h, w = width, h + 1 - k % 2, w + 1 - k % 2  # padding k//2: odd k keeps the size, even k adds 1
        pool, h, w = cifar.pool_or_skip(h, w)
        layers.append(pool)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * h * w, num_classes))


def _torchvision_resnet(arch: str, cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """torchvision ResNet, randomly initialised, with its stem adapted to the input."""
    c = input_shape[0]
    import torchvision  # here: importing it pulls in torch._dynamo (~0.8 s) for every process

    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if cfg.small_stem:
        # The ImageNet stem downsamples 4x before the first block, far too much for 8..32 px images.
        model.conv1 = nn.Conv2d(c, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif c != 3:
        model.conv1 = nn.Conv2d(c, 64, 7, 2, 3, bias=False)
    return model


def alexnet(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """torchvision AlexNet, randomly initialised; ``small_stem`` adapts its downsampling to 8..32 px images.

    The small stem replaces the 11x11 stride-4 first conv by a 3x3 stride-1 one and the three 3x3
    stride-2 max-pools by 2x2 ones (left out once the map is 1 px wide). Module names and every
    other shape stay torchvision's, so the classifier (AdaptiveAvgPool 6x6 → 9216 → 4096 → 4096)
    is unchanged: a 32 px input reaches it as 256x4x4, spread to 6x6 by the adaptive pool.
    """
    c, h, w = input_shape
    import torchvision

    model = torchvision.models.alexnet(weights=None, num_classes=num_classes)
    if cfg.small_stem:
        model.features[0] = nn.Conv2d(c, 64, 3, 1, 1)
        for i in (2, 5, 12):
            model.features[i], h, w = cifar.pool_or_skip(h, w)
    else:
        if min(h, w) < 63:
            raise ValueError(f"alexnet without model.small_stem needs inputs of at least 63x63, not {h}x{w}")
        if c != 3:
            model.features[0] = nn.Conv2d(c, 64, 11, 4, 2)
    return model


def conv2(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """Conv-2 of the lottery-ticket paper: 64,64,pool; FC 256-256."""
    return cifar.conv_net(1, input_shape, num_classes)


def conv4(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """Conv-4: 64,64,pool,128,128,pool; FC 256-256."""
    return cifar.conv_net(2, input_shape, num_classes)


def conv6(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """Conv-6: 64,64,pool,128,128,pool,256,256,pool; FC 256-256."""
    return cifar.conv_net(3, input_shape, num_classes)


def vgg11(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """CIFAR VGG-11 with BatchNorm, global average pool, one Linear."""
    return cifar.VGG(11, input_shape, num_classes)


def vgg16(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """CIFAR VGG-16 (the lottery-ticket paper's VGG-16)."""
    return cifar.VGG(16, input_shape, num_classes)


def vgg19(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """CIFAR VGG-19 (the lottery-ticket paper's VGG-19)."""
    return cifar.VGG(19, input_shape, num_classes)


def resnet20(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """CIFAR ResNet-20 (He et al.; 1x1-conv projection shortcuts)."""
    return cifar.CifarResNet(20, input_shape, num_classes)


def resnet56(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """CIFAR ResNet-56 (He et al.; 1x1-conv projection shortcuts)."""
    return cifar.CifarResNet(56, input_shape, num_classes)


def resnet18(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """torchvision ResNet-18 (``small_stem``: 3x3 stride-1 first conv, no max-pool)."""
    return _torchvision_resnet("resnet18", cfg, input_shape, num_classes)


def resnet34(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """torchvision ResNet-34 (``small_stem`` as resnet18)."""
    return _torchvision_resnet("resnet34", cfg, input_shape, num_classes)


def resnet50(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """torchvision ResNet-50, bottleneck blocks (``small_stem`` as resnet18)."""
    return _torchvision_resnet("resnet50", cfg, input_shape, num_classes)


MODELS: dict[str, Callable[[ModelConfig, Shape, int], nn.Module]] = {
    "lenet_300_100": lenet_300_100,
    "lenet5": lenet5,
    "conv2": conv2,
    "conv4": conv4,
    "conv6": conv6,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "alexnet": alexnet,
    "small_cnn": small_cnn,
}


def build_model(cfg: ModelConfig, input_shape: Shape, num_classes: int) -> nn.Module:
    """Build the model named by ``cfg.name`` for inputs of ``input_shape`` and ``num_classes`` outputs.

    With ``cfg.weights`` the initial weights come from that file (all but a resized output layer,
    see ``load_weights``); ``cfg.finetune`` then chooses which parameters train.
    """
    if cfg.name not in MODELS:
        raise KeyError(f"unknown model {cfg.name!r}; choose from {sorted(MODELS)}")
    model = MODELS[cfg.name](cfg, tuple(input_shape), num_classes)
    if cfg.weights:
        skipped = load_weights(model, cfg.weights)
        if skipped:
            log.warning("model.weights %s: kept the new randomly initialised %s (shape differs)",
                        cfg.weights, ", ".join(skipped))
    set_finetune(model, cfg.finetune)
    return model


# --- layers -----------------------------------------------------------------------------------------

def prunable_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` for every Linear and Conv2d, in module order."""
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def named_prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Qualified names and modules of the prunable layers, in the order of ``prunable_parameters``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE)]


def layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the prunable layers, in the order of ``prunable_parameters``."""
    return [name for name, _ in named_prunable(model)]


def first_conv(model: nn.Module) -> str:
    """Qualified name of the first Conv2d in module order."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    raise ValueError(f"{type(model).__name__} has no convolution")


def output_layer_name(model: nn.Module) -> str:
    """Qualified name of the output layer: the last Linear in module order (true of every registered model)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear output layer")
    return names[-1]


def output_layer(model: nn.Module) -> nn.Module:
    """The output layer (last Linear) of ``model``."""
    return model.get_submodule(output_layer_name(model))


def set_finetune(model: nn.Module, mode: str) -> None:
    """``full``: every parameter trains; ``head``: only the output layer's (BatchNorm statistics still update)."""
    if mode not in ("full", "head"):
        raise ValueError(f"model.finetune must be full or head, not {mode!r}")
    for p in model.parameters():
        p.requires_grad_(mode == "full")
    for p in output_layer(model).parameters():
        p.requires_grad_(True)


# --- initial weights from a file ---------------------------------------------------------------------

def read_state_dict(path: str) -> dict[str, Tensor]:
    """Tensors of a weights file: a state dict, or a checkpoint dict holding one under ``state_dict``/``model``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"model.weights: no file {str(file)!r}. Compute nodes usually have no internet: download/save it on "
            "the login node into a shared path, e.g. torch.save(torchvision.models.resnet18(weights='DEFAULT')"
            ".state_dict(), PATH)")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # e.g. a whole pickled nn.Module
        raise ValueError(f"model.weights: {str(file)!r} holds more than tensors; save model.state_dict(), "
                         f"not the model object ({str(err).splitlines()[0]})") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"model.weights: {str(file)!r} is not a state dict (a dict of tensors, possibly under "
                         "'state_dict' or 'model')")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    # A pruned model's state dict (torch.nn.utils.prune): fold each mask into its weight.
    for key in [k for k in state if k.endswith("_orig") and k[:-5] + "_mask" in state]:
        state[key[:-5]] = state.pop(key) * state.pop(key[:-5] + "_mask")
    return state


def load_weights(model: nn.Module, path: str) -> list[str]:
    """Load ``path`` into ``model`` strictly, except an output layer whose shape differs; return its skipped keys.

    A different number of classes keeps the model's new randomly initialised output layer. Any other
    missing, unexpected or differently shaped key is an error (e.g. ImageNet weights with
    ``model.small_stem: true``, or 3-channel weights for 1-channel inputs). BatchNorm
    ``num_batches_tracked`` counters may be absent (older torchvision files).
    """
    state = read_state_dict(path)
    own = model.state_dict()
    head = output_layer_name(model)
    head_keys = {f"{head}.weight", f"{head}.bias"}
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    skipped = [k for k in mismatched if k in head_keys]
    problems = []
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    bad_shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched if k not in head_keys]
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad_shapes)):
        if keys:
            problems.append(f"{what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''} ({len(keys)})")
    if problems:
        raise ValueError(f"model.weights {path!r} does not fit this model ({type(model).__name__}); "
                         + "; ".join(problems) + ". Only the output layer may differ (number of classes); "
                         "check model name, model.small_stem and the number of input channels")
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped
