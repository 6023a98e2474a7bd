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
from diffss.models.pfenet import prior_mask

MODELS = ("prototype", "pfenet")


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
    model = build_model(name, backbone="small").train()
    query, support, masks = random_episode(batch=2, shots=shots, size=64)
    target = (torch.rand(2, 64, 64) > 0.5).long()
    logits, aux = model.forward_train(query, support, masks)
    assert logits.shape == (2, 2, 64, 64)
    assert len(aux) == (4 if name == "pfenet" else 0)
    assert all(a.shape == (2, 2, 64, 64) for a in aux)
    segmentation_loss(logits, target, aux).backward()
    # random-init backbones are trained: gradients reach the first conv
    first_conv = model.backbone.stem[0][0].weight
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
    torch.manual_seed(0)
    model = build_model(name, backbone="small").eval()
    for shots in (1, 3):
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
    model = build_model(name, backbone="small").eval()
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
    model = build_model(name, backbone="small", hidden_dim=24)
    # move BatchNorm statistics away from their init so buffers must round-trip too
    model.train()
    model(*random_episode(batch=2, shots=2))
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "ckpt")
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    episode = random_episode(batch=1, shots=3, seed=5)
    with torch.no_grad():
        assert torch.equal(model(*episode), loaded(*episode))
    assert type(FewShotSegmenter.from_pretrained(tmp_path / "ckpt")) is type(model)
    other = "pfenet" if name == "prototype" else "prototype"
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
    with pytest.raises(ValueError, match="no pretrained"):
        build_model("pfenet", backbone="small", pretrained="imagenet")
    assert set(BACKBONES) == {"resnet50", "resnet18", "small"}
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
    model = build_model(name, backbone="small")
    # a few training steps so the output is not the near-constant of a fresh init
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    query, support, masks, query_mask = square_episode()
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
