"""Feature extractors shared by the few-shot models.

Every backbone maps a batch of [0,1] RGB images to the feature maps PFENet and BAM use
(:class:`BackboneFeatures`):

* ``low``: layer2 (BAM's Gram matrices);
* ``mid``: mid-level features, ``cat([layer3, layer2])`` in that order, the features that
  prototypes and the decoders work on;
* ``high``: high-level features (layer4), for the training-free prior and BAM's base learner.
  Given a foreground ``mask``, layer4 runs on ``layer3 * mask`` (the official support branch).

Backbones: torchvision's ResNet-50/18 (7x7 stem), the "deep stem" ResNet-50/101 of PSPNet,
PFENet and BAM (``resnet50_deepstem``: three 3x3 convs to 128 channels, every block of layer3
dilated 2 and of layer4 dilated 4, output stride 8, keys ``layer0..layer4`` as the official
modules), and a small CNN for CPU (random, or pretrained on the demo world: ``pretrained="demo"``).

ImageNet mean/std normalisation happens inside, so callers (and ONNX graphs) take [0,1] images.
A backbone loaded with pretrained weights is frozen (eval mode, no gradients) as in PFENet;
a randomly initialised one is trained with the rest of the model.
"""

from __future__ import annotations

import abc
import contextlib
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .weights import load_official_checkpoint

BACKBONES = ("resnet50", "resnet18", "resnet50_deepstem", "resnet101_deepstem", "small")
# The small backbone pretrained on the demo world's pretraining pool (`diffss pretrain-backbone`).
SMALL_DEMO_WEIGHTS = Path(__file__).parent / "pretrained" / "small_demo.safetensors"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneFeatures(NamedTuple):
    low: torch.Tensor  # layer2
    mid: torch.Tensor  # cat([layer3, layer2]) at layer2's size
    high: torch.Tensor | None  # layer4 (of layer3 * mask when a mask was given)


class Backbone(nn.Module, abc.ABC):
    """Base class: normalises the input, returns the feature maps of :class:`BackboneFeatures`.

    Attributes ``name``, ``low_channels``, ``mid_channels``, ``high_channels``, ``frozen``
    describe it; subclasses implement ``to_layer3`` and own a ``layer4`` module.
    """

    name: str
    low_channels: int
    mid_channels: int
    high_channels: int
    layer4: nn.Module
    # layer3 at half layer2's size (no dilation, ResNet-18): resized to it for ``mid``
    undilated_layer3: bool = False

    def __init__(self, frozen: bool = False):
        super().__init__()
        # Non-persistent: constants, kept out of state dicts (and so out of torchvision files).
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.frozen = False
        if frozen:
            self.freeze()

    def freeze(self) -> None:
        """Stop training the backbone: no gradients, BatchNorm statistics fixed (PFENet)."""
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # A frozen backbone stays in eval mode even when the surrounding model trains,
        # otherwise BatchNorm would keep updating its running statistics.
        return super().train(mode and not self.frozen)

    def forward(self, images: torch.Tensor, high: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[N,3,H,W] images in [0,1] -> (mid [N,mid_channels,h,w], high or None when ``high=False``)."""
        features = self.extract(images, high)
        return features.mid, features.high

    def extract(self, images: torch.Tensor, high: bool = True, mask: torch.Tensor | None = None) -> BackboneFeatures:
        """[N,3,H,W] images in [0,1] -> :class:`BackboneFeatures`.

        ``mask`` [N,1,H',W'] (foreground weights, any size): layer4 then runs on layer3 times the
        mask resized bilinearly (align_corners=True) to layer3's size, as PFENet and BAM encode
        supports.
        """
        x = (images - self.mean) / self.std
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            f2, f3 = self.to_layer3(x)
            f4 = None
            if high:
                if mask is not None:
                    mask = F.interpolate(mask.to(f3.dtype), size=f3.shape[-2:], mode="bilinear", align_corners=True)
                f4 = self.layer4(f3 if mask is None else f3 * mask)
            if self.undilated_layer3:
                f3 = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=True)
        return BackboneFeatures(f2, torch.cat([f3, f2], dim=1), f4)

    @abc.abstractmethod
    def to_layer3(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> (layer2, layer3) features; each backbone's own."""


class ResNetBackbone(Backbone):
    """torchvision ResNet (7x7 stem); mid = cat(layer3, layer2), high = layer4.

    ResNet-50 uses dilation in layer3/layer4 (output stride 8) as PFENet does. torchvision's
    BasicBlock (ResNet-18) has no dilation, so ResNet-18 keeps its strides: layer3 is resized to
    layer2's size before the concatenation, and ``high`` comes at stride 32 (PFENet's prior is
    resized to the mid-level size anyway).
    """

    def __init__(self, name: str, pretrained: str | os.PathLike | None = None, frozen: bool | None = None):
        import torchvision

        if name == "resnet50":
            weights = "IMAGENET1K_V1" if pretrained == "imagenet" else None
            net = _torchvision_resnet(torchvision.models.resnet50, weights, replace_stride_with_dilation=[False, True, True])
            low_channels, mid_channels, high_channels = 512, 512 + 1024, 2048
        elif name == "resnet18":
            weights = "IMAGENET1K_V1" if pretrained == "imagenet" else None
            net = _torchvision_resnet(torchvision.models.resnet18, weights)
            low_channels, mid_channels, high_channels = 128, 128 + 256, 512
        else:  # pragma: no cover - guarded by build_backbone
            raise ValueError(f"unknown ResNet backbone {name!r}")
        if pretrained is not None and pretrained != "imagenet":
            _load_state_dict_file(net, Path(pretrained))
        super().__init__(frozen=False)
        self.name = name
        self.undilated_layer3 = name != "resnet50"
        self.low_channels = low_channels
        self.mid_channels = mid_channels
        self.high_channels = high_channels
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if frozen is None:
            frozen = pretrained is not None
        if frozen:
            self.freeze()

    def to_layer3(self, x):
        f2 = self.layer2(self.layer1(self.stem(x)))
        return f2, self.layer3(f2)


def _torchvision_resnet(factory, weights, **kw):
    try:
        return factory(weights=weights, **kw)
    except Exception as exc:  # download failures come as URLError/OSError/RuntimeError
        if weights is None:
            raise
        raise RuntimeError(
            f"could not download torchvision {factory.__name__} {weights} weights ({exc}); "
            "pretrained='imagenet' needs network access: on an offline machine pass a path to a "
            "torchvision ResNet state_dict file instead"
        ) from exc


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone weights not found: {path}")
    return load_official_checkpoint(path)


def _load_state_dict_file(net: nn.Module, path: Path, expected: str = "a torchvision ResNet state_dict") -> None:
    """Load backbone weights from ``path`` (a classifier head ``fc.*`` is ignored); a file that does
    not fit is a ValueError naming it and saying what was ``expected``."""
    state = {k: v for k, v in _read_weights(path).items() if not k.startswith("fc.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{path} does not match the backbone's architecture: {exc}") from exc
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"{path} is not {expected} for this backbone: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


# The ImageNet file of the deep-stem ResNet (PSPNet's ``resnet50_v2.pth``) names the stem
# conv1/bn1 .. conv3/bn3; the segmentation models wrap it as ``layer0`` = Sequential(conv, bn,
# relu, conv, bn, relu, conv, bn, relu, maxpool).
_DEEP_STEM_KEYS = {"conv1": "layer0.0", "bn1": "layer0.1", "conv2": "layer0.3", "bn2": "layer0.4", "conv3": "layer0.6", "bn3": "layer0.7"}
DEEP_STEM_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class DeepStemResNet(Backbone):
    """PSPNet's deep-stem ResNet as PFENet and BAM use it; official key names ``layer0..layer4``.

    layer0 = three 3x3 convs (3->64 stride 2, 64->64, 64->128) with BN + ReLU, then a 3x3
    stride-2 max pool. Bottlenecks (torchvision's: stride on conv2) with every block of layer3
    dilated 2 and of layer4 dilated 4, all stride 1 (unlike torchvision's
    ``replace_stride_with_dilation``, whose first block of each stage keeps the previous
    dilation), so the output stride is 8.
    """

    def __init__(self, depth: int = 50, pretrained: str | os.PathLike | None = None, frozen: bool | None = None):
        from torchvision.models.resnet import Bottleneck

        if depth not in DEEP_STEM_DEPTHS:
            raise ValueError(f"deep-stem ResNet depth must be one of {sorted(DEEP_STEM_DEPTHS)}, got {depth}")
        if pretrained == "imagenet":
            raise ValueError(
                "the deep-stem ResNet has no torchvision download: pass the path of its ImageNet file "
                "(PSPNet/PFENet/BAM's initmodel/resnet50_v2.pth or resnet101_v2.pth)"
            )
        super().__init__(frozen=False)
        self.name = f"resnet{depth}_deepstem"
        self.low_channels, self.mid_channels, self.high_channels = 512, 512 + 1024, 2048

        def conv_bn_relu(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.layer0 = nn.Sequential(
            *conv_bn_relu(3, 64, 2), *conv_bn_relu(64, 64), *conv_bn_relu(64, 128), nn.MaxPool2d(3, stride=2, padding=1)
        )
        inplanes = 128

        def stage(planes, blocks, stride=1, dilation=1):
            nonlocal inplanes
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
            layers = [Bottleneck(inplanes, planes, stride, downsample, dilation=dilation)]
            inplanes = planes * 4
            layers += [Bottleneck(inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        blocks = DEEP_STEM_DEPTHS[depth]
        self.layer1 = stage(64, blocks[0])
        self.layer2 = stage(128, blocks[1], stride=2)
        self.layer3 = stage(256, blocks[2], dilation=2)
        self.layer4 = stage(512, blocks[3], dilation=4)
        if pretrained is not None:
            self.load_imagenet(Path(pretrained))
        if frozen is None:
            frozen = pretrained is not None
        if frozen:
            self.freeze()

    def load_imagenet(self, path: Path) -> None:
        """Load the official ImageNet file (stem as conv1/bn1..conv3/bn3, ``fc`` ignored) or a
        state dict already in ``layer0..layer4`` form; unknown or missing keys are listed."""
        state = {}
        for key, value in _read_weights(path).items():
            head, _, rest = key.partition(".")
            if head == "fc":
                continue
            state[f"{_DEEP_STEM_KEYS[head]}.{rest}" if head in _DEEP_STEM_KEYS else key] = value
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unknown = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unknown or wrong:
            raise ValueError(
                f"{path} is not a {self.name} ImageNet state dict: missing keys {missing}, unknown keys {unknown}, "
                f"keys with another shape {wrong}"
            )
        self.load_state_dict(state)

    def to_layer3(self, x):
        f2 = self.layer2(self.layer1(self.layer0(x)))
        return f2, self.layer3(f2)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallBackbone(Backbone):
    """A tiny CNN (output stride 8) for CPU demos and tests: random weights that train with the
    segmenter, or (``pretrained="demo"``) the weights shipped in the package, pretrained on the demo
    world's pool by ``diffss pretrain-backbone`` and frozen, as the demo uses it.

    Mirrors the ResNet layout: two stride-2 stages, then three stride-8 stages standing in for
    layer2/layer3 (mid = their concatenation) and layer4 (high); the last two are dilated to
    widen the receptive field without losing resolution, like the dilated ResNet.
    """

    def __init__(self, pretrained: str | os.PathLike | None = None, frozen: bool | None = None):
        super().__init__(frozen=False)
        self.name = "small"
        self.stem = nn.Sequential(_conv_bn_relu(3, 16, stride=2), _conv_bn_relu(16, 16))
        self.layer1 = nn.Sequential(_conv_bn_relu(16, 32, stride=2), _conv_bn_relu(32, 32))
        self.layer2 = nn.Sequential(_conv_bn_relu(32, 64, stride=2), _conv_bn_relu(64, 64))
        self.layer3 = nn.Sequential(_conv_bn_relu(64, 96, dilation=2), _conv_bn_relu(96, 96, dilation=2))
        self.layer4 = nn.Sequential(_conv_bn_relu(96, 128, dilation=4), _conv_bn_relu(128, 128))
        self.low_channels, self.mid_channels, self.high_channels = 64, 64 + 96, 128
        if pretrained == "imagenet":
            raise ValueError("backbone 'small' has no ImageNet weights; pretrained: 'demo' (the demo world's) "
                             "or a file of `diffss pretrain-backbone`")
        if pretrained is not None:
            _load_state_dict_file(self, SMALL_DEMO_WEIGHTS if pretrained == "demo" else Path(pretrained),
                                  "a small-backbone state dict (`diffss pretrain-backbone`)")
        if frozen if frozen is not None else pretrained is not None:
            self.freeze()

    def to_layer3(self, x):
        f2 = self.layer2(self.layer1(self.stem(x)))
        return f2, self.layer3(f2)


def build_backbone(name: str, pretrained: str | os.PathLike | None = None, frozen: bool | None = None) -> Backbone:
    """Build a backbone by name (see ``BACKBONES``).

    ``pretrained``: None (random init), ``"imagenet"`` (torchvision download, needs network;
    torchvision ResNets only) or a path to a state dict (``.pth``/``.pt``/``.tar``/``.safetensors``):
    torchvision's for ``resnet50``/``resnet18``, the official ``resnet50_v2.pth``-style file for
    the deep-stem ResNets; for ``small`` a file of :func:`diffss.models.pretraining.pretrain_small_backbone`
    or ``"demo"``, the shipped one pretrained on the demo world's pool. ``frozen`` defaults to
    "pretrained weights were given".
    """
    if name in ("resnet50", "resnet18"):
        return ResNetBackbone(name, pretrained=pretrained, frozen=frozen)
    if name in ("resnet50_deepstem", "resnet101_deepstem"):
        return DeepStemResNet(int(name[len("resnet"):-len("_deepstem")]), pretrained=pretrained, frozen=frozen)
    if name == "small":
        return SmallBackbone(pretrained=pretrained, frozen=frozen)
    raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
