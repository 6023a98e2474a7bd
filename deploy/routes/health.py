"""Probes, server and model metadata, repository index and Triton statistics (v2 REST)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from deploy import schemas
from deploy.routes import server
from deploy.service import Server

SERVER_NAME = "diffss-serve"
SERVER_VERSION = "0.1.0"
# the probes answer without the token and without waiting for any model work
OPEN_ROUTES = ("/v2/health/live", "/v2/health/ready")

router = APIRouter(tags=["health and metadata"], responses={404: {"model": schemas.ErrorBody}})


@router.get("/v2/health/live", response_model=schemas.Live)
async def live():
    return {"live": True}


@router.get("/v2/health/ready", response_model=schemas.Ready)
async def ready(srv: Server = Depends(server)):
    return {"ready": bool(srv.models)}


@router.get("/v2", response_model=schemas.ServerMetadata)
async def server_metadata():
    return {"name": SERVER_NAME, "version": SERVER_VERSION,
            "extensions": ["binary_tensor_data", "model_repository", "statistics"]}


@router.get("/v2/models", response_model=schemas.ModelList)
async def list_models(srv: Server = Depends(server)):
    return {"models": sorted(srv.models)}


@router.post("/v2/repository/index", response_model=list[schemas.RepositoryEntry])
async def repository_index(srv: Server = Depends(server)):
    return [{"name": m.name, "version": m.version, "state": "READY"} for m in srv.models.values()]


# /v2/models/stats before /v2/models/{model_name}, which would match "stats"
@router.get("/v2/models/stats", response_model=schemas.ModelStatsList)
@router.get("/v2/models/{model_name}/stats", response_model=schemas.ModelStatsList)
@router.get("/v2/models/{model_name}/versions/{model_version}/stats", response_model=schemas.ModelStatsList)
async def model_stats(model_name: str | None = None, model_version: str | None = None, srv: Server = Depends(server)):
    models = [srv.model(model_name, model_version)] if model_name else list(srv.models.values())
    return {"model_stats": [m.stats.as_triton(m.name, m.version) for m in models]}


@router.get("/v2/models/{model_name}", response_model=schemas.ModelMetadata)
@router.get("/v2/models/{model_name}/versions/{model_version}", response_model=schemas.ModelMetadata)
async def model_metadata(model_name: str, model_version: str | None = None, srv: Server = Depends(server)):
    model = srv.model(model_name, model_version)
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "onnxruntime_onnx",
        "inputs": [t.metadata() for t in model.inputs],
        "outputs": [t.metadata() for t in model.outputs],
    }


@router.get("/v2/models/{model_name}/ready", response_model=schemas.ModelReady)
@router.get("/v2/models/{model_name}/versions/{model_version}/ready", response_model=schemas.ModelReady)
async def model_ready(model_name: str, model_version: str | None = None, srv: Server = Depends(server)):
    model = srv.model(model_name, model_version)
    return {"name": model.name, "ready": True}


@router.get("/diffss/profile", response_model=schemas.ProfileBody)
async def profile(srv: Server = Depends(server)):
    """Where served requests spent their time, summed per route kind and phase (deploy.profile)."""
    return {"phases": srv.profile.snapshot()}
