"""HSNet against the official code's outputs (parity fixtures), and official checkpoint loading.

The fixtures (``../shared/reference/parity``, or the folder named by ``DIFFSS_PARITY_FIXTURES``)
hold seeded random weights under the official key names, the preprocessed inputs and the outputs
of the unmodified official forward pass; their README lists the tolerances used here. Every
``hsnet_*_<K>shot_<S>px.safetensors`` case found there is tested.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from diffss.models import HSNet, build_model, load_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("DIFFSS_PARITY_FIXTURES") or ROOT.parent / "shared" / "reference" / "parity")
CASES = sorted(p.name for p in FIXTURES.glob("hsnet_*shot_*px.safetensors")) if FIXTURES.is_dir() else []
RELAXED = 1e-4  # max|diff| <= RELAXED * max|ref| (the fixture README's relaxed check)
NEAR_TIE = 1e-4  # |fg - bg| below this in the fixture: the argmax may flip on float noise
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _require_fixtures():
    if CASES:
        return
    message = (f"HSNet parity fixtures not found in {FIXTURES}: put the parity folder there "
               "(or set DIFFSS_PARITY_FIXTURES to it)")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def load_case(name: str):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(FIXTURES / name), "pt") as f:
        metadata = f.metadata()
        case = {k: f.get_tensor(k) for k in f.keys()}
    state = {}
    for weight_file in json.loads(metadata["weight_files"]):
        state.update(load_file(str(FIXTURES / weight_file)))
    # float8 weights: .float() gives exactly the values the official forward used
    state = {k: v.float() if v.dtype == torch.float8_e4m3fn else v for k, v in state.items()}
    return state, case, metadata


@pytest.fixture(scope="module", params=CASES or ["missing"])
def parity_run(request):
    _require_fixtures()
    state, case, metadata = load_case(request.param)
    return request.param, case, HSNet.official_parity(state, case, metadata)


def _near_ties(case) -> torch.Tensor:
    """[1,S,S]: pixels where some shot's fixture logits are a near tie."""
    logits = case["output.logit_mask"]
    return ((logits[:, :, 1] - logits[:, :, 0]).abs() < NEAR_TIE).any(dim=1)


def test_outputs_equal_the_official_forward(parity_run):
    name, case, out = parity_run
    outputs = sorted(k for k in case if k.startswith("output."))
    assert outputs and set(outputs) <= set(out), f"{name}: missing {sorted(set(outputs) - set(out))}"
    ties = _near_ties(case)
    report = []
    for key in outputs:
        ref, got = case[key], out[key]
        assert got.shape == ref.shape and got.dtype == ref.dtype, (key, got.shape, got.dtype, ref.shape, ref.dtype)
        if key == "output.logit_mask":
            rel = ((got - ref).abs().max() / ref.abs().max()).item()
            report.append(f"{key} {rel:.2e}")
            assert rel <= RELAXED, f"{name} {key}: max|diff|/max|ref| = {rel:.2e}"
        else:  # masks and vote counts: exact away from near ties
            differ = got != ref
            report.append(f"{key} {int(differ.sum())} px differ ({int(ties.sum())} near ties)")
            assert not (differ & ~ties).any(), f"{name} {key}: {int((differ & ~ties).sum())} px differ away from near ties"
    print(name, "; ".join(report))


def test_intermediates_equal_the_official_forward(parity_run):
    name, case, out = parity_run
    compared = 0
    for key in sorted(k for k in case if k.startswith("inter.")):
        assert key in out, f"{name}: intermediate {key} not produced"
        ref, got = case[key], out[key]
        assert got.shape == ref.shape, (key, got.shape, ref.shape)
        if ref.is_floating_point():
            rel = ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()
            assert rel <= RELAXED, f"{name} {key}: max|diff|/max|ref| = {rel:.2e}"
        else:
            assert torch.equal(got, ref), key
        compared += 1
    assert compared >= 10


def test_official_checkpoint_converts_and_reloads(tmp_path):
    """HSNet's train.py saves ``model.state_dict()`` of its DataParallel model (keys with
    ``module.``, no wrapper dict): that file loads through ``from_official``, round-trips through
    ``save_pretrained``/``load_model`` and, fed [0,1] images, gives the fixture's logits."""
    _require_fixtures()
    name = next(c for c in CASES if "_1shot_" in c)
    state, case, _ = load_case(name)
    path = tmp_path / "best_model.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    model = HSNet.from_official(torch.load(path, map_location="cpu", weights_only=True))
    assert model.config == {"model": "hsnet", "backbone": "resnet50", "pretrained": None}
    reloaded = load_model(model.save_pretrained(tmp_path / "converted"))
    query = case["input.query_img"] * STD + MEAN  # the official inputs, denormalised to [0,1]
    supports = case["input.support_imgs"] * STD.unsqueeze(1) + MEAN.unsqueeze(1)
    masks = case["input.support_masks"].long()
    with torch.no_grad():
        logits = reloaded(query, supports, masks)
    ref = case["output.logit_mask"][:, 0]
    assert ((logits - ref).abs().max() / ref.abs().max()).item() <= RELAXED
    ties = _near_ties(case)
    assert not ((logits.argmax(1) != case["output.pred_mask"]) & ~ties).any()


def test_official_state_dict_errors_list_the_keys():
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in build_model("hsnet").state_dict().items()}
    state["module.backbone.fc.weight"] = torch.zeros(1000, 2048)  # present in official files: dropped
    assert isinstance(HSNet.from_official(state), HSNet)
    broken = dict(state)
    del broken["module.hpn_learner.decoder2.2.bias"]
    broken["module.hpn_learner.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        HSNet.from_official(broken)
    assert "hpn_learner.decoder2.2.bias" in str(info.value) and "hpn_learner.extra.weight" in str(info.value)
    wrong = dict(state)
    wrong["module.hpn_learner.decoder2.2.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"decoder2\.2\.bias \(3,\)"):
        HSNet.from_official(wrong)
    with pytest.raises(ValueError, match="vgg"):
        HSNet.from_official(state, vgg=True)
