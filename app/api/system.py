"""Health, readiness, metrics and the device inventory."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from app.api.responses import problems
from app.deps import SystemDep
from app.schemas import DeviceList, Health
from app.services.metrics import CONTENT_TYPE
from app.services.runtime import Runtime

router = APIRouter()


@router.get(
    "/healthz",
    operation_id="healthz",
    response_model=Health,
    tags=["system"],
    summary="Alive (the process answers)",
)
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    operation_id="readyz",
    response_model=Health,
    responses={503: {"model": Health, "description": "not ready: a check fails (or starting)"}},
    tags=["system"],
    summary="Ready: store, dispatcher, NVML",
)
def readyz(request: Request, response: Response) -> Health:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        health = Health(status="unavailable", checks={"service": "starting or stopping"})
    else:
        health = runtime.system.readiness()
    if health.status != "ok":
        response.status_code = 503
    return health


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=PlainTextResponse,
    responses=problems(503),
    tags=["system"],
    summary="Prometheus metrics",
)
def metrics(system: SystemDep) -> PlainTextResponse:
    return PlainTextResponse(system.metrics_text(), media_type=CONTENT_TYPE)


@router.get(
    "/v1/devices",
    operation_id="list_devices",
    response_model=DeviceList,
    responses=problems(503),
    tags=["devices"],
    summary="Devices probes can run on",
)
def devices(system: SystemDep) -> DeviceList:
    return system.devices()
