import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffss.models import (
    BACKBONES,
    MODEL_REGISTRY,
    FewShotSegmenter,
    QueryDecoder,
    SupportEncoder,
    build_model,
    load_model,
    segmentation_loss,
)
from diffss.models.base import adaptive_avg_pool2d
from diffss.models.pfenet import prior_mask

MODELS = ("prototype", "pfenet", "bam")
AUX_OUTPUTS = {"prototype": 0, "pfenet": 4, "bam": 1}  # PFENet: one per FEM bin; BAM: the meta learner


def build(name, shots=1, **kwargs):
    """A small-backbone model; BAM's K-shot reweighting fixes K, so it is built for ``shots``."""
    if name == "bam":
        kwargs["shot"] = shots
    return build_model(name, backbone="small", **kwargs)


def random_episode(batch=2, shots=1, size=64, support_size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs, ws = support_size or (size, size)
    query = torch.rand(batch, 3, size, size, generator=g)
    support = torch.rand(batch, shots, 3, hs, ws, generator=g)
    masks = (torch.rand(batch, shots, hs, ws, generator=g) > 0.5).long()
    return query, support, masks


def square_episode(size=64, shots=1):
    """A red square on dark noise; the support shows it elsewhere. Learnable in a few steps."""
    g = torch.Generator().manual_seed(1)

    def image_and_mask(x0, y0, side):
        image = torch.rand(3, size, size, generator=g) * 0.3
        mask = torch.zeros(size, size, dtype=torch.long)
        mask[y0 : y0 + side, x0 : x0 + side] = 1
        image[0][mask == 1] = 0.9
        image[1][mask == 1] = 0.2
        return image, mask

    query, query_mask = image_and_mask(10, 20, 24)
    supports = [image_and_mask(30, 5 + 3 * k, 20) for k in range(shots)]
    support = torch.stack([s[0] for s in supports])[None]
    masks = torch.stack([s[1] for s in supports])[None]
    return query[None], support, masks, query_mask[None]


@pytest.mark.parametrize("shots", [1, 2, 5])
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_small(name, shots):
    torch.manual_seed(0)
    model = build(name, shots).train()
    query, support, masks = random_episode(batch=2, shots=shots, size=64)
    target = (torch.rand(2, 64, 64) > 0.5).long()
    logits, aux = model.forward_train(query, support, masks)
    assert logits.shape == (2, 2, 64, 64)
    assert len(aux) == AUX_OUTPUTS[name]
    assert all(a.shape == (2, 2, 64, 64) for a in aux)
    segmentation_loss(logits, target, aux).backward()
    first_conv = model.backbone.stem[0][0].weight
    if name == "bam":  # BAM trains its meta learner only: backbone and base learner stay frozen
        assert not first_conv.requires_grad and first_conv.grad is None
        assert all(p.grad is None for p in model.learner_base.parameters()) and not model.learner_base.training
        assert model.down_query[0].weight.grad.abs().sum() > 0 and model.init_merge[0].weight.grad.abs().sum() > 0
        if shots > 1:
            assert model.kshot_rw[2].bias.grad.abs().sum() > 0  # the reweighting learns
    else:  # random-init backbones are trained: gradients reach the first conv
        assert first_conv.requires_grad and first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert model(query, support, masks).shape == (2, 2, 64, 64)


def test_resnet18_and_pretrained_state_dict_freezes_backbone(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    weights = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), weights)
    model = build_model("pfenet", backbone="resnet18", pretrained=str(weights)).train()
    assert model.config["frozen_backbone"] is True and model.config["pretrained"] == str(weights)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not model.backbone.training and model.down_query.training  # frozen BN stays in eval

    query, support, masks = random_episode(batch=1, shots=2, size=64)
    logits, aux = model.forward_train(query, support, masks)
    assert logits.shape == (1, 2, 64, 64) and len(aux) == 4
    segmentation_loss(logits, (torch.rand(1, 64, 64) > 0.5).long(), aux).backward()
    assert model.down_query[0].weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model("pfenet", backbone="resnet18", pretrained=tmp_path / "missing.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth"):
        build_model("prototype", backbone="resnet18", pretrained=tmp_path / "wrong.pth")


@pytest.mark.parametrize("name", MODELS)
def test_encode_decode_equals_forward_for_any_shots(name):
    for shots in (1, 3):
        torch.manual_seed(0)
        model = build(name, shots).eval()
        query, support, masks = random_episode(batch=2, shots=shots, size=72, support_size=(64, 80))
        with torch.no_grad():
            full = model(query, support, masks)
            features = model.encode_support(support, masks)
            split = model.decode_query(query, *features)
        assert full.shape == (2, 2, 72, 72)
        assert torch.allclose(full, split, atol=1e-6)
        assert len(features) == len(type(model).support_feature_axes)


@pytest.mark.parametrize("name", MODELS)
def test_ignore_in_support_masks_is_background(name):
    torch.manual_seed(0)
    model = build(name, 2).eval()
    query, support, masks = random_episode(batch=1, shots=2, size=64)
    ignored = masks.clone()
    ignored[masks == 0] = 255
    ignored[:, :, :8] = 255
    zeroed = ignored.clone()
    zeroed[ignored == 255] = 0
    with torch.no_grad():
        assert torch.equal(model(query, support, ignored), model(query, support, zeroed))
        # and the masks do matter: 255 must not be read as foreground
        assert not torch.allclose(model(query, support, ignored), model(query, support, torch.ones_like(masks)))


def test_prior_mask_values():
    # one query row of 3 pixels; one support pixel equal to the first query pixel
    query = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]).view(1, 2, 1, 3)
    support = F.normalize(torch.tensor([1.0, 0.0]), dim=0).view(1, 1, 2, 1, 1)
    prior = prior_mask(query, support)
    assert prior.shape == (1, 1, 1, 3)
    assert torch.allclose(prior.flatten(), torch.tensor([1.0, 0.0, 2**-0.5]), atol=1e-5)
    # K shots: mean of the per-shot (normalised) priors
    other = F.normalize(torch.tensor([0.0, 1.0]), dim=0).view(1, 1, 2, 1, 1)
    two = prior_mask(query, torch.cat([support, other], dim=1))
    assert torch.allclose(two.flatten(), torch.tensor([0.5, 0.5, 2**-0.5]), atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_save_and_load_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = build(name, 3, hidden_dim=24)
    # move BatchNorm statistics away from their init so buffers must round-trip too
    model.train()
    model(*random_episode(batch=2, shots=3))
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "ckpt")
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    episode = random_episode(batch=1, shots=3, seed=5)
    with torch.no_grad():
        assert torch.equal(model(*episode), loaded(*episode))
    assert type(FewShotSegmenter.from_pretrained(tmp_path / "ckpt")) is type(model)
    other = "pfenet" if name != "pfenet" else "prototype"
    with pytest.raises(ValueError, match="not a"):
        MODEL_REGISTRY[other].from_pretrained(tmp_path / "ckpt")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    ckpt = tmp_path / "ckpt"
    build_model("prototype", backbone="small").save_pretrained(ckpt)
    config = json.loads((ckpt / "config.json").read_text())

    (ckpt / "config.json").write_text(json.dumps({**config, "model": "unet"}))
    with pytest.raises(ValueError, match="'model'.*unet"):
        load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**config, "hidden_dim": 8}))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(ckpt)  # weights of a hidden_dim=64 model do not fit
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(ckpt)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("unet", backbone="small")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("pfenet", backbone="vgg")
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model("pfenet", backbone="small", pretrained="imagenet")
    assert set(BACKBONES) == {"resnet50", "resnet18", "resnet50_deepstem", "resnet101_deepstem", "small"}
    model = build_model("pfenet", backbone="small").eval()
    query, support, masks = random_episode(batch=2, shots=2)
    with pytest.raises(ValueError, match="support_masks"):
        model(query, support, masks[:, :1])
    with pytest.raises(ValueError, match="batch size"):
        model(query[:1], support, masks)
    with pytest.raises(ValueError, match="support_images"):
        model(query, support[:, 0], masks)
    with pytest.raises(ValueError, match="too small"):
        model(torch.rand(2, 3, 32, 32), support, masks)
    with pytest.raises(ValueError, match="bins"):
        build_model("pfenet", backbone="small", bins=[60, 2.5])


def export_onnx(model, episode, directory):
    names = list(type(model).support_feature_axes)
    axes = type(model).support_feature_axes
    query, support, masks = episode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation/tracer warnings
        torch.onnx.export(
            SupportEncoder(model),
            (support, masks),
            str(directory / "support.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=["support_images", "support_masks"],
            output_names=names,
            dynamic_axes={
                "support_images": {0: "batch", 1: "shots", 3: "height", 4: "width"},
                "support_masks": {0: "batch", 1: "shots", 2: "height", 3: "width"},
                **axes,
            },
        )
        torch.onnx.export(
            QueryDecoder(model),
            (query, *model.encode_support(support, masks)),
            str(directory / "query.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=["query", *names],
            output_names=["logits"],
            dynamic_axes={"query": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}, **axes},
        )
    return names


@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_parity_dynamic_shapes(name, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build(name, 2)
    # a few training steps so the output is not the near-constant of a fresh init
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    query, support, masks, query_mask = square_episode(shots=2)
    for _ in range(3):
        logits, aux = model.forward_train(query, support, masks)
        optimizer.zero_grad()
        segmentation_loss(logits, query_mask, aux).backward()
        optimizer.step()
    model.eval()
    names = export_onnx(model, random_episode(batch=2, shots=2, size=64), tmp_path)
    assert model.training is False  # exporting must not flip the model back to training
    providers = ["CPUExecutionProvider"]
    encoder = ort.InferenceSession(str(tmp_path / "support.onnx"), providers=providers)
    decoder = ort.InferenceSession(str(tmp_path / "query.onnx"), providers=providers)
    # other batch, shots, sizes (not multiples of the stride) and query != support size
    for batch, shots, size, support_size in [(1, 5, 72, (80, 104)), (3, 1, 104, (88, 72))]:
        shots = model.shot_count or shots
        q, s, m = random_episode(batch=batch, shots=shots, size=size, support_size=support_size, seed=batch)
        m[:, :, :5] = 255
        with torch.no_grad():
            expected_features = model.encode_support(s, m)
            expected = model.decode_query(q, *expected_features)
        features = encoder.run(None, {"support_images": s.numpy(), "support_masks": m.numpy()})
        for got, want in zip(features, expected_features):
            assert got.shape == tuple(want.shape)
            assert np.abs(got - want.numpy()).max() < 1e-4
        logits = decoder.run(None, {"query": q.numpy(), **dict(zip(names, features))})[0]
        assert logits.shape == (batch, 2, size, size)
        assert expected.std() > 1e-3
        assert np.abs(logits - expected.numpy()).max() < 1e-4


def test_pfenet_small_overfits_one_episode():
    torch.manual_seed(0)
    model = build_model("pfenet", backbone="small")
    query, support, masks, query_mask = square_episode()

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(query, support, masks), query_mask).item()

    before = eval_loss()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        logits, aux = model.forward_train(query, support, masks)
        loss = segmentation_loss(logits, query_mask, aux)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert eval_loss() < 0.5 * before


# -- HSNet (torchvision ResNet-50 at tiny sizes; the backbone is frozen) ------------------------
@pytest.fixture(scope="module")
def hsnet():
    torch.manual_seed(0)
    return build_model("hsnet", backbone="resnet50").eval()


def test_hsnet_trains_only_the_learner(hsnet):
    model = hsnet.train()
    try:
        assert not model.backbone.training and model.hpn_learner.training  # frozen BatchNorm
        assert not any(p.requires_grad for p in model.backbone.parameters())
        query, support, masks = random_episode(batch=2, shots=1, size=64)
        logits, aux = model.forward_train(query, support, masks)
        assert logits.shape == (2, 2, 64, 64) and aux == []
        target = (torch.rand(2, 64, 64) > 0.5).long()
        segmentation_loss(logits, target).backward()
        assert model.hpn_learner.decoder2[2].weight.grad.abs().sum() > 0
        # K > 1: every shot's 1-shot logits, each scored against the query mask
        query, support, masks = random_episode(batch=2, shots=3, size=64)
        per_shot, _ = model.forward_train(query, support, masks)
        assert per_shot.shape == (2, 3, 2, 64, 64)
        mean_ce = torch.stack([F.cross_entropy(per_shot[:, k], target) for k in range(3)]).mean()
        assert torch.allclose(segmentation_loss(per_shot, target), mean_ce)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_hsnet_vote_and_split_match_forward(hsnet):
    query, support, masks = random_episode(batch=2, shots=3, size=72, support_size=(64, 80), seed=3)
    with torch.no_grad():
        full = hsnet(query, support, masks)
        split = hsnet.decode_query(query, *hsnet.encode_support(support, masks))
        one_shot = [hsnet(query, support[:, k : k + 1], masks[:, k : k + 1]) for k in range(3)]
    assert full.shape == (2, 2, 72, 72) and torch.equal(full, split)
    assert [f.shape for f in hsnet.encode_support(support, masks)] == [
        (2, 3, 4, 512, 8, 10), (2, 3, 6, 1024, 4, 5), (2, 3, 3, 2048, 2, 3)]
    # K > 1: the argmax is the official vote over the shots' own 1-shot predictions
    votes = torch.stack([o.argmax(1) for o in one_shot], dim=1).sum(1)
    highest = votes.flatten(1).max(1).values.clamp(min=1).view(-1, 1, 1)
    expected = (votes.float() / highest >= 0.5).long()
    assert torch.equal(full.argmax(1), expected) and 0 < expected.float().mean() < 1
    assert torch.allclose(full[:, 1], votes.float() / highest)  # the fg score is the vote fraction
    assert torch.equal(hsnet.predict_masks(query, support, masks), expected)


def test_hsnet_one_instance_serves_any_size(hsnet):
    """The official 4-D conv caches its support-dim indices at the first size it sees; ours
    does not: a model used at 96 px after 64 px gives what a fresh model gives at 96 px."""
    big = random_episode(batch=1, shots=1, size=96, seed=5)
    with torch.no_grad():
        hsnet(*random_episode(batch=1, shots=1, size=64))
        after_small = hsnet(*big)
    torch.manual_seed(0)
    fresh = build_model("hsnet", backbone="resnet50").eval()
    with torch.no_grad():
        assert torch.equal(fresh(*big), after_small)


def test_hsnet_save_load_ignore_and_sizes(hsnet, tmp_path):
    query, support, masks = random_episode(batch=1, shots=1, size=64, seed=2)
    ignored = masks.clone()
    ignored[masks == 0] = 255
    reloaded = load_model(hsnet.save_pretrained(tmp_path / "hsnet"))
    assert reloaded.config == hsnet.config == {"model": "hsnet", "backbone": "resnet50", "pretrained": None}
    with torch.no_grad():
        logits = hsnet(query, support, masks)
        assert torch.equal(reloaded(query, support, masks), logits)
        assert torch.equal(hsnet(query, support, ignored), logits)  # 255 counts as background
        sized = hsnet.predict_masks(query, support, masks, sizes=[(50, 90)])
    assert sized[0].shape == (50, 90) and set(sized[0].unique().tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="resnet50, resnet101"):
        build_model("hsnet", backbone="small")


def test_hsnet_resnet101_and_pretrained_backbone(tmp_path):
    import torchvision

    reference = torchvision.models.resnet50(weights=None)
    weights = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), weights)
    model = build_model("hsnet", backbone="resnet50", pretrained=str(weights))
    assert torch.equal(model.backbone.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    assert model.config["pretrained"] == str(weights)
    deep = build_model("hsnet", backbone="resnet101")
    assert deep.taps_per_layer == {"layer2": 4, "layer3": 23, "layer4": 3}
    assert deep.hpn_learner.encoder_layer3[0].conv1.in_channels == 23
# -- official-compatible building blocks --------------------------------------------------------
@pytest.mark.parametrize("in_size,out_size", [((17, 17), (60, 60)), ((17, 17), (8, 8)), ((13, 9), (15, 4)), ((5, 7), (1, 1)), ((12, 12), (12, 12))])
def test_adaptive_pooling_as_matrices_equals_torch(in_size, out_size):
    """PFENet pools 17x17 features to 60 and 30 (up) and 15, 8 (down); the matrix form must
    reproduce PyTorch's floor/ceil windows in both directions."""
    x = torch.randn(2, 3, *in_size, generator=torch.Generator().manual_seed(0))
    expected = F.adaptive_avg_pool2d(x, out_size)
    got = adaptive_avg_pool2d(x, out_size)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-6)


def test_deep_stem_resnet_layout_and_imagenet_file(tmp_path):
    from diffss.models.backbone import build_backbone

    net = build_backbone("resnet50_deepstem").eval()
    keys = net.state_dict().keys()
    assert {k.rsplit(".", 1)[0] for k in keys if k.startswith("layer0.")} == {f"layer0.{i}" for i in (0, 1, 3, 4, 6, 7)}
    assert net.layer0[6].out_channels == 128 and net.layer1[0].conv1.in_channels == 128
    # every block of layer3/layer4 dilated (2 / 4), stride 1, the stride of layer2 on conv2
    assert all(b.conv2.dilation == (2, 2) and b.conv2.stride == (1, 1) for b in net.layer3)
    assert all(b.conv2.dilation == (4, 4) and b.conv2.stride == (1, 1) for b in net.layer4)
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)
    with torch.no_grad():
        features = net.extract(torch.rand(1, 3, 65, 65))
    assert features.low.shape == (1, 512, 9, 9) and features.mid.shape == (1, 1536, 9, 9)  # output stride 8
    assert features.high.shape == (1, 2048, 9, 9)
    assert len(build_backbone("resnet101_deepstem").layer3) == 23

    # the official ImageNet file names the stem conv1/bn1..conv3/bn3 and carries fc
    rename = {"layer0.0": "conv1", "layer0.1": "bn1", "layer0.3": "conv2", "layer0.4": "bn2", "layer0.6": "conv3", "layer0.7": "bn3"}
    state = {}
    for key, value in net.state_dict().items():
        prefix, _, rest = key.rpartition(".")
        state[f"{rename.get(prefix, prefix)}.{rest}"] = torch.randn_like(value.float()).to(value.dtype)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path / "resnet50_v2.pth"
    torch.save(state, path)
    loaded = build_backbone("resnet50_deepstem", pretrained=str(path))
    assert loaded.frozen and torch.equal(loaded.layer0[3].weight, state["conv2.weight"])
    assert torch.equal(loaded.layer3[5].bn3.running_var, state["layer3.5.bn3.running_var"])
    del state["layer4.2.conv3.weight"]
    state["head.weight"] = torch.zeros(1)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    with pytest.raises(ValueError, match=r"resnet50_v2.pth.*missing keys \['layer4.2.conv3.weight'\].*unknown keys \['head.weight'\]"):
        build_backbone("resnet50_deepstem", pretrained=str(path))


def _official_state(model):
    """diffss state dict -> the official key names (backbone.layerN -> layerN)."""
    return {k.removeprefix("backbone."): v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["pfenet", "bam"])
def test_from_official_loads_official_keys_and_lists_bad_ones(name):
    torch.manual_seed(0)
    config = {"shot": 2, "fold": 0} if name == "bam" else {}
    reference = MODEL_REGISTRY[name].from_official(_official_state(build_model(name, backbone="resnet50_deepstem", **({"shot": 2} if name == "bam" else {}))), **config)
    official = {f"module.{k}": v for k, v in _official_state(reference).items()}  # as DataParallel saves
    model = MODEL_REGISTRY[name].from_official(official, **config)
    assert model.config["backbone"] == "resnet50_deepstem" and not model.training
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    if name == "pfenet":
        assert model.bins == (60, 30, 15, 8)
    else:
        assert model.shot == 2 and model.base_class_ids == list(range(6, 21))
    bad = dict(official)
    bad["module.extra.weight"] = torch.zeros(1)
    del bad["module.layer2.1.bn2.running_mean"]
    with pytest.raises(ValueError, match=r"unknown keys \['extra.weight'\].*missing keys \['backbone.layer2.1.bn2.running_mean'\]"):
        MODEL_REGISTRY[name].from_official(bad, **config)


# -- BAM ----------------------------------------------------------------------------------------
def test_bam_refuses_another_shot_count(tmp_path):
    torch.manual_seed(0)
    model = build("bam", 5).eval()
    query, support, masks = random_episode(batch=1, shots=5, size=64)
    assert model.shot_count == 5 and model(query, support, masks).shape == (1, 2, 64, 64)
    model.save_pretrained(tmp_path / "bam5")
    assert json.loads((tmp_path / "bam5" / "config.json").read_text())["shot"] == 5
    loaded = load_model(tmp_path / "bam5")
    for k in (1, 4):
        with pytest.raises(ValueError, match=rf"exactly K=5 supports.*got {k}"):
            loaded(query, support[:, :k], masks[:, :k])
    features = loaded.encode_support(support, masks)
    with pytest.raises(ValueError, match="K=5"):
        loaded.decode_query(query, *(f[:, :4] for f in features))


def test_bam_shot_weights_follow_their_supports():
    """The learned reweighting sees the sorted estimates and is un-sorted again: reordering the
    supports reorders the weights and leaves the prediction unchanged."""
    torch.manual_seed(0)
    model = build("bam", 4).eval()
    with torch.no_grad():
        model.kshot_rw[0].weight.normal_()
        model.kshot_rw[2].weight.normal_()
    estimates = torch.tensor([[0.3, 0.1, 0.4, 0.2]])
    weights = model.shot_weights(estimates)
    assert torch.allclose(weights.sum(1), torch.ones(1)) and weights.std() > 1e-3
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.allclose(model.shot_weights(estimates[:, perm]), weights[:, perm])
    query, support, masks = random_episode(batch=1, shots=4, size=64)
    with torch.no_grad():
        assert torch.allclose(model(query, support, masks), model(query, support[:, perm], masks[:, perm]), atol=1e-5)


def test_bam_training_base_map_leaves_out_the_episode_class():
    torch.manual_seed(0)
    model = build("bam", 1, base_class_ids=[6, 7, 8])
    logits = torch.randn(2, 4, 3, 3)
    probs = logits.softmax(1)
    assert torch.allclose(model.base_map(logits, None), probs[:, 1:].sum(1, keepdim=True))
    chosen = model.base_map(logits, torch.tensor([7, 8]))
    assert torch.allclose(chosen[0], probs[0, [1, 3]].sum(0, keepdim=True))
    assert torch.allclose(chosen[1], probs[1, [1, 2]].sum(0, keepdim=True))
    with pytest.raises(ValueError, match=r"episode class\(es\) \[2\] are not base classes"):
        model.base_map(logits, torch.tensor([2, 7]))


def test_small_backbone_pretrained_on_a_pool_loads_frozen(tmp_path):
    """`diffss pretrain-backbone` (a few steps, a tiny pool) lowers its loss and writes a file that
    build_model loads into a frozen small backbone; "demo" names the shipped file; bad files are named."""
    from safetensors.torch import load_file

    from diffss.cli import main as cli_main
    from diffss.models.backbone import SMALL_DEMO_WEIGHTS

    weights = tmp_path / "small.safetensors"
    assert cli_main(["--quiet", "pretrain-backbone", "--preset", "demo", "--work-dir", str(tmp_path / "work"),
                     "--output", str(weights), "--steps", "40", "--pool-per-class", "3"]) == 0
    model = build_model("pfenet", backbone="small", pretrained=str(weights)).train()
    state = load_file(str(weights))
    assert torch.equal(model.backbone.layer4[0][0].weight, state["layer4.0.0.weight"])
    assert not any(p.requires_grad for p in model.backbone.parameters()) and not model.backbone.training
    shipped = build_model("pfenet", backbone="small", pretrained="demo")
    assert torch.equal(shipped.backbone.stem[0][0].weight, load_file(str(SMALL_DEMO_WEIGHTS))["stem.0.0.weight"])
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        build_model("pfenet", backbone="small", pretrained=str(tmp_path / "bad.safetensors"))


def test_small_backbone_pretraining_lowers_its_loss(tmp_path):
    from diffss.data import build_demo_dataset, load_dataset
    from diffss.models.pretraining import pretrain_small_backbone

    root = build_demo_dataset(tmp_path / "pool", seed=5, num_classes=4, per_class=4, shared_scenes=False)
    samples = load_dataset("demo", root=root, fold=0, split="train", episodes=1).samples

    class ImageLabelOnly:
        """A pool sample as ImageNet gives it: an image and its class, no mask to read."""

        def __init__(self, sample):
            self.name, self.class_name, self.image_path = sample.name, sample.class_name, sample.image_path
            self.load_image = sample.load_image

        def load_mask(self):
            raise AssertionError("backbone pretraining read a mask")

    summary = pretrain_small_backbone([ImageLabelOnly(s) for s in samples], tmp_path / "b.safetensors", steps=60,
                                      batch_size=8, image_size=64, progress=False)
    assert summary["last_loss"] < 0.8 * summary["first_loss"]
