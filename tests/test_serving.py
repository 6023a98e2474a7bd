"""diffss-serve in a subprocess on loopback, driven by tritonclient and plain HTTP.

One repository holds the real models (prototype as family "proto" and PFENet as "pfenet" on the
small backbone, HSNet as "hsnet" on ResNet-50; random init), exported with the public export API.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from deploy.process import ServerProcess
from diffss.export import export_model_repository
from diffss.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64  # working size of the people's routes (image_size recorded at export)
MAX_SIDE = 2 * SIZE  # largest v2 image side (max_input_side recorded at export)
MAX_BODY = 4_000_000
TOKEN = "s3cret-token"
FAMILIES = ("proto", "pfenet", "hsnet")


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("model_repository")
    for family, arch, backbone in (("proto", "prototype", "small"), ("pfenet", "pfenet", "small"), ("hsnet", "hsnet", "resnet50")):
        torch.manual_seed(0)
        model = build_model(arch, backbone=backbone).eval()
        result = export_model_repository(
            model, repo, name=family, sample_size=SIZE, image_size=SIZE, max_input_side=MAX_SIDE,
            parity_cases=[(1, 2, SIZE, SIZE)],
        )
        assert result["parity"]["passed"]
    # one parity record per exported model in the shared repository
    assert set(json.loads((repo / "parity.json").read_text())) == set(FAMILIES)
    return repo


def start_server(repo: Path, log_path: Path, *extra: str) -> ServerProcess:
    return ServerProcess(repo, log_path, "--max-body-bytes", str(MAX_BODY), *extra, timeout=60)


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    srv = start_server(repo, tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    log = srv.stop()
    # no request may have ended as a server error
    assert "Traceback" not in log and " 500 " not in log, log


@pytest.fixture(scope="module")
def client(server):
    return triton.InferenceServerClient(server.url)


# -- helpers ----------------------------------------------------------------------------------
def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None, chunks=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        if chunks is not None:  # chunked upload: no Content-Length
            conn.putrequest(method, path)
            for k, v in (headers or {}).items():
                conn.putheader(k, v)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for chunk in chunks:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        else:
            conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for index, (name, data) in enumerate(files):
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f{index}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def picture(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def blob_mask(h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : 3 * h // 4, w // 5 : 3 * w // 5] = 255
    return mask


def episode(batch=1, shots=2, h=SIZE, w=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    query = rng.random((batch, 3, h, w), dtype=np.float32)
    support_images = rng.random((batch, shots, 3, h, w), dtype=np.float32)
    support_masks = np.zeros((batch, shots, h, w), np.int64)
    support_masks[..., h // 4 : h // 2, w // 4 : w // 2] = 1
    return query, support_images, support_masks


def triton_inputs(arrays: dict[str, np.ndarray], binary: bool, datatypes: dict[str, str] | None = None):
    inputs = []
    for name, array in arrays.items():
        datatype = (datatypes or {}).get(name) or {np.float32: "FP32", np.int64: "INT64", np.int32: "INT32"}[array.dtype.type]
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


def local_logits(repo: Path, model: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0]


def assert_client_error(status: int, body: bytes, expected_status: int, *words: str):
    assert status == expected_status, (status, body)
    message = json.loads(body)["error"]
    for word in words:
        assert word in message, message


# -- protocol ---------------------------------------------------------------------------------
def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    for family in FAMILIES:
        for role in ("segmenter", "support_encoder", "query_decoder"):
            assert client.is_model_ready(f"{family}_{role}")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_model_metadata("proto_segmenter")
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [
        {"name": "query", "datatype": "FP32", "shape": [-1, 3, -1, -1]},
        {"name": "support_images", "datatype": "FP32", "shape": [-1, -1, 3, -1, -1]},
        {"name": "support_masks", "datatype": "INT64", "shape": [-1, -1, -1, -1]},
    ]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 2, -1, -1]}]
    assert client.get_model_metadata("proto_segmenter", model_version="1")["name"] == "proto_segmenter"
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    index = client.get_model_repository_index()
    assert len(index) == 9 and all(entry["state"] == "READY" for entry in index)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("family", FAMILIES)
def test_infer_matches_onnxruntime(client, repo, family, binary):
    query, support_images, support_masks = episode(batch=2, shots=3, h=SIZE, w=SIZE + 16, seed=1)
    feeds = {"query": query, "support_images": support_images, "support_masks": support_masks}
    outputs = [triton.InferRequestedOutput("logits", binary_data=binary)]
    result = client.infer(f"{family}_segmenter", triton_inputs(feeds, binary), outputs=outputs, request_id="r1")
    logits = result.as_numpy("logits")
    assert result.get_response()["id"] == "r1"
    assert ("parameters" in result.get_response()["outputs"][0]) is binary
    np.testing.assert_allclose(logits, local_logits(repo, f"{family}_segmenter", feeds), atol=1e-5)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(client, server, repo, algorithm):
    query, support_images, support_masks = episode(seed=5)
    feeds = {"query": query, "support_images": support_images, "support_masks": support_masks}
    result = client.infer("proto_segmenter", triton_inputs(feeds, True), request_compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("logits"), local_logits(repo, "proto_segmenter", feeds), atol=1e-5)
    import gzip

    truncated = gzip.compress(b'{"inputs": []}' * 50)[:-12]
    status, _, raw = request(server, "POST", "/v2/models/proto_segmenter/infer", truncated, {"Content-Encoding": "gzip"})
    assert_client_error(status, raw, 400, "gzip")
    status, _, raw = request(server, "POST", "/v2/models/proto_segmenter/infer", b"{}", {"Content-Encoding": "br"})
    assert_client_error(status, raw, 415, "br")


def test_split_graphs_over_the_protocol(client, repo):
    """support_encoder -> query_decoder through the server equals the full segmenter graph."""
    query, support_images, support_masks = episode(shots=4, seed=2)
    encoded = client.infer(
        "pfenet_support_encoder", triton_inputs({"support_images": support_images, "support_masks": support_masks}, True)
    )  # no outputs named: every output, binary
    features = {o["name"]: encoded.as_numpy(o["name"]) for o in encoded.get_response()["outputs"]}
    assert set(features) == {"prototype", "support_high"}
    decoded = client.infer("pfenet_query_decoder", triton_inputs({"query": query, **features}, True))
    full = local_logits(repo, "pfenet_segmenter", {"query": query, "support_images": support_images, "support_masks": support_masks})
    np.testing.assert_allclose(decoded.as_numpy("logits"), full, atol=1e-4)


# -- people's routes --------------------------------------------------------------------------
def _support_files(shots=2, h=48, w=40):
    files = []
    for k in range(shots):
        files.append(("support_image", png(picture(h, w, 10 + k)) if k % 2 == 0 else jpeg(picture(h, w, 10 + k))))
        files.append(("support_mask", png(blob_mask(h, w))))
    return files


def _stats(client, model):
    return client.get_inference_statistics(model)["model_stats"][0]["execution_count"]


def test_people_segment_and_registered_supports(server, client):
    query_png = png(picture(50, 70, 1))
    body, headers = multipart([("query", query_png), *_support_files()], {"model": "proto"})
    status, response_headers, mask_bytes = request(server, "POST", "/diffss/segment", body, headers)
    assert status == 200 and response_headers["content-type"] == "image/png"
    mask = np.asarray(Image.open(io.BytesIO(mask_bytes)))
    assert mask.shape == (50, 70) and set(np.unique(mask)) <= {0, 255}

    body, headers = multipart(_support_files(), {"model": "proto"})
    status, _, raw = request(server, "POST", "/diffss/supports", body, headers)
    assert status == 201, raw
    registered = json.loads(raw)
    assert registered["model"] == "proto" and registered["shots"] == 2
    support_id = registered["support_id"]

    encodes = _stats(client, "proto_support_encoder")
    decodes = _stats(client, "proto_query_decoder")
    for _ in range(3):
        body, headers = multipart([("query", query_png)])
        status, _, cached_bytes = request(server, "POST", f"/diffss/supports/{support_id}/segment", body, headers)
        assert status == 200
        cached = np.asarray(Image.open(io.BytesIO(cached_bytes)))
        assert cached.shape == (50, 70)
        assert (cached == mask).mean() >= 0.999  # same answer as the full episode graph
    assert _stats(client, "proto_support_encoder") == encodes  # supports were not encoded again
    assert _stats(client, "proto_query_decoder") == decodes + 3

    assert request(server, "DELETE", f"/diffss/supports/{support_id}")[0] == 200
    body, headers = multipart([("query", query_png)])
    status, _, raw = request(server, "POST", f"/diffss/supports/{support_id}/segment", body, headers)
    assert_client_error(status, raw, 404, "support id")


def test_pfenet_registered_supports_are_compacted_and_answer_like_the_full_route(server, repo):
    """PFENet declares its masked support features set-valued: registration keeps only the
    pixels that matter (deploy.set_features), and the cached route still answers like the
    full episode graph, for shots from all to no foreground."""
    from deploy.app import find_families
    from deploy.runtime import load_repository

    families = find_families(load_repository(repo, device="cpu"))
    assert families["pfenet"].set_valued == {"support_high": 2} and families["proto"].set_valued == {}

    masks = [np.full((48, 40), 255, np.uint8), blob_mask(48, 40), np.zeros((48, 40), np.uint8)]
    masks[2][3:6, 30:33] = 255  # a few pixels
    supports = []
    for k, mask in enumerate(masks):
        supports += [("support_image", png(picture(48, 40, 20 + k))), ("support_mask", png(mask))]
    query_png = png(picture(56, 60, 3))
    for shots in (supports, supports[2:]):  # with and without the all-foreground shot
        body, headers = multipart(shots, {"model": "pfenet"})
        status, _, raw = request(server, "POST", "/diffss/supports", body, headers)
        assert status == 201, raw
        support_id = json.loads(raw)["support_id"]
        body, headers = multipart([("query", query_png), *shots], {"model": "pfenet"})
        status, _, full_bytes = request(server, "POST", "/diffss/segment", body, headers)
        assert status == 200
        body, headers = multipart([("query", query_png)])
        status, _, cached_bytes = request(server, "POST", f"/diffss/supports/{support_id}/segment", body, headers)
        assert status == 200
        full = np.asarray(Image.open(io.BytesIO(full_bytes)))
        cached = np.asarray(Image.open(io.BytesIO(cached_bytes)))
        assert cached.shape == full.shape == (56, 60)
        assert (cached == full).mean() >= 0.999


def test_hsnet_registered_supports_answer_like_the_full_route(server, client):
    """HSNet's cache is its masked support taps: a registered 3-shot set (the vote) is not
    encoded again per query and answers like the full episode graph."""
    query_png = png(picture(56, 60, 4))
    shots = _support_files(3)
    body, headers = multipart([("query", query_png), *shots], {"model": "hsnet"})
    status, _, full_bytes = request(server, "POST", "/diffss/segment", body, headers)
    assert status == 200, full_bytes
    body, headers = multipart(shots, {"model": "hsnet"})
    status, _, raw = request(server, "POST", "/diffss/supports", body, headers)
    assert status == 201, raw
    support_id = json.loads(raw)["support_id"]
    encodes = _stats(client, "hsnet_support_encoder")
    body, headers = multipart([("query", query_png)])
    status, _, cached_bytes = request(server, "POST", f"/diffss/supports/{support_id}/segment", body, headers)
    assert status == 200 and _stats(client, "hsnet_support_encoder") == encodes
    full = np.asarray(Image.open(io.BytesIO(full_bytes)))
    cached = np.asarray(Image.open(io.BytesIO(cached_bytes)))
    assert cached.shape == full.shape == (56, 60) and (cached == full).mean() >= 0.999


def test_people_route_needs_model_choice_when_several(server):
    body, headers = multipart([("query", png(picture(32, 32, 2))), *_support_files(1)])
    status, _, raw = request(server, "POST", "/diffss/segment", body, headers)
    assert_client_error(status, raw, 400, *FAMILIES)
    status, _, raw = request(server, "GET", "/diffss/models")
    assert status == 200 and {m["name"] for m in json.loads(raw)["models"]} == set(FAMILIES)


# -- bad input: 4xx + JSON error, server keeps serving ----------------------------------------
def _bad_infer_cases():
    query, support_images, support_masks = episode()
    good = {"query": query, "support_images": support_images, "support_masks": support_masks}
    header = {
        "inputs": [
            {"name": "query", "datatype": "FP32", "shape": list(query.shape), "parameters": {"binary_data_size": query.nbytes}},
        ]
    }
    header_bytes = json.dumps(header).encode()
    return good, [
        ("malformed JSON", b'{"inputs": [', {"Content-Type": "application/json"}, 400, "not valid JSON"),
        ("JSON not an object", b"[1, 2]", {}, 400, "JSON object"),
        ("JSON nested too deeply", b"[" * 100_000 + b"]" * 100_000, {}, 400, "nested"),
        ("no inputs", b'{"inputs": []}', {}, 400, "inputs"),
        ("data count", json.dumps({"inputs": [{"name": "query", "datatype": "FP32", "shape": [1, 3, 4, 4], "data": [1.0, 2.0]}]}).encode(), {}, 400, "elements"),
        ("strings as data", json.dumps({"inputs": [{"name": "query", "datatype": "FP32", "shape": [1, 3, 1, 1], "data": ["a", "b", "c"]}]}).encode(), {}, 400, "query"),
        ("bad header length", header_bytes + query.tobytes(), {"Inference-Header-Content-Length": "abc"}, 400, "Inference-Header-Content-Length"),
        ("header length past body", header_bytes, {"Inference-Header-Content-Length": "999999"}, 400, "outside"),
        ("binary too short", header_bytes + query.tobytes()[:100], {"Inference-Header-Content-Length": str(len(header_bytes))}, 400, "binary section"),
    ]


def test_bad_v2_requests_are_4xx(server, client):
    good, cases = _bad_infer_cases()
    for label, body, headers, status_expected, word in cases:
        status, _, raw = request(server, "POST", "/v2/models/proto_segmenter/infer", body, headers)
        assert status == status_expected, (label, status, raw)
        assert word in json.loads(raw)["error"], (label, raw)
        assert server.alive(), label

    def refused(model, arrays, expected_status, *words, datatypes=None, binary=True):
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, triton_inputs(arrays, binary, datatypes))
        assert info.value.status() == str(expected_status), info.value
        for word in words:
            assert word in info.value.message(), info.value.message()
        assert server.alive()

    # wrong rank, fixed axis, dtype, missing/unknown input, inconsistent batch, unknown model
    refused("proto_segmenter", {**good, "query": good["query"][0]}, 400, "query", "rank")
    refused("proto_segmenter", {**good, "query": np.zeros((1, 4, SIZE, SIZE), np.float32)}, 400, "axis 1")
    refused("proto_segmenter", {**good, "support_masks": good["support_masks"].astype(np.int32)}, 400, "datatype", "INT64")
    refused("proto_segmenter", {**good, "query": good["query"].astype(np.int64)}, 400, "datatype", binary=False)
    refused("proto_segmenter", {"query": good["query"], "support_images": good["support_images"]}, 400, "support_masks")
    refused("proto_segmenter", {**good, "extra": good["query"]}, 400, "no input 'extra'")
    refused("proto_segmenter", {**good, "query": np.concatenate([good["query"]] * 2)}, 400, "batch")
    refused("proto_segmenter", {**good, "support_masks": good["support_masks"][..., :10]}, 400, "support_width")
    refused("nope_segmenter", good, 404, "unknown model")
    status, _, raw = request(server, "GET", "/v2/models/nope")
    assert_client_error(status, raw, 404, "unknown model")
    status, _, raw = request(server, "GET", "/v2/models/proto_segmenter/versions/7")
    assert_client_error(status, raw, 404, "version")
    status, _, raw = request(server, "GET", "/no/such/route")
    assert_client_error(status, raw, 404)


def test_body_limit(server):
    big = b"x" * (MAX_BODY + 1)
    status, _, raw = request(server, "POST", "/v2/models/proto_segmenter/infer", big, {"Content-Type": "application/json"})
    assert_client_error(status, raw, 413, "limit")
    # chunked uploads declare no length: the limit applies to the bytes received
    many = [b"y" * 65536] * (MAX_BODY // 65536 + 2)
    status, _, raw = request(server, "POST", "/v2/models/proto_segmenter/infer", chunks=many)
    assert_client_error(status, raw, 413, "limit")
    prefix = b'--abc\r\nContent-Disposition: form-data; name="query"; filename="q.png"\r\n\r\n'
    status, _, raw = request(server, "POST", "/diffss/segment", chunks=[prefix, *many],
                             headers={"Content-Type": "multipart/form-data; boundary=abc"})
    assert_client_error(status, raw, 413, "limit")
    assert server.alive()


def test_bad_people_requests_are_4xx(server):
    query = ("query", png(picture(40, 40, 3)))
    good_supports = _support_files(1, 48, 40)
    cases = [
        ("undecodable query", [("query", b"not an image at all"), *good_supports], {"model": "proto"}, 400, "query"),
        ("undecodable mask", [query, ("support_image", png(picture(48, 40, 4))), ("support_mask", b"\x89PNG broken")], {"model": "proto"}, 400, "support_mask[0]"),
        ("mask not fitting", [query, ("support_image", png(picture(48, 40, 4))), ("support_mask", png(blob_mask(30, 40)))], {"model": "proto"}, 400, "size"),
        ("empty mask", [query, ("support_image", png(picture(48, 40, 4))), ("support_mask", png(np.zeros((48, 40), np.uint8)))], {"model": "proto"}, 400, "foreground"),
        ("masks missing", [query, ("support_image", png(picture(48, 40, 4)))], {"model": "proto"}, 400, "support_mask"),
        ("no supports", [query], {"model": "proto"}, 400, "support_image"),
        ("unknown family", [query, *good_supports], {"model": "nope"}, 404, "nope"),
        ("gif", [("query", _gif()), *good_supports], {"model": "proto"}, 400, "PNG or JPEG"),
    ]
    for label, files, fields, expected, word in cases:
        body, headers = multipart(files, fields)
        status, _, raw = request(server, "POST", "/diffss/segment", body, headers)
        assert status == expected, (label, status, raw)
        assert word in json.loads(raw)["error"], (label, raw)
        assert server.alive(), label
    status, _, raw = request(server, "POST", "/diffss/segment", b'{"query": 1}', {"Content-Type": "application/json"})
    assert_client_error(status, raw, 415, "multipart")
    status, _, raw = request(server, "POST", "/diffss/segment", b"--abc\r\ngarbage", {"Content-Type": "multipart/form-data; boundary=abc"})
    assert 400 <= status < 500 and "error" in json.loads(raw)
    body, headers = multipart([query])
    status, _, raw = request(server, "POST", "/diffss/supports/0123abcd/segment", body, headers)
    assert_client_error(status, raw, 404, "support id")
    assert server.alive()


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture(8, 8, 5)).save(buffer, format="GIF")
    return buffer.getvalue()


# -- concurrency, token, CLI ------------------------------------------------------------------
def test_four_concurrent_clients(server, repo):
    query, support_images, support_masks = episode(seed=4)
    feeds = {"query": query, "support_images": support_images, "support_masks": support_masks}
    expected = local_logits(repo, "pfenet_segmenter", feeds)
    errors: list[BaseException] = []

    def worker():
        try:
            own = triton.InferenceServerClient(server.url)
            for _ in range(4):
                got = own.infer("pfenet_segmenter", triton_inputs(feeds, True)).as_numpy("logits")
                np.testing.assert_allclose(got, expected, atol=1e-5)
            body, headers = multipart([("query", png(picture(40, 40, 6))), *_support_files(1)], {"model": "pfenet"})
            status, _, raw = request(server, "POST", "/diffss/segment", body, headers)
            assert status == 200, raw
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert server.alive()


def test_bearer_token_guards_all_but_health(repo, tmp_path):
    srv = start_server(repo, tmp_path / "token.log", "--token", TOKEN)
    try:
        assert request(srv, "GET", "/v2/health/ready")[0] == 200
        status, headers, raw = request(srv, "GET", "/v2/models/proto_segmenter")
        assert_client_error(status, raw, 401, "token")
        assert headers["www-authenticate"] == "Bearer"
        status, _, raw = request(srv, "GET", "/v2/models/proto_segmenter", headers={"Authorization": "Bearer wrong"})
        assert status == 401
        body, headers = multipart([("query", png(picture(8, 8, 1)))])
        assert request(srv, "POST", "/diffss/segment", body, headers)[0] == 401
        client = triton.InferenceServerClient(srv.url)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get_model_metadata("proto_segmenter", headers=auth)["name"] == "proto_segmenter"
        query, support_images, support_masks = episode()
        feeds = {"query": query, "support_images": support_images, "support_masks": support_masks}
        assert client.infer("proto_segmenter", triton_inputs(feeds, True), headers=auth).as_numpy("logits").shape == (1, 2, SIZE, SIZE)
        status, _, raw = request(srv, "GET", "/openapi.json")
        assert_client_error(status, raw, 401, "token")
        status, _, raw = request(srv, "GET", "/openapi.json", headers=auth)
        assert status == 200 and "/v2/models/{model_name}/infer" in json.loads(raw)["paths"]
    finally:
        srv.stop()


def test_support_cache_is_a_bounded_lru():
    from deploy.support_cache import SupportCache, SupportSet

    def support(nbytes: int) -> SupportSet:
        return SupportSet("proto", 1, {"fg_prototype": np.zeros(nbytes, np.uint8)})

    cache = SupportCache(max_entries=2, max_bytes=1000)
    first, second = cache.add(support(100)), cache.add(support(100))
    assert cache.get(first) is not None  # first is now the most recently used
    third = cache.add(support(100))
    assert cache.get(second) is None and cache.get(first) is not None and len(cache) == 2
    cache.add(support(950))  # the byte bound evicts both older sets
    assert cache.get(first) is None and cache.get(third) is None and cache.nbytes == 950
    with pytest.raises(ValueError):
        cache.add(support(1001))
    assert cache.remove(first) is False


def test_cli_refuses_a_missing_repository(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "deploy.server", "--model-repository", str(tmp_path / "missing")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "missing" in result.stderr


def test_deploy_does_not_import_torch(tmp_path):
    """deploy/ and serving_contract/ alone, as deploy/Dockerfile ships them, import without torch
    and without diffss; serving_contract imports neither deploy (the exporter imports it, and the
    library must not import the server)."""
    import shutil

    for package in ("deploy", "serving_contract"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "dagster"))
    prelude = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
    no_library = (
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'diffss'], 'diffss imported'; "
    )
    server = (
        prelude + "import deploy.server, deploy.app, deploy.runtime, deploy.v2, deploy.images, deploy.support_cache, "
        "deploy.batching, deploy.routes, deploy.schemas; deploy.server.build_parser(); " + no_library
        + f"assert deploy.__file__.startswith({str(tmp_path)!r}), deploy.__file__"
    )
    contract = (
        prelude + "import serving_contract; " + no_library
        + "assert not [m for m in sys.modules if m.split('.')[0] == 'deploy'], 'deploy imported'; "
        + f"assert serving_contract.__file__.startswith({str(tmp_path)!r})"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for code in (server, contract):
        subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=60, env=env)


def test_library_does_not_import_the_server():
    """diffss.export writes repositories to serving_contract, never through deploy."""
    code = (
        "import sys, diffss.export, diffss.export.parity, diffss.export.quantize; "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'deploy'], sorted(m for m in sys.modules if m.startswith('deploy'))"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# -- bounded work: size limits, decoding pool, health under load (issue 12, section 5) -------
LIMITED_SIDE = 1024  # the limited server's --max-image-side; --max-request-pixels fits one 1-shot episode of it
LIMITED_TENSOR_SIDE = 96
LIMITED_SHOTS = 2


@pytest.fixture(scope="module")
def limited(repo, tmp_path_factory):
    srv = start_server(
        repo, tmp_path_factory.mktemp("logs") / "limited.log",
        "--max-image-side", str(LIMITED_SIDE), "--max-request-pixels", str(3 * LIMITED_SIDE**2),
        "--max-shots", str(LIMITED_SHOTS), "--max-tensor-side", str(LIMITED_TENSOR_SIDE),
    )
    yield srv
    log = srv.stop()
    assert "Traceback" not in log and " 500 " not in log, log


def blank_png(width: int, height: int) -> bytes:
    """A black 8-bit grey PNG: kilobytes on the wire for any number of pixels (a decompression
    bomb when large). Written with zlib directly: PIL's encoder takes seconds on a 1-pixel-wide one."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = bytes(height * (width + 1))  # per row: filter type 0, then zero pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """The issue's files: one 38 KB PNG of 6300x6300 and one PNG of 1x40,000,000."""
    return {"square": blank_png(6300, 6300), "line": blank_png(1, 40_000_000)}


def proc_mib(pid: int, key: str) -> float:
    """VmRSS / VmHWM (peak) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def test_oversized_images_are_refused_from_their_headers(server, bombs):
    """Images over the per-image side or the per-request pixels get a 413 naming the limit,
    before any pixel is decoded: the server's peak memory does not move."""
    assert len(bombs["square"]) < 40_000
    pid = server.proc.pid
    reset_peak_rss(pid)
    rss = proc_mib(pid, "VmRSS")
    small_pair = _support_files(1, 48, 40)
    big = blank_png(4096, 4096)  # the largest side allowed; five of them are too many pixels together
    cases = [
        ("6300x6300 query", [("query", bombs["square"]), *small_pair], ("query: 6300x6300", "4096 pixels per side")),
        ("1x40000000 support", [("query", png(picture(40, 40, 1))), ("support_image", bombs["line"]),
                                ("support_mask", bombs["line"])], ("support_image[0]: 1x40000000", "4096")),
        ("pixels per request", [("query", big), ("support_image", big), ("support_mask", big), ("support_image", big),
                                ("support_mask", big)], ("83886080 pixels", "limit of 67108864 pixels per request")),
    ]
    for label, files, words in cases:
        body, headers = multipart(files, {"model": "proto"})
        status, _, raw = request(server, "POST", "/diffss/segment", body, headers)
        assert_client_error(status, raw, 413, *words)
    assert proc_mib(pid, "VmHWM") - rss < 64, "images were decoded"
    assert server.alive()


def test_image_decoding_runs_in_a_bounded_pool(repo, monkeypatch):
    """In-process: six concurrent episodes, but never more than --image-workers (default 2)
    images decode at once; the others wait undecoded, and the health probe does not wait."""
    import asyncio
    import time

    import httpx

    from deploy import images
    from deploy.app import create_app
    from deploy.runtime import load_repository

    app = create_app(load_repository(repo, device="cpu"))
    decode, lock, release = images.image_tensor, threading.Lock(), threading.Event()
    running, peak = 0, 0

    def tracked(*args):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            release.wait(timeout=60)
            return decode(*args)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(images, "image_tensor", tracked)
    body, headers = multipart([("query", png(picture(40, 40, 1))), *_support_files(1)], {"model": "proto"})

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://diffss") as http:
            posts = [asyncio.create_task(http.post("/diffss/segment", content=body, headers=headers)) for _ in range(6)]
            for _ in range(500):  # until the pool is busy, then a little longer for any excess to show
                if peak >= 2:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            start = time.perf_counter()
            health = await http.get("/v2/health/live")
            health_s = time.perf_counter() - start
            release.set()
            return health, health_s, await asyncio.gather(*posts)

    health, health_s, responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 6
    assert peak == 2, f"{peak} images decoded at once"
    assert health.status_code == 200 and health_s < 1.0


def test_health_answers_under_image_load(limited, bombs):
    """Six clients send the largest images the limits allow while the issue's three bombs
    arrive: the bombs get 413 at once, every episode is answered, the liveness probe keeps
    answering (the benchmark holds it to p99 < 100 ms) and the peak memory stays bounded."""
    pid = limited.proc.pid
    reset_peak_rss(pid)
    side = LIMITED_SIDE
    ramp = np.linspace(0, 255, side).astype(np.uint8)
    image = np.stack([np.add.outer(ramp // 2, ramp // 2)] * 3, -1)
    episode_body = multipart([("query", png(image)), ("support_image", png(image[::-1])),
                              ("support_mask", png(blob_mask(side, side)))], {"model": "pfenet"})
    bomb_bodies = [multipart([("query", bombs[kind]), *_support_files(1)], {"model": "pfenet"})
                   for kind in ("square", "line", "line")]
    statuses: list[int] = []
    latencies: list[float] = []
    done = threading.Event()

    def send(body_headers, times):
        for _ in range(times):
            statuses.append(request(limited, "POST", "/diffss/segment", *body_headers)[0])

    def probe():
        import time

        while not done.is_set():
            start = time.perf_counter()
            assert request(limited, "GET", "/v2/health/live")[0] == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    senders = [threading.Thread(target=send, args=(episode_body, 2)) for _ in range(6)]
    senders += [threading.Thread(target=send, args=(b, 1)) for b in bomb_bodies]
    for t in senders:
        t.start()
    for t in senders:
        t.join(timeout=300)
    done.set()
    prober.join()
    assert sorted(statuses) == [200] * 12 + [413] * 3
    assert np.percentile(latencies, 99) < 0.25 and max(latencies) < 2.0, sorted(latencies)[-5:]
    assert proc_mib(pid, "VmHWM") < 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_model_runs_and_image_work_run_below_the_event_loop(repo):
    """The priority the health probes rely on: onnxruntime's compute threads of a server-loaded
    model and the threads of its pools run 10 nice levels below the thread that loaded them."""
    from deploy.runtime import background_threads, load_model

    def thread_nices() -> dict[str, int]:
        nices = {}
        for stat in Path("/proc/self/task").glob("*/stat"):
            nices[stat.parent.name] = int(stat.read_text().rsplit(")", 1)[1].split()[16])
        return nices

    expected = min(19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + 10)
    before = thread_nices()
    model = load_model(repo / "proto_segmenter", ["CPUExecutionProvider"], intra_op_threads=3, low_priority=True)
    started = {tid: nice for tid, nice in thread_nices().items() if tid not in before}
    assert started and set(started.values()) == {expected}, started
    with background_threads(1, "test") as pool:
        assert pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result() == expected
    assert model.run(dict(zip(("query", "support_images", "support_masks"), episode(h=32, w=32))))[0].shape == (1, 2, 32, 32)


def test_shot_limit_on_both_protocols(limited, client):
    """--max-shots bounds v2 tensors too, and the people's routes say so in their own terms."""
    query, support_images, support_masks = episode(shots=LIMITED_SHOTS + 1, h=32, w=32)
    feeds = {"query": query, "support_images": support_images, "support_masks": support_masks}
    with pytest.raises(InferenceServerException) as info:
        triton.InferenceServerClient(limited.url).infer("proto_segmenter", triton_inputs(feeds, True))
    assert info.value.status() == "400" and f"at most {LIMITED_SHOTS} shots" in info.value.message()
    body, headers = multipart([("query", png(picture(40, 40, 1))), *_support_files(LIMITED_SHOTS + 1)], {"model": "proto"})
    status, _, raw = request(limited, "POST", "/diffss/segment", body, headers)
    assert_client_error(status, raw, 400, f"at most {LIMITED_SHOTS} shots")
    assert "Too many files" not in json.loads(raw)["error"]
    # within the limit: answered
    query, support_images, support_masks = episode(shots=LIMITED_SHOTS, h=32, w=32)
    feeds = {"query": query, "support_images": support_images, "support_masks": support_masks}
    assert triton.InferenceServerClient(limited.url).infer("proto_segmenter", triton_inputs(feeds, True)).as_numpy("logits").shape == (1, 2, 32, 32)


def test_v2_image_side_is_bounded_by_the_model(client, limited):
    """A v2 image tensor larger than the model's recorded diffss.max_input_side (or the
    server's --max-tensor-side) gets a 413 naming the limit: the model's memory grows with it."""
    query, support_images, support_masks = episode(h=SIZE, w=MAX_SIDE + 1)
    feeds = {"query": query, "support_images": support_images, "support_masks": support_masks}
    with pytest.raises(InferenceServerException) as info:
        client.infer("pfenet_segmenter", triton_inputs(feeds, True))
    assert info.value.status() == "413" and f"width {MAX_SIDE + 1}" in info.value.message()
    assert f"at most {MAX_SIDE}" in info.value.message()
    query, support_images, support_masks = episode(h=LIMITED_TENSOR_SIDE + 4, w=SIZE)
    feeds = {"query": query, "support_images": support_images, "support_masks": support_masks}
    with pytest.raises(InferenceServerException) as info:
        triton.InferenceServerClient(limited.url).infer("proto_segmenter", triton_inputs(feeds, True))
    assert info.value.status() == "413" and f"at most {LIMITED_TENSOR_SIDE}" in info.value.message()


def test_v2_refuses_non_finite_inputs(server, client):
    """NaN/Inf inputs get a 400 naming the input (they used to come back as bare NaN tokens)."""
    query, support_images, support_masks = episode()
    query[0, 0, 0, 0] = np.nan
    body = json.dumps({"inputs": [
        {"name": "query", "datatype": "FP32", "shape": list(query.shape), "data": query.ravel().tolist()},
        {"name": "support_images", "datatype": "FP32", "shape": list(support_images.shape), "data": support_images.ravel().tolist()},
        {"name": "support_masks", "datatype": "INT64", "shape": list(support_masks.shape), "data": support_masks.ravel().tolist()},
    ]}).encode()
    assert b"NaN" in body
    status, _, raw = request(server, "POST", "/v2/models/proto_segmenter/infer", body, {"Content-Type": "application/json"})
    assert_client_error(status, raw, 400, "'query'", "NaN")
    query[0, 0, 0, 0] = 0.5
    support_images[0, 1, 2, 3, 4] = -np.inf
    feeds = {"query": query, "support_images": support_images, "support_masks": support_masks}
    with pytest.raises(InferenceServerException) as info:
        client.infer("proto_segmenter", triton_inputs(feeds, True))
    assert info.value.status() == "400" and "'support_images'" in info.value.message()


def test_json_outputs_are_strict_json():
    """An output holding NaN cannot be sent as JSON: refused with a hint, fine as binary."""
    from types import SimpleNamespace

    from deploy.errors import ApiError
    from deploy.v2 import InferRequest, encode_infer_response

    model = SimpleNamespace(name="m", version="1")
    logits = np.array([[0.5, np.nan]], np.float32)
    with pytest.raises(ApiError) as info:
        encode_infer_response(model, InferRequest(None, {}, [("logits", False)]), [logits])
    assert info.value.status == 422 and "binary" in info.value.message
    body, headers = encode_infer_response(model, InferRequest(None, {}, [("logits", True)]), [logits])
    assert np.isnan(np.frombuffer(body[int(headers["Inference-Header-Content-Length"]):], np.float32)[1])


def test_openapi_schema(server):
    """/openapi.json is FastAPI's generated document: every route, the bodies the routes read
    themselves (v2 infer, the multipart forms) and the responses, as pydantic models."""
    status, _, raw = request(server, "GET", "/openapi.json")
    assert status == 200
    document = json.loads(raw)
    paths, components = document["paths"], document["components"]["schemas"]

    def resolve(schema):
        return components[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema

    assert {"/v2/health/live", "/v2/models/{model_name}/infer", "/diffss/segment", "/diffss/supports",
            "/v2/models/{model_name}/stats", "/diffss/profile"} <= set(paths)
    infer = paths["/v2/models/{model_name}/infer"]["post"]
    infer_json = resolve(infer["requestBody"]["content"]["application/json"]["schema"])
    assert infer_json["required"] == ["inputs"]
    assert "application/octet-stream" in infer["requestBody"]["content"]
    tensor = resolve(infer_json["properties"]["inputs"]["items"])
    assert "FP32" in tensor["properties"]["datatype"]["enum"]
    segment_form = resolve(paths["/diffss/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"])
    assert {"query", "support_image", "support_mask", "model"} == set(segment_form["properties"])
    assert segment_form["properties"]["query"]["format"] == "binary"
    registered = paths["/diffss/supports"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]
    assert set(resolve(registered)["properties"]) == {"support_id", "model", "shots"}
    live = resolve(paths["/v2/health/live"]["get"]["responses"]["200"]["content"]["application/json"]["schema"])
    assert live["properties"]["live"]["type"] == "boolean"
    assert resolve(paths["/diffss/segment"]["post"]["responses"]["413"]["content"]["application/json"]["schema"])["required"] == ["error"]


def test_bam_is_served_and_refuses_another_shot_count(tmp_path):
    """BAM's graphs carry its fixed K (here 2, to stay small; DifFSS-BAM uses 5): a request with
    that many supports is answered like the local graph, another K is a client error."""
    torch.manual_seed(0)
    repo = tmp_path / "repo"
    model = build_model("bam", backbone="small", shot=2).eval()
    result = export_model_repository(model, repo, name="bam", sample_size=SIZE, image_size=SIZE, parity_cases=[(1, 2, SIZE, SIZE)])
    assert result["parity"]["passed"]
    srv = start_server(repo, tmp_path / "server.log")
    try:
        client = triton.InferenceServerClient(srv.url)
        assert client.get_model_metadata("bam_segmenter")["inputs"][1]["shape"] == [-1, 2, 3, -1, -1]
        query, support_images, support_masks = episode(shots=2)
        feeds = {"query": query, "support_images": support_images, "support_masks": support_masks}
        served = client.infer("bam_segmenter", triton_inputs(feeds, True)).as_numpy("logits")
        np.testing.assert_allclose(served, local_logits(repo, "bam_segmenter", feeds), atol=1e-6)
        with torch.no_grad():
            expected = model(*(torch.from_numpy(a) for a in (query, support_images, support_masks))).numpy()
        assert np.abs(served - expected).max() <= 1e-4
        _, three_images, three_masks = episode(shots=3)
        with pytest.raises(InferenceServerException, match="axis 1 must be 2"):
            client.infer("bam_segmenter", triton_inputs({"query": query, "support_images": three_images, "support_masks": three_masks}, True))
        body, headers = multipart([("query", png(picture(50, 70, 1))), *_support_files(2)], {"model": "bam"})
        status, _, mask_bytes = request(srv, "POST", "/diffss/segment", body, headers)
        assert status == 200 and np.asarray(Image.open(io.BytesIO(mask_bytes))).shape == (50, 70)
        body, headers = multipart([("query", png(picture(50, 70, 1))), *_support_files(3)], {"model": "bam"})
        status, _, raw = request(srv, "POST", "/diffss/segment", body, headers)
        assert_client_error(status, raw, 400, "bam_segmenter")
    finally:
        log = srv.stop()
    assert "Traceback" not in log and " 500 " not in log, log
