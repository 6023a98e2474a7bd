"""ONNX export: checker, opset, Triton layout, parity with PyTorch, dynamic batch/shots/size.

The real models (prototype and PFENet on the small backbone, BAM as DifFSS-BAM uses it: K = 5,
HSNet on ResNet-50; random init) are exported once per module.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from diffss.export import (
    MAX_ABS_LOGIT_DIFF,
    MIN_ARGMAX_AGREEMENT,
    export_graphs,
    export_model_repository,
    load_parity,
    measure_parity,
)
from diffss.export.graphs import sample_episode
from diffss.export.optimize import reduce_max_over_last_axis
from diffss.models import build_model

ROLES = ("segmenter", "support_encoder", "query_decoder")
SAMPLE = 64  # PFENet needs >= 64 px (feature stride 8, coarsest bin 1/8 of the features)
BAM_SHOTS = 5  # DifFSS-BAM: 1 real + 4 auxiliary supports through the K-shot reweighting
BACKBONE = {"prototype": "small", "pfenet": "small", "bam": "small", "hsnet": "resnet50"}  # HSNet: torchvision ResNets only


def build_small(name: str):
    return build_model(name, backbone=BACKBONE[name], **({"shot": BAM_SHOTS} if name == "bam" else {}))


@pytest.fixture(scope="module", params=["prototype", "pfenet", "bam", "hsnet"])
def exported(request, tmp_path_factory):
    torch.manual_seed(0)
    model = build_small(request.param).eval()
    repo = tmp_path_factory.mktemp(f"repo_{request.param}")
    if request.param == "prototype":  # from a checkpoint folder, as the pipeline does
        source = model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "prototype")
    else:
        source = model
    result = export_model_repository(source, repo, name="diffss", sample_size=SAMPLE, shots=2, image_size=64)
    return request.param, model, repo, result


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_triton_layout(exported):
    _, _, repo, result = exported
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == [f"diffss_{r}" for r in sorted(ROLES)]
    for role in ROLES:
        model_dir = repo / f"diffss_{role}"
        assert (model_dir / "1" / "model.onnx").is_file()
        config = (model_dir / "config.pbtxt").read_text()
        assert f'name: "diffss_{role}"' in config
        # dynamic batching as diffss-serve does it: Triton's dims then leave the batch axis out
        assert 'backend: "onnxruntime"' in config and "max_batch_size: 4" in config
        assert "max_queue_delay_microseconds: 5000" in config and "max_queue_size: 64" in config
        assert result["models"][role]["onnx"] == str(model_dir / "1" / "model.onnx")
        for tensor in result["models"][role]["inputs"] + result["models"][role]["outputs"]:
            assert f'name: "{tensor}"' in config
    decoder_config = (repo / "diffss_query_decoder" / "config.pbtxt").read_text()
    assert "dims: [ 3, -1, -1 ]" in decoder_config and "TYPE_FP32" in decoder_config
    assert "TYPE_INT64" in (repo / "diffss_segmenter" / "config.pbtxt").read_text()


def test_checker_opset_and_dynamic_axes(exported):
    _, _, repo, result = exported
    for role in ROLES:
        proto = onnx.load(result["models"][role]["onnx"])
        onnx.checker.check_model(proto, full_check=True)
        assert {o.domain: o.version for o in proto.opset_import}[""] == 17
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["diffss.role"] == role and meta["diffss.family"] == "diffss"
        assert meta["diffss.image_size"] == meta["diffss.max_input_side"] == "64"
        dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input}
        if "query" in dims:
            assert dims["query"] == ["batch", 3, "height", "width"]
        shots = BAM_SHOTS if exported[0] == "bam" else "shots"  # BAM's K is fixed by its weights
        if "support_images" in dims:
            assert dims["support_images"] == ["batch", shots, 3, "support_height", "support_width"]
            assert dims["support_masks"] == ["batch", shots, "support_height", "support_width"]
        assert result["models"][role]["trace_warnings"] == []
    # the prior's max over support pixels already reduces the last axis: nothing to rewrite
    assert {role: result["models"][role]["rewrites"] for role in ROLES} == dict.fromkeys(ROLES, 0)


def test_parity_recorded_and_within_thresholds(exported):
    _, _, repo, result = exported
    parity = result["parity"]
    assert load_parity(repo, "diffss") == json.loads((repo / "parity.json").read_text())["diffss"] == parity
    assert parity["passed"] is True
    assert parity["max_abs_logit_diff"] <= MAX_ABS_LOGIT_DIFF == 1e-4
    assert parity["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT == 0.999
    shapes = {(c["batch"], c["shots"], c["height"], c["width"]) for c in parity["cases"]}
    assert len(shapes) == 3 and all(s[2:] != (SAMPLE, SAMPLE) for s in shapes)
    assert {c["shots"] for c in parity["cases"]} == ({BAM_SHOTS} if exported[0] == "bam" else {1, 3, 5})


@pytest.mark.parametrize("batch,shots,height,width", [(3, 1, 72, 64), (2, 6, 64, 80)])
def test_dynamic_batch_shots_and_size_match_torch(exported, batch, shots, height, width):
    """K-shot fusion in the graph stays correct for K never seen at export (dynamic K axis)."""
    _, model, _, result = exported
    shots = model.shot_count or shots
    query, support_images, support_masks = sample_episode(batch, shots, height, width, seed=7)
    with torch.no_grad():
        reference = model(query, support_images, support_masks).numpy()
    feeds = {"support_images": support_images.numpy(), "support_masks": support_masks.numpy()}
    full = _session(result["models"]["segmenter"]["onnx"]).run(None, {"query": query.numpy(), **feeds})[0]
    encoder = _session(result["models"]["support_encoder"]["onnx"])
    names = [o.name for o in encoder.get_outputs()]
    features = dict(zip(names, encoder.run(names, feeds)))
    split = _session(result["models"]["query_decoder"]["onnx"]).run(None, {"query": query.numpy(), **features})[0]
    assert full.shape == split.shape == reference.shape == (batch, 2, height, width)
    assert np.abs(full - reference).max() <= MAX_ABS_LOGIT_DIFF
    assert np.abs(split - reference).max() <= MAX_ABS_LOGIT_DIFF
    assert (full.argmax(1) == reference.argmax(1)).mean() >= MIN_ARGMAX_AGREEMENT


def test_parity_detects_a_diverging_model(exported):
    """The parity check has teeth: weights changed after export make it fail."""
    name, _, repo, _ = exported
    torch.manual_seed(123)
    other = build_small(name).eval()
    parity = measure_parity(other, repo, cases=[(1, other.shot_count or 2, SAMPLE, SAMPLE)])
    assert parity["passed"] is False
    assert parity["max_abs_logit_diff"] > MAX_ABS_LOGIT_DIFF


def test_later_opset_is_written_exactly(tmp_path):
    torch.manual_seed(0)
    model = build_model("prototype", backbone="small").eval()
    path = tmp_path / "support_encoder.onnx"
    export_graphs(model, {"support_encoder": path}, opset=18, sample_size=SAMPLE)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    _, support_images, support_masks = sample_episode(1, 3, 80, 48, seed=3)
    with torch.no_grad():
        reference = [t.numpy() for t in model.encode_support(support_images, support_masks)]
    out = _session(path).run(None, {"support_images": support_images.numpy(), "support_masks": support_masks.numpy()})
    assert len(out) == len(reference) == 2
    assert max(np.abs(a - b).max() for a, b in zip(out, reference)) <= MAX_ABS_LOGIT_DIFF


@pytest.mark.parametrize("opset,keepdims", [(17, 1), (18, 1), (18, 0)])
def test_reduce_max_rewrite_is_exact(opset, keepdims):
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3, 4, 5])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 1, 5, 6])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 1, 6] if keepdims else [2, 3, 6])
    nodes = [helper.make_node("MatMul", ["a", "b"], ["ab"])]
    initializers = []
    if opset >= 18:
        initializers.append(helper.make_tensor("axes", TensorProto.INT64, [1], [2]))
        nodes.append(helper.make_node("ReduceMax", ["ab", "axes"], ["out"], keepdims=keepdims))
    else:
        nodes.append(helper.make_node("ReduceMax", ["ab"], ["out"], axes=[-2], keepdims=keepdims))
    graph = helper.make_graph(nodes, "g", [a, b], [out], initializer=initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    feeds = {"a": np.random.rand(2, 3, 4, 5).astype(np.float32), "b": np.random.rand(2, 1, 5, 6).astype(np.float32)}
    before = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert reduce_max_over_last_axis(proto) == 1
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node].count("MatMul") == 1
    after = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert after.shape == before.shape == ((2, 3, 1, 6) if keepdims else (2, 3, 6))
    np.testing.assert_array_equal(after, before)


class _UndeclaredFeatures(torch.nn.Module):
    """A contract-following model without ``support_feature_axes``: one prototype per episode
    and the per-shot feature maps, whose dynamic axes the exporter must find by itself."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def encode_support(self, support_images, support_masks):
        feats = self.conv(support_images.flatten(0, 1))
        fg = torch.nn.functional.interpolate((support_masks == 1).float().flatten(0, 1)[:, None], size=feats.shape[-2:])
        proto = (feats * fg).sum((2, 3)) / (fg.sum((2, 3)) + 1e-3)
        return proto.reshape(support_images.shape[0], -1, 8).mean(1), feats.reshape(support_images.shape[:2] + feats.shape[1:])

    def decode_query(self, query, prototype, shot_features):
        feats = self.conv(query)
        score = (feats * prototype[:, :, None, None]).sum(1, keepdim=True) + shot_features.mean((1, 2, 3, 4))[:, None, None, None]
        logits = torch.cat([-score, score], dim=1)
        return torch.nn.functional.interpolate(logits, size=query.shape[-2:], mode="bilinear")

    def forward(self, query, support_images, support_masks):
        return self.decode_query(query, *self.encode_support(support_images, support_masks))


def test_undeclared_support_features_get_discovered_axes(tmp_path):
    torch.manual_seed(0)
    model = _UndeclaredFeatures().eval()
    paths = {role: tmp_path / f"{role}.onnx" for role in ROLES}
    graphs = export_graphs(model, paths, sample_size=32)
    assert graphs["support_encoder"].outputs == ["support_feat_0", "support_feat_1"]
    assert graphs["support_encoder"].dynamic_axes["support_feat_0"] == {0: "batch"}
    assert set(graphs["support_encoder"].dynamic_axes["support_feat_1"]) == {0, 1, 3, 4}  # B, K, h, w; not C
    query, support_images, support_masks = sample_episode(3, 5, 40, 24, seed=9)
    with torch.no_grad():
        reference = model(query, support_images, support_masks).numpy()
    feeds = {"support_images": support_images.numpy(), "support_masks": support_masks.numpy()}
    features = _session(paths["support_encoder"]).run(None, feeds)
    decoded = _session(paths["query_decoder"]).run(
        None, {"query": query.numpy(), "support_feat_0": features[0], "support_feat_1": features[1]}
    )[0]
    full = _session(paths["segmenter"]).run(None, {"query": query.numpy(), **feeds})[0]
    assert np.abs(decoded - reference).max() <= MAX_ABS_LOGIT_DIFF
    assert np.abs(full - reference).max() <= MAX_ABS_LOGIT_DIFF


def test_bad_arguments_are_named(tmp_path):
    model = build_model("prototype", backbone="small")
    for opset in (16, 21):
        with pytest.raises(ValueError, match="opset"):
            export_model_repository(model, tmp_path / "r", opset=opset)
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        export_model_repository(tmp_path / "no_such_checkpoint", tmp_path / "r")
    with pytest.raises(ValueError, match="name"):
        export_model_repository(model, tmp_path / "r", name="bad/name")
    with pytest.raises(ValueError, match="graph roles"):
        export_graphs(model, {"decoder": tmp_path / "x.onnx"})
    with pytest.raises(FileNotFoundError, match="parity"):
        load_parity(tmp_path)
    (tmp_path / "parity.json").write_text('{"other": {}}')
    with pytest.raises(KeyError, match="diffss"):
        load_parity(tmp_path, "diffss")


# -- set-valued support features (exact compaction of cached support sets) ---------------------
def _varied_masks(size: int) -> torch.Tensor:
    """Five shots from all to almost no foreground: [1,5,size,size] int64."""
    masks = torch.zeros(1, 5, size, size, dtype=torch.int64)
    masks[0, 0] = 1  # all foreground
    masks[0, 1, : size * 2 // 3, : size * 2 // 3] = 1  # ~40%
    masks[0, 2, size // 2 :, size // 4 : size // 2] = 1  # ~12%
    masks[0, 2, size // 2, size // 4 : size // 2] = 255  # ignore border
    masks[0, 3, 5:8, 40:43] = 1  # empty-ish: a few pixels
    return masks  # shot 4 stays empty


def test_set_valued_support_features_compact_exactly(exported):
    """The decoder metadata names the model's set-valued inputs, and compacting them (as the
    server does on registration) leaves the decoder's logits unchanged, for any mix of
    foreground fractions, including an all-foreground shot (nothing to drop) and empty ones."""
    from serving_contract import SET_VALUED_KEY
    from deploy.set_features import compact_set_valued

    name, model, _, result = exported
    decoder = _session(result["models"]["query_decoder"]["onnx"])
    meta = decoder.get_modelmeta().custom_metadata_map
    declared = json.loads(meta.get(SET_VALUED_KEY, "{}"))
    assert declared == model.set_valued_support_features == ({} if name in ("prototype", "hsnet") else {"support_high": 2})
    encoder = _session(result["models"]["support_encoder"]["onnx"])
    names = [o.name for o in encoder.get_outputs()]
    query, support_images, _ = sample_episode(1, 5, 72, 80, seed=3)
    masks = _varied_masks(SAMPLE)
    images = torch.rand(1, 5, 3, SAMPLE, SAMPLE, generator=torch.Generator().manual_seed(4))
    # shot sets: all five (the all-foreground one leaves nothing to drop) and the last four
    # (BAM takes exactly five: the last four and the second again)
    partial = [1, 2, 3, 4, 1] if model.shot_count == 5 else [1, 2, 3, 4]
    for shots, shrinks in (([0, 1, 2, 3, 4], False), (partial, True)):
        feeds = {"support_images": images[:, shots].numpy(), "support_masks": masks[:, shots].numpy()}
        features = dict(zip(names, encoder.run(names, feeds)))
        compacted = {n: compact_set_valued(f, declared[n]) if n in declared else f for n, f in features.items()}
        for n in declared:
            if shrinks:
                assert compacted[n].shape[:3] == features[n].shape[:3] and compacted[n].shape[4:] == (1,)
                assert compacted[n].shape[3] < np.prod(features[n].shape[3:]) / 2
            else:
                assert compacted[n] is features[n]
        reference = decoder.run(None, {"query": query.numpy(), **features})[0]
        fast = decoder.run(None, {"query": query.numpy(), **compacted})[0]
        assert np.abs(fast - reference).max() <= 1e-5


def test_compact_set_valued_keeps_each_set():
    from deploy.set_features import compact_set_valued

    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 3, 4, 5, 6)).astype(np.float32)  # [B,K,C,h,w]
    features[..., 0, :] = 0  # at most 24 of 30 positions non-zero
    features[0, 0, :, :, 2:] = 0  # 8 non-zero
    features[0, 1] = 0  # empty
    features[1, 0, :, 3, 4] = np.nan  # NaN is kept, not taken for zero
    out = compact_set_valued(features, 2)
    assert out.shape == (2, 3, 4, 25, 1) and out.dtype == features.dtype  # widest: 24 non-zero + a zero
    for b in range(2):
        for k in range(3):
            before = {tuple(v) for v in features[b, k].reshape(4, -1).T.tolist()}
            after = {tuple(v) for v in out[b, k].reshape(4, -1).T.tolist()}
            same = lambda s: {tuple("nan" if x != x else x for x in v) for v in s}  # noqa: E731
            assert same(after) == same(before)
    full = features.copy()
    full[np.isnan(full)] = 1.0
    full[full == 0] = 1.0
    assert compact_set_valued(full, 2) is full  # nothing to drop
    with pytest.raises(ValueError, match="vector axis"):
        compact_set_valued(features, 4)


def test_bad_set_valued_declarations_are_named():
    from diffss.export.graphs import set_valued_features

    class Declares(torch.nn.Module):
        set_valued_support_features = {}

    specs = [("prototype", {0: "batch"}), ("support_high", {0: "batch", 1: "shots", 3: "h", 4: "w"})]
    features = [torch.zeros(2, 8), torch.zeros(2, 3, 8, 4, 4)]
    model = Declares()
    model.set_valued_support_features = {"support_high": 2}
    assert set_valued_features(model, specs, features) == {"support_high": 2}
    for bad, words in (({"nope": 2}, "nope"), ({"prototype": 0}, "dynamic"), ({"support_high": 4}, "vector axis")):
        model.set_valued_support_features = bad
        with pytest.raises(ValueError, match=words):
            set_valued_features(model, specs, features)


def test_contract_datatypes_match_onnx_numpy_and_onnxruntime(tmp_path):
    """serving_contract's one datatype table (used by the exporter's Triton configs and by the
    server) spells every type as ONNX, numpy and onnxruntime themselves do."""
    from onnx import TensorProto, helper

    from serving_contract import DATATYPES

    for datatype in DATATYPES:
        assert TensorProto.DataType.Name(datatype.onnx).lower() == datatype.onnx_name
        assert helper.tensor_dtype_to_np_dtype(datatype.onnx) == np.dtype(datatype.numpy)
        value = helper.make_tensor_value_info("x", datatype.onnx, [2])
        out = helper.make_tensor_value_info("y", datatype.onnx, [2])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [value], [out])
        path = tmp_path / f"{datatype.v2}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
        assert _session(path).get_inputs()[0].type == datatype.ort, datatype
def test_parity_threshold_scales_with_the_logits():
    """Float32 noise grows with magnitude: 2e-4 off logits of ~40 is within tolerance, 2e-4 off
    logits of ~0.5 is not (absolute 1e-4 below 1)."""
    from diffss.export.parity import _compare

    large = np.linspace(-40, 40, 50, dtype=np.float32).reshape(1, 2, 5, 5)
    assert _compare(large, large + 2e-4)["max_scaled_logit_diff"] == pytest.approx(5e-6, rel=1e-2)
    small = large / 80
    assert _compare(small, small + 2e-4)["max_scaled_logit_diff"] == pytest.approx(2e-4, rel=1e-2)


def test_triton_config_batches_only_batch_first_graphs(tmp_path):
    """Triton's dims leave the batch axis out when max_batch_size > 0: only a graph whose every
    tensor has the named batch axis first is configured for dynamic batching."""
    from onnx import TensorProto, helper

    from diffss.export import render_config_pbtxt

    def identity(first_axis: str) -> str:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [first_axis, 3])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [first_axis, 3])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
        path = tmp_path / f"{first_axis}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
        return str(path)

    batched = render_config_pbtxt("m", identity("batch"), max_batch_size=4, max_queue_delay_ms=2.5, max_queue_size=9)
    assert "max_batch_size: 4" in batched and "dims: [ 3 ]" in batched
    assert "max_queue_delay_microseconds: 2500" in batched and "max_queue_size: 9" in batched
    other = render_config_pbtxt("m", identity("rows"))
    assert "max_batch_size: 0" in other and "dims: [ -1, 3 ]" in other and "dynamic_batching" not in other
    assert "dynamic_batching" not in render_config_pbtxt("m", identity("batch"), max_batch_size=1)
    with pytest.raises(ValueError, match="max_batch_size"):
        render_config_pbtxt("m", identity("batch"), max_batch_size=0)
