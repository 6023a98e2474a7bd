"""diffss-serve in a subprocess on loopback, driven by tritonclient and plain HTTP.

One repository holds both real models (prototype as family "proto", PFENet as "pfenet"; small
backbone, random init), exported with the public export API.
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
MAX_BODY = 4_000_000
TOKEN = "s3cret-token"


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("model_repository")
    for family, arch in (("proto", "prototype"), ("pfenet", "pfenet")):
        torch.manual_seed(0)
        model = build_model(arch, backbone="small").eval()
        result = export_model_repository(
            model, repo, name=family, sample_size=SIZE, image_size=SIZE, parity_cases=[(1, 2, SIZE, SIZE)]
        )
        assert result["parity"]["passed"]
    # one parity record per exported model in the shared repository
    assert set(json.loads((repo / "parity.json").read_text())) == {"proto", "pfenet"}
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
    for family in ("proto", "pfenet"):
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
    assert len(index) == 6 and all(entry["state"] == "READY" for entry in index)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("family", ["proto", "pfenet"])
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


def test_people_route_needs_model_choice_when_several(server):
    body, headers = multipart([("query", png(picture(32, 32, 2))), *_support_files(1)])
    status, _, raw = request(server, "POST", "/diffss/segment", body, headers)
    assert_client_error(status, raw, 400, "proto", "pfenet")
    status, _, raw = request(server, "GET", "/diffss/models")
    assert status == 200 and {m["name"] for m in json.loads(raw)["models"]} == {"proto", "pfenet"}


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


def test_deploy_does_not_import_torch():
    code = (
        "import sys, deploy.server, deploy.app, deploy.runtime, deploy.v2, deploy.images, deploy.support_cache; "
        "deploy.server.build_parser(); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


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
