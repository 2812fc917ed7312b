"""Triton's model configuration and statistics extensions over HTTP; gRPC answers the same
through ModelConfig and ModelStatistics (grpc_inference.py). What each says:
services/api/model_config.py and services/api/model_statistics.py.

Included in the app before the OIP v2 router, so that /v2/models/stats is not read as the
metadata of a model named "stats"."""

from __future__ import annotations

from fastapi import APIRouter, Depends

import bentoml
from services.api.model_config import config_of
from services.api.model_statistics import statistics
from services.api.open_inference import checked_bundle, model_version

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])


@router.get("/models/stats", summary="Every served model's statistics (Triton's statistics extension)")
async def all_statistics(service=Depends(bentoml.get_current_service)) -> dict:
    return statistics([(bundle.name, model_version(bundle)) for bundle in service.bundles.values()])


@router.get("/models/{name}/stats", summary="One model's statistics (Triton's statistics extension)")
@router.get("/models/{name}/versions/{version}/stats", summary="One model's statistics (Triton's statistics extension)")
async def model_statistics(name: str, version: str | None = None, service=Depends(bentoml.get_current_service)) -> dict:
    bundle = checked_bundle(service, name, version)
    return statistics([(bundle.name, model_version(bundle))])


@router.get("/models/{name}/config", summary="One model's configuration (Triton's model configuration extension)")
@router.get("/models/{name}/versions/{version}/config", summary="One model's configuration (Triton's model configuration extension)")
async def model_configuration(name: str, version: str | None = None, service=Depends(bentoml.get_current_service)) -> dict:
    return config_of(checked_bundle(service, name, version), service.settings)
