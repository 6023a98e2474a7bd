"""Feature extractors shared by the few-shot models.

Every backbone maps a batch of [0,1] RGB images to two feature maps, as PFENet uses them:

* ``mid``: mid-level features (ResNet layer2 and layer3 concatenated), the features that
  prototypes and the decoder work on;
* ``high``: high-level features (ResNet layer4), used only for PFENet's training-free prior.

ImageNet mean/std normalisation happens inside, so callers (and ONNX graphs) take [0,1] images.
A backbone loaded with pretrained weights is frozen (eval mode, no gradients) as in PFENet;
a randomly initialised one is trained with the rest of the model.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BACKBONES = ("resnet50", "resnet18", "small")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module, abc.ABC):
    """Base class: normalises the input, returns ``(mid, high)`` feature maps.

    Attributes ``name``, ``mid_channels``, ``high_channels``, ``frozen`` describe it.
    """

    name: str
    mid_channels: int
    high_channels: int

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
        x = (images - self.mean) / self.std
        if self.frozen:
            with torch.no_grad():
                return self.features(x, high)
        return self.features(x, high)

    @abc.abstractmethod
    def features(self, x: torch.Tensor, high: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised images -> (mid-level, high-level or None) features; each backbone's own."""


class ResNetBackbone(Backbone):
    """torchvision ResNet; mid = cat(layer3, layer2), high = layer4.

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
            mid_channels, high_channels = 512 + 1024, 2048
        elif name == "resnet18":
            weights = "IMAGENET1K_V1" if pretrained == "imagenet" else None
            net = _torchvision_resnet(torchvision.models.resnet18, weights)
            mid_channels, high_channels = 128 + 256, 512
        else:  # pragma: no cover - guarded by build_backbone
            raise ValueError(f"unknown ResNet backbone {name!r}")
        if pretrained is not None and pretrained != "imagenet":
            _load_resnet_state_dict(net, Path(pretrained))
        super().__init__(frozen=False)
        self.name = name
        self.mid_channels = mid_channels
        self.high_channels = high_channels
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if frozen is None:
            frozen = pretrained is not None
        if frozen:
            self.freeze()

    def features(self, x, high):
        x = self.layer1(self.stem(x))
        f2 = self.layer2(x)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3) if high else None
        if self.name != "resnet50":
            f3 = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([f3, f2], dim=1), f4


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


def _load_resnet_state_dict(net: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read pretrained backbone weights {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{path} does not match the backbone's architecture: {exc}") from exc
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"{path} is not a torchvision ResNet state_dict for this backbone: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallBackbone(Backbone):
    """A tiny CNN (output stride 8) that trains from scratch on CPU for demos and tests.

    Mirrors the ResNet layout: two stride-2 stages, then three stride-8 stages standing in for
    layer2/layer3 (mid = their concatenation) and layer4 (high); the last two are dilated to
    widen the receptive field without losing resolution, like the dilated ResNet.
    """

    def __init__(self, frozen: bool = False):
        super().__init__(frozen=False)
        self.name = "small"
        self.stem = nn.Sequential(_conv_bn_relu(3, 16, stride=2), _conv_bn_relu(16, 16))
        self.layer1 = nn.Sequential(_conv_bn_relu(16, 32, stride=2), _conv_bn_relu(32, 32))
        self.layer2 = nn.Sequential(_conv_bn_relu(32, 64, stride=2), _conv_bn_relu(64, 64))
        self.layer3 = nn.Sequential(_conv_bn_relu(64, 96, dilation=2), _conv_bn_relu(96, 96, dilation=2))
        self.layer4 = nn.Sequential(_conv_bn_relu(96, 128, dilation=4), _conv_bn_relu(128, 128))
        self.mid_channels = 64 + 96
        self.high_channels = 128
        if frozen:
            self.freeze()

    def features(self, x, high):
        f2 = self.layer2(self.layer1(self.stem(x)))
        f3 = self.layer3(f2)
        return torch.cat([f3, f2], dim=1), (self.layer4(f3) if high else None)


def build_backbone(name: str, pretrained: str | os.PathLike | None = None, frozen: bool | None = None) -> Backbone:
    """Build a backbone by name (see ``BACKBONES``).

    ``pretrained``: None (random init), ``"imagenet"`` (torchvision download, needs network) or a
    path to a torchvision ResNet state_dict (``.pth``/``.pt``/``.safetensors``). ``frozen``
    defaults to "pretrained weights were given".
    """
    if name in ("resnet50", "resnet18"):
        return ResNetBackbone(name, pretrained=pretrained, frozen=frozen)
    if name == "small":
        if pretrained is not None:
            raise ValueError("backbone 'small' has no pretrained weights; use pretrained=None")
        return SmallBackbone(frozen=bool(frozen))
    raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
