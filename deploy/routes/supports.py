"""The people's routes: multipart PNG/JPEG in, PNG mask out; support sets registered once and
queried many times (deploy/README.md)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from deploy import images, schemas
from deploy.errors import ApiError, not_found
from deploy.routes import server
from deploy.service import Server
from deploy.set_features import compact_features
from deploy.support_cache import SupportSet

router = APIRouter(tags=["segmentation"], responses=schemas.ERRORS)
_PNG = {200: {"content": {"image/png": {}}, "description": "the mask: 0 background, 255 foreground, the query's size"}}


@router.get("/diffss/models", response_model=schemas.FamilyList)
async def list_families(srv: Server = Depends(server)):
    return {
        "models": [
            {"name": f.name, "image_size": f.image_size, "graphs": [f.segmenter.name, f.support_encoder.name, f.query_decoder.name]}
            for f in srv.families.values()
        ]
    }


@router.post("/diffss/segment", response_class=Response, responses=_PNG, openapi_extra=schemas.request_body("segment"))
async def segment(request: Request, srv: Server = Depends(server)):
    """One episode: query + support images and masks -> the query's mask."""
    kind, profile = "segment", srv.profile
    with profile.timed(kind, "handler"):
        async with srv.form(request) as form:
            family = srv.family(srv.model_field(form))
            async with srv.image_requests:
                with profile.timed(kind, "image_decode"):
                    decoded = await srv.decode_images(form, family, query=True, supports=True)
                (query_size, query), (support_images, support_masks) = decoded["query"], decoded["supports"]
                (logits,) = await srv.run(
                    family.segmenter,
                    {"query": query, "support_images": support_images, "support_masks": support_masks},
                    ["logits"], deadline=srv.deadline(), kind=kind,
                )
                with profile.timed(kind, "encode"):
                    png = await srv.image_work(images.mask_png, logits[0], *query_size)
        return Response(png, media_type="image/png")


@router.post("/diffss/supports", status_code=201, response_model=schemas.RegisteredSupports,
             openapi_extra=schemas.request_body("supports"))
async def register_supports(request: Request, srv: Server = Depends(server)):
    """Encode a support set once and keep it (LRU); queries against it run the decoder only."""
    kind, profile = "register_supports", srv.profile
    with profile.timed(kind, "handler"):
        async with srv.form(request) as form:
            family = srv.family(srv.model_field(form))
            async with srv.image_requests:
                with profile.timed(kind, "image_decode"):
                    decoded = await srv.decode_images(form, family, query=False, supports=True)
                support_images, support_masks = decoded["supports"]
                encoder = family.support_encoder
                names = [t.name for t in encoder.outputs]
                features = await srv.run(encoder, {"support_images": support_images, "support_masks": support_masks},
                                         names, deadline=srv.deadline(), kind=kind)
        features = dict(zip(names, features))
        if family.set_valued:  # paid once here instead of on every query against the set
            features = await srv.offload(compact_features, features, family.set_valued)
        support = SupportSet(family.name, int(support_images.shape[1]), features)
        try:
            support_id = srv.cache.add(support)
        except ValueError as exc:
            raise ApiError(413, str(exc)) from None
        return JSONResponse({"support_id": support_id, "model": family.name, "shots": support.shots}, status_code=201)


@router.post("/diffss/supports/{support_id}/segment", response_class=Response, responses=_PNG,
             openapi_extra=schemas.request_body("query"))
async def segment_with_supports(request: Request, support_id: str, srv: Server = Depends(server)):
    """A query against a registered support set (its features are not computed again)."""
    kind, profile = "supports_segment", srv.profile
    with profile.timed(kind, "handler"):
        with profile.timed(kind, "cache_lookup"):
            support = srv.cache.get(support_id)
        if support is None:
            raise not_found(f"unknown support id {support_id!r} (never registered, or evicted from the cache)")
        family = srv.families[support.family]
        async with srv.form(request) as form:
            async with srv.image_requests:
                with profile.timed(kind, "image_decode"):
                    query_size, query = (await srv.decode_images(form, family, query=True, supports=False))["query"]
                (logits,) = await srv.run(family.query_decoder, {"query": query, **support.features}, ["logits"],
                                          deadline=srv.deadline(), kind=kind)
                with profile.timed(kind, "encode"):
                    png = await srv.image_work(images.mask_png, logits[0], *query_size)
        return Response(png, media_type="image/png")


@router.delete("/diffss/supports/{support_id}", response_model=schemas.DeletedSupports)
async def delete_supports(support_id: str, srv: Server = Depends(server)):
    if not srv.cache.remove(support_id):
        raise not_found(f"unknown support id {support_id!r}")
    return {"support_id": support_id, "deleted": True}
