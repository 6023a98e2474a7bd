"""``POST /v2/models/{name}[/versions/{v}]/infer``: Open Inference Protocol inference, JSON or
binary tensors, through the model's dynamic batcher."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from deploy import schemas
from deploy.routes import server
from deploy.service import Server
from deploy.v2 import INFERENCE_HEADER, check_finite_inputs, encode_infer_response, parse_infer_request

router = APIRouter(tags=["inference"])
KIND = "v2_infer"

_INFER = {
    "openapi_extra": schemas.request_body("infer"),
    "responses": {
        **schemas.ERRORS,
        200: {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferResponseBody"}},
                          "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
              "description": "outputs; binary ones after a JSON header of Inference-Header-Content-Length bytes"},
    },
    "response_class": Response,
}


@router.post("/v2/models/{model_name}/infer", **_INFER)
@router.post("/v2/models/{model_name}/versions/{model_version}/infer", **_INFER)
async def infer(request: Request, model_name: str, model_version: str | None = None, srv: Server = Depends(server)):
    profile = srv.profile
    with profile.timed(KIND, "handler"):
        model = srv.model(model_name, model_version)
        with profile.timed(KIND, "receive"):
            body = await request.body()
        header_length = request.headers.get(INFERENCE_HEADER)
        encoding = request.headers.get("content-encoding")
        with profile.timed(KIND, "decode"):
            if encoding:
                body = await srv.offload(srv.decompress, body, encoding)
            if header_length is not None and not encoding:
                # binary tensors: a small JSON header and views of the body, cheaper than a thread hop
                infer_request = parse_infer_request(body, header_length, model, srv.infer_limits[model.name])
            else:  # JSON tensors: parsing may take a while, off the event loop
                infer_request = await srv.offload(
                    parse_infer_request, body, header_length, model, srv.infer_limits[model.name]
                )
        with profile.timed(KIND, "validation"):
            await srv.offload(check_finite_inputs, infer_request)
        arrays = await srv.run(
            model, infer_request.inputs, [name for name, _ in infer_request.outputs],
            deadline=srv.deadline(infer_request.timeout_us), kind=KIND,
        )
        with profile.timed(KIND, "encode"):
            if all(binary for _, binary in infer_request.outputs):
                content, headers = encode_infer_response(model, infer_request, arrays)
            else:  # JSON numbers: slow, off the event loop
                content, headers = await srv.offload(encode_infer_response, model, infer_request, arrays)
        return Response(content=content, headers=headers)
