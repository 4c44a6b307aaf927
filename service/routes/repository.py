"""The model repository API (Triton's and KServe's shape): index, load, unload.

``GET|POST /v2/repository/index`` lists every version folder and every loaded version with its
state; ``POST /v2/repository/models/{name}/load`` (re)loads a model's versions from its folder and
``.../unload`` stops serving it. Load and unload change what the service serves, so they need the
API key, and are refused (403) on a service that has none. A request body (Triton's optional load
parameters) is not read. The answer comes once every worker process has applied the change
(``serving/repository.py``); ``pending_workers`` lists the worker processes that had not within the
request timeout (empty normally: they apply it as soon as they can, in the same order).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from ..codes import ServiceError
from ..deps import PipelineDep, SettingsDep
from ..settings import Settings
from .v2 import v2_error_responses

router = APIRouter(prefix="/v2/repository", tags=["model repository"])
ModelPath = Annotated[str, Path(max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="the model's folder name")]


class Forbidden(ServiceError):
    code = "forbidden"


def require_control(settings: Settings) -> None:
    # the middleware has checked the key when one is set; without one, nobody may change what is served
    if settings.api_key is None:
        raise Forbidden("the repository API changes what the service serves: set CLASSIFIER_API_KEY to use it")


@router.get("/index", summary="Every model version in the repository, with its state", responses=v2_error_responses(401))
@router.post("/index", summary="Every model version in the repository, with its state (Triton's method)",
             responses=v2_error_responses(401))
async def index(pipeline: PipelineDep) -> Any:
    return pipeline.repository.index()


@router.post("/models/{name}/load", summary="Load (or reload) a model's versions from its folder",
             responses=v2_error_responses(401, 403, 404, 422, 503))
async def load(name: ModelPath, pipeline: PipelineDep, settings: SettingsDep) -> Any:
    require_control(settings)
    infos, pending = await pipeline.repository.load(name)
    return {"name": name, "loaded": [{"version": i.version, "load_seconds": i.load_seconds,
                                      "memory_bytes": i.memory_bytes} for i in infos],
            "pending_workers": pending}


@router.post("/models/{name}/unload", summary="Stop serving a model (in-flight requests finish first)",
             responses=v2_error_responses(401, 403, 404, 503))
async def unload(name: ModelPath, pipeline: PipelineDep, settings: SettingsDep) -> Any:
    require_control(settings)
    pending = await pipeline.repository.unload(name)
    return {"name": name, "unloaded": True, "pending_workers": pending}
