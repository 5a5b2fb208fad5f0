"""Small-image architectures of the lottery-ticket literature: Conv-2/4/6, CIFAR VGG and CIFAR ResNets.

Plain ``nn.Module`` constructors taking ``(input_shape (C, H, W), num_classes)``; ``jobs.models``
registers them. All are FX-traceable (no data-dependent control flow), use ``nn.ReLU`` modules
rather than functional calls (so FX quantization fuses conv/linear + relu) and work on any input of
at least 8x8: max-pools are left out once the feature map is 1 pixel wide.
"""
from __future__ import annotations

from torch import Tensor, nn

Shape = tuple[int, int, int]


def pool_or_skip(h: int, w: int) -> tuple[nn.Module, int, int]:
    """A 2x2 max-pool and the size after it, or ``nn.Identity`` when the map is already 1 pixel wide."""
    if min(h, w) < 2:
        return nn.Identity(), h, w
    return nn.MaxPool2d(2), h // 2, w // 2


# --- Conv-2 / Conv-4 / Conv-6 (Frankle & Carbin 2019, figure 2) -------------------------------------

def conv_net(stages: int, input_shape: Shape, num_classes: int) -> nn.Sequential:
    """Conv-2/4/6: ``stages`` x [conv3x3-ReLU, conv3x3-ReLU, max-pool] with 64, 128, 256 channels, FC 256-256.

    Glorot-normal initialisation as in the paper (biases zero).
    """
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for width in (64, 128, 256)[:stages]:
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        pool, h, w = pool_or_skip(h, w)
        layers.append(pool)
        c = width
    layers += [nn.Flatten(),
               nn.Linear(c * h * w, 256), nn.ReLU(),
               nn.Linear(256, 256), nn.ReLU(),
               nn.Linear(256, num_classes)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return model


# --- VGG for CIFAR (the lottery-ticket paper's VGG-16/19; open_lth's cifar_vgg) ---------------------

VGG_PLANS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


def _init_he(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VGG(nn.Module):
    """conv3x3-BN-ReLU stacks with 4 max-pools (the ImageNet VGG's fifth is left out, as in open_lth),
    global average pooling and a single Linear classifier."""

    def __init__(self, depth: int, input_shape: Shape, num_classes: int):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for item in VGG_PLANS[depth]:
            if item == "M":
                pool, h, w = pool_or_skip(h, w)
                layers.append(pool)
            else:
                layers += [nn.Conv2d(c, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
                c = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)
        _init_he(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


# --- ResNet-20/56 for CIFAR (He et al. 2016, section 4.2) ------------------------------------------

class BasicBlock(nn.Module):
    """Two conv3x3-BN with a residual add; projection shortcut (option B: 1x1 conv + BN) when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2): conv3x3(16) stem, 3 stages of n blocks (16, 32, 64 channels), global average pool, FC."""

    def __init__(self, depth: int, input_shape: Shape, num_classes: int):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, not {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        stages, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        _init_he(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))
