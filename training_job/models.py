"""Networks: each is a feature extractor, global average pooling and one linear layer.

That shape is what makes class activation maps free at serving time: the exported ONNX model
returns the last feature map beside the logits, and ``bundle.json`` carries the linear layer's
weights, so a heatmap is one weighted sum (no gradients, no torch in the Lambda).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet

ARCHITECTURES = ("seed_cnn", "resnet10", "resnet18", "resnet34")


class Classifier(nn.Module):
    def __init__(self, features: nn.Module, num_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.features(x)
        logits = self.head(torch.flatten(self.pool(fmap), 1))
        return logits, fmap


class ExportWrapper(nn.Module):
    """What goes into ONNX: (logits, last feature map)."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_features(image)


def _seed_cnn(in_channels: int, width: int) -> tuple[nn.Module, int]:
    """The original project's network: 4 x (conv-BN-ReLU, max-pool)."""
    layers: list[nn.Module] = []
    c_in = in_channels
    for i in range(4):
        c_out = width * (2 ** i)
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2)]
        c_in = c_out
    return nn.Sequential(*layers), c_in


def _resnet10(in_channels: int, width: int) -> tuple[nn.Module, int]:
    """ResNet with one basic block per stage and a chosen base width (64 = torchvision's widths).

    Built from torchvision's blocks; a narrower net trains several times faster on a CPU.
    """
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    c_in = width
    for stage in range(4):
        c_out, stride = width * 2 ** stage, 1 if stage == 0 else 2
        down = None
        if stride != 1 or c_in != c_out:
            down = nn.Sequential(resnet.conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))
        layers.append(resnet.BasicBlock(c_in, c_out, stride, down))
        c_in = c_out
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net, c_in


def _torchvision_resnet(name: str, in_channels: int, pretrained: bool) -> tuple[nn.Module, int]:
    weights = None
    if pretrained:  # downloads ImageNet weights: only where the job has internet access
        weights = {"resnet18": resnet.ResNet18_Weights.DEFAULT, "resnet34": resnet.ResNet34_Weights.DEFAULT}[name]
    net = getattr(resnet, name)(weights=weights)
    if in_channels != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if pretrained:  # grayscale input: sum the RGB filters so pretrained features still apply
            with torch.no_grad():
                net.conv1.weight.copy_(old.weight.sum(dim=1, keepdim=True))
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return body, net.fc.in_features


DEFAULT_WIDTH = {"seed_cnn": 32, "resnet10": 64}


def build_model(architecture: str, in_channels: int = 1, num_classes: int = 2, width: int = 0,
                dropout: float = 0.0, pretrained: bool = False) -> Classifier:
    """``width`` (0 = the architecture's default) sets the first stage's channels of seed_cnn and
    resnet10; torchvision's resnet18/34 keep their widths so ImageNet weights fit."""
    width = width or DEFAULT_WIDTH.get(architecture, 64)
    if pretrained and architecture not in ("resnet18", "resnet34"):
        raise ValueError(f"no pretrained weights exist for {architecture}; use resnet18 or resnet34")
    if architecture == "seed_cnn":
        body, n = _seed_cnn(in_channels, width)
    elif architecture == "resnet10":
        body, n = _resnet10(in_channels, width)
    elif architecture in ("resnet18", "resnet34"):
        body, n = _torchvision_resnet(architecture, in_channels, pretrained)
    else:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    return Classifier(body, n, num_classes, dropout)
