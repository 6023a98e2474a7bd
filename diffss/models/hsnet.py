"""HSNet (Min, Kang and Cho, ICCV 2021, "Hypercorrelation Squeeze for Few-Shot Segmentation"),
written from the paper and checked number for number against the official code's outputs
(``../shared/reference/parity``, ``tests/test_hsnet.py``).

1. Features: every bottleneck of ResNet layer2..4 is tapped after its residual add, before its
   final ReLU (13 taps for ResNet-50, 30 for ResNet-101). The backbone is frozen.
2. Hypercorrelation: per tap, the cosine of every query pixel with every (masked) support pixel,
   negatives clamped to 0; taps of one layer are stacked as channels of a 4-D correlation
   [hq, wq, hs, ws].
3. Squeeze: centre-pivot 4-D convolutions (a 2-D conv over the query dims on the support dims
   subsampled by the stride, plus a strided 2-D conv over the support dims) + GroupNorm + ReLU
   shrink the support dims; coarser layers are resized (query dims) and added to finer ones.
4. Decoder: mean over the support dims, two 2-D conv blocks with a 2x upsample in between.

K shots: each shot is a 1-shot prediction; a pixel is foreground when its vote count reaches half
of the image's highest vote count (``vote_mask``), the official test rule.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import IMAGENET_MEAN, IMAGENET_STD, _load_state_dict_file, _torchvision_resnet
from .base import FewShotSegmenter, register_model, support_masks_at

# bottlenecks per ResNet stage (layer1..layer4)
RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
NORM_EPS = 1e-5  # added to each feature's L2 norm before the cosine (official value)
SQUEEZE_CHANNELS = (16, 64, 128)
# (kernel, support stride) of the three squeezing blocks, per layer
SQUEEZE_LAYERS = {
    "layer4": ((3, 2), (3, 2), (3, 2)),
    "layer3": ((5, 4), (3, 2), (3, 2)),
    "layer2": ((5, 4), (5, 4), (3, 2)),
}
LAYERS = ("layer2", "layer3", "layer4")


def bottleneck_taps(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Normalised images -> the pre-ReLU output of every bottleneck of ``net.layer2..4``.

    The blocks' own modules are run step by step, so the sum ``bn3(...) + identity`` can be
    read before the ReLU that ``Bottleneck.forward`` would apply to it.
    """
    x = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))
    taps = []
    for layer in LAYERS:
        for block in getattr(net, layer):
            identity = x if block.downsample is None else block.downsample(x)
            y = F.relu(block.bn1(block.conv1(x)))
            y = F.relu(block.bn2(block.conv2(y)))
            y = block.bn3(block.conv3(y)) + identity
            taps.append(y)
            x = F.relu(y)
    return taps


def unit_features(features: torch.Tensor) -> torch.Tensor:
    """Divide each pixel's feature vector (dim -3) by its L2 norm + ``NORM_EPS``."""
    return features / (features.norm(dim=-3, keepdim=True) + NORM_EPS)


def correlation(query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Unit query features [B,C,hq,wq] x unit support features [B,K,C,hs,ws] ->
    clamped cosines [B*K, hq, wq, hs, ws]."""
    q = query.flatten(2).transpose(1, 2).unsqueeze(1)  # [B,1,Nq,C]
    s = support.flatten(3)  # [B,K,C,Ns]
    corr = torch.matmul(q, s).clamp(min=0)  # [B,K,Nq,Ns]
    return corr.reshape((-1,) + query.shape[-2:] + support.shape[-2:])


def resize_query_dims(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[B,C,hq,wq,hs,ws] -> query dims bilinearly resized (align_corners=True) to ``size``."""
    b, c, hq, wq, hs, ws = x.shape
    y = x.permute(0, 4, 5, 1, 2, 3).reshape(-1, c, hq, wq)
    y = F.interpolate(y, size=size, mode="bilinear", align_corners=True)
    return y.reshape(b, hs, ws, c, y.shape[-2], y.shape[-1]).permute(0, 3, 4, 5, 1, 2)


class CenterPivotConv4d(nn.Module):
    """4-D convolution on [B,C,hq,wq,hs,ws] restricted to the kernel's two centre planes.

    ``conv1`` convolves the query dims at every ``stride``-th support position (the support
    dims subsampled from index 0), ``conv2`` convolves the support dims with ``stride`` at every
    query position; both keep the query dims. The output is their sum. Subsampling is a strided
    slice, computed at each call, so one module serves every input size (and exports to ONNX).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hq, wq, hs, ws = x.shape
        pruned = x[..., :: self.stride, :: self.stride] if self.stride > 1 else x
        ph, pw = pruned.shape[-2:]
        y1 = self.conv1(pruned.permute(0, 4, 5, 1, 2, 3).reshape(-1, c, hq, wq))
        y1 = y1.reshape(b, ph, pw, -1, hq, wq).permute(0, 3, 4, 5, 1, 2)
        y2 = self.conv2(x.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, hs, ws))
        y2 = y2.reshape(b, hq, wq, -1, y2.shape[-2], y2.shape[-1]).permute(0, 3, 1, 2, 4, 5)
        return y1 + y2


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` minus ``F.group_norm``'s Python-side batch-size check, which reads a
    tensor as a bool while tracing (a TracerWarning in every ONNX export); the same op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _squeeze_block(in_channels: int, channels: Sequence[int], layers: Sequence[tuple[int, int]]) -> nn.Sequential:
    modules: list[nn.Module] = []
    for out_channels, (kernel, stride) in zip(channels, layers):
        modules += [CenterPivotConv4d(in_channels, out_channels, kernel, stride), GroupNorm(4, out_channels), nn.ReLU(inplace=True)]
        in_channels = out_channels
    return nn.Sequential(*modules)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class HypercorrelationLearner(nn.Module):
    """Squeezes the three layers' 4-D correlations, mixes them coarse to fine and decodes 2-class
    logits at twice the layer2 resolution. Module names follow the official state dict."""

    def __init__(self, taps_per_layer: Mapping[str, int]):
        super().__init__()
        c1, c2, c3 = SQUEEZE_CHANNELS
        for layer in ("layer4", "layer3", "layer2"):
            setattr(self, f"encoder_{layer}", _squeeze_block(taps_per_layer[layer], SQUEEZE_CHANNELS, SQUEEZE_LAYERS[layer]))
        self.encoder_layer4to3 = _squeeze_block(c3, (c3,) * 3, ((3, 1),) * 3)
        self.encoder_layer3to2 = _squeeze_block(c3, (c3,) * 3, ((3, 1),) * 3)
        self.decoder1 = nn.Sequential(_conv3x3(c3, c3), nn.ReLU(), _conv3x3(c3, c2), nn.ReLU())
        self.decoder2 = nn.Sequential(_conv3x3(c2, c2), nn.ReLU(), _conv3x3(c2, 2))

    def forward(self, corr: Mapping[str, torch.Tensor], record: dict | None = None) -> torch.Tensor:
        sqz = {layer: getattr(self, f"encoder_{layer}")(corr[layer]) for layer in ("layer4", "layer3", "layer2")}
        mix43 = self.encoder_layer4to3(resize_query_dims(sqz["layer4"], sqz["layer3"].shape[2:4]) + sqz["layer3"])
        mix432 = self.encoder_layer3to2(resize_query_dims(mix43, sqz["layer2"].shape[2:4]) + sqz["layer2"])
        x = self.decoder1(mix432.flatten(4).mean(dim=-1))
        if record is not None:
            record.update({f"hpn_learner.encoder_{k}": v for k, v in sqz.items()})
            record.update({"hpn_learner.encoder_layer4to3": mix43, "hpn_learner.encoder_layer3to2": mix432, "hpn_learner.decoder1": x})
        # 2x with align_corners=True samples exactly like the official size (2h, 2w)
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        return self.decoder2(x)


def count_votes(shot_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-shot 0/1 masks [B,K,H,W] -> (votes [B,H,W] int64, the image's highest count, at least 1, [B,1,1])."""
    votes = shot_masks.sum(dim=1)
    return votes, votes.flatten(1).max(dim=1).values.clamp(min=1).view(-1, 1, 1)


def vote_mask(shot_masks: torch.Tensor) -> torch.Tensor:
    """Per-shot 0/1 masks [B,K,H,W] -> vote mask [B,H,W] (0/1 float): foreground where the votes
    reach half of the image's highest count, the official K-shot rule (relative to that
    maximum, not to K)."""
    votes, highest = count_votes(shot_masks)
    return (votes.float() / highest >= 0.5).float()


@register_model("hsnet")
class HSNet(FewShotSegmenter):
    """HSNet on a frozen torchvision ResNet-50/101 (only ``hpn_learner`` trains).

    ``forward`` returns [B,2,H,W] at the query's size: for K=1 the logits; for K>1 the vote as
    scores ``[1/2 - 1/(4m), votes/m]`` (m = the image's highest vote count, at least 1), whose
    argmax is the official vote mask (fg where votes/m >= 1/2) and whose fg channel is the vote
    fraction. ``forward_train`` returns each shot's 1-shot logits ([B,K,2,H,W] when K>1), each
    scored against the query mask by ``segmentation_loss``, as HSNet trains 1-shot episodes.

    Support cache: ``encode_support`` returns the masked, L2-normalised bottleneck taps of the
    supports, one tensor per layer ``[B,K,taps,C,h,w]`` (``support_layer2..4``); it is exact, the
    correlation with a query starts from them. The correlation itself needs the query, so
    ``decode_query`` still runs the query backbone and the whole 4-D learner per query.
    """

    support_feature_axes = {
        f"support_{layer}": {0: "batch", 1: "shots", 4: f"{layer}_h", 5: f"{layer}_w"} for layer in LAYERS
    }
    backbones = tuple(RESNET_BLOCKS)
    train_optimizer = "adam"  # HSNet: Adam at a constant rate (its recipe: lr 1e-3, weight decay 0; TrainConfig.weight_decay decides)

    def __init__(self, backbone: str = "resnet50", pretrained: str | os.PathLike | None = None):
        super().__init__()
        import torchvision

        if backbone not in RESNET_BLOCKS:
            raise ValueError(f"hsnet backbone must be one of {', '.join(RESNET_BLOCKS)}, got {backbone!r}")
        factory = getattr(torchvision.models, backbone)
        net = _torchvision_resnet(factory, "IMAGENET1K_V1" if pretrained == "imagenet" else None)
        net.fc = nn.Identity()  # unused; official checkpoints carry it (dropped by from_official)
        if pretrained is not None and pretrained != "imagenet":
            _load_state_dict_file(net, Path(pretrained))
        self.backbone = net
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        blocks = RESNET_BLOCKS[backbone]
        self.taps_per_layer = dict(zip(LAYERS, blocks[1:]))
        self.hpn_learner = HypercorrelationLearner(self.taps_per_layer)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._config = {"backbone": backbone, "pretrained": None if pretrained is None else str(pretrained)}
        self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen BatchNorm statistics, as HSNet trains
        return self

    # -- features ------------------------------------------------------------------------------
    def _layer_taps(self, normalised: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        with torch.no_grad():
            taps = bottleneck_taps(self.backbone, normalised)
        out, start = {}, 0
        for layer in LAYERS:
            n = self.taps_per_layer[layer]
            out[layer], start = taps[start : start + n], start + n
        return out

    def _encode(self, normalised: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normalised supports [B,K,3,H,W], masks [B,K,H,W] -> per layer [B,K,taps,C,h,w]."""
        taps = self._layer_taps(normalised.flatten(0, 1))
        features = []
        for layer in LAYERS:
            fg = support_masks_at(masks, taps[layer][0])  # bilinear, align_corners=True
            stacked = torch.stack([t * fg for t in taps[layer]], dim=1)  # [B*K,taps,C,h,w]
            features.append(unit_features(stacked).reshape(masks.shape[:2] + stacked.shape[1:]))
        return tuple(features)

    def _shot_logits(self, normalised_query: torch.Tensor, support: Sequence[torch.Tensor], record: dict | None = None) -> torch.Tensor:
        """Normalised query [B,3,H,W] + ``_encode`` output -> low-res logits [B,K,2,h,w]."""
        taps = self._layer_taps(normalised_query)
        corr = {}
        with torch.no_grad():
            for layer, feats in zip(LAYERS, support):
                q = [unit_features(t) for t in taps[layer]]
                corr[layer] = torch.stack([correlation(t, feats[:, :, i]) for i, t in enumerate(q)], dim=1)
        if record is not None:
            record.update({f"corr_{layer[0]}{layer[-1]}": corr[layer] for layer in LAYERS})
            record["query_taps"] = [t for layer in LAYERS for t in taps[layer]]
        logits = self.hpn_learner(corr, record)
        return logits.reshape(support[0].shape[:2] + logits.shape[1:])

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def _upsampled_shot_logits(self, query, support_features) -> torch.Tensor:
        """[B,K,2,H,W]: every shot's logits at the query's size."""
        low = self._shot_logits(self._normalise(query), support_features)
        up = F.interpolate(low.flatten(0, 1), size=query.shape[-2:], mode="bilinear", align_corners=True)
        return up.reshape(low.shape[:3] + up.shape[-2:])

    # -- contract ------------------------------------------------------------------------------
    def encode_support(self, support_images, support_masks):
        self.check_inputs(None, support_images, support_masks)
        return self._encode(self._normalise(support_images.flatten(0, 1)).reshape(support_images.shape), support_masks)

    def decode_query(self, query, support_layer2, support_layer3, support_layer4):
        shot_logits = self._upsampled_shot_logits(query, (support_layer2, support_layer3, support_layer4))
        shot_masks = shot_logits.argmax(dim=2)
        votes, highest = count_votes(shot_masks)
        fraction = votes.float() / highest
        # votes/m is a multiple of 1/m: it is >= 1/2 exactly when it exceeds 1/2 - 1/(4m)
        vote_scores = torch.stack([(0.5 - 0.25 / highest).expand_as(fraction), fraction], dim=1)
        # K from a tensor, not a Python int, so an exported graph picks the branch per call
        one_shot = torch.ones_like(shot_masks[:, :, :1, :1]).sum(dim=1, keepdim=True) == 1  # [B,1,1,1]
        return torch.where(one_shot, shot_logits[:, 0], vote_scores)

    def forward_train(self, query, support_images, support_masks):
        """(1-shot logits [B,2,H,W], or per-shot [B,K,2,H,W] when K>1; no auxiliary logits)."""
        self.check_inputs(query, support_images, support_masks)
        logits = self._upsampled_shot_logits(query, self.encode_support(support_images, support_masks))
        return (logits[:, 0] if logits.shape[1] == 1 else logits), []

    def predict_masks(self, query, support_images, support_masks, sizes=None):
        """As the official test: each shot's low-res logits resized (bilinear, align_corners=True)
        straight to the scoring size, argmax, then the vote."""
        self.check_inputs(query, support_images, support_masks)
        low = self._shot_logits(self._normalise(query), self.encode_support(support_images, support_masks))
        targets = [tuple(query.shape[-2:])] * len(query) if sizes is None else [tuple(int(v) for v in s) for s in sizes]
        masks = []
        for logits, size in zip(low, targets):
            shots = F.interpolate(logits, size=size, mode="bilinear", align_corners=True).argmax(dim=1)
            masks.append(vote_mask(shots[None])[0].long() if len(shots) > 1 else shots[0])
        return torch.stack(masks) if sizes is None else masks

    # -- official checkpoints ------------------------------------------------------------------
    @classmethod
    def from_official(cls, state_dict: Mapping[str, torch.Tensor], **config) -> "HSNet":
        """An official HSNet state dict (``model.state_dict()`` of its DataParallel model, keys
        with or without ``module.``) -> HSNet in eval mode. ``backbone`` is read from the keys
        unless given. The unused ``backbone.fc.*`` is dropped; any other unknown or missing key
        is a ValueError that lists them."""
        state = {k.removeprefix("module."): v for k, v in state_dict.items()}
        backbone = config.pop("backbone", None) or ("resnet101" if "backbone.layer3.22.conv1.weight" in state else "resnet50")
        if config:
            raise ValueError(f"hsnet from_official: unknown config {sorted(config)}; only 'backbone' is accepted")
        model = cls(backbone=backbone)
        state = {k: v for k, v in state.items() if not k.startswith("backbone.fc.")}
        expected = model.state_dict()
        unknown = sorted(set(state) - set(expected))
        missing = sorted(set(expected) - set(state))
        if unknown or missing:
            raise ValueError(f"not an official HSNet {backbone} state dict: unknown keys {unknown}, missing keys {missing}")
        wrong = sorted(k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape))
        if wrong:
            raise ValueError("official HSNet state dict has wrong shapes: " + ", ".join(
                f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})" for k in wrong))
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
        return model.eval()

    @classmethod
    def official_parity(cls, state_dict, case: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
        """Run the official test call (``predict_mask_nshot``) on a fixture case's ``input.*``
        (officially normalised images): each shot's 1-shot logits upsampled to the image size,
        then argmax (K=1) or the vote (K>1). Returns ``output.*`` and ``inter.*`` tensors."""
        model = cls.from_official(state_dict)
        query, supports, masks = case["input.query_img"], case["input.support_imgs"], case["input.support_masks"]
        record: dict = {}
        with torch.no_grad():
            support = model._encode(supports, masks)
            low = model._shot_logits(query, support, record)
        shots = low.shape[1]
        up = F.interpolate(low.flatten(0, 1), size=supports.shape[-2:], mode="bilinear", align_corners=True)
        logit_mask = up.reshape(low.shape[:3] + up.shape[-2:])
        argmax = logit_mask.argmax(dim=2)
        out = {"output.logit_mask": logit_mask, "inter.logit_mask_lowres": low}
        if shots == 1:
            out["output.pred_mask"] = argmax[:, 0]
        else:
            votes, highest = count_votes(argmax)
            out.update({"output.pred_mask": vote_mask(argmax), "output.vote_sum": votes, "inter.max_vote": highest})
        # the recorded intermediates are of shot 0 (the first of the B*K pairs)
        for key, value in record.items():
            if key == "query_taps":
                out.update({f"inter.shot0.query_feats.{i:02d}": t[:1] for i, t in enumerate(value)})
            else:
                out[f"inter.shot0.{key}"] = value[:1]
        taps = model._layer_taps(supports[:, 0])
        flat = [t for layer in LAYERS for t in taps[layer]]
        out.update({f"inter.shot0.support_feats_masked.{i:02d}": t * support_masks_at(masks[:, :1], t) for i, t in enumerate(flat)})
        return out
