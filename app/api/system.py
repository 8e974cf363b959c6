"""Health, readiness, metrics and the device inventory."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse

from app.deps import SystemDep
from app.schemas import DeviceList, Health
from app.services.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["system"], summary="Alive (the process answers)")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, tags=["system"], summary="Ready: store, dispatcher, NVML")
def readyz(system: SystemDep, response: Response) -> Health:
    health = system.readiness()
    if health.status != "ok":
        response.status_code = 503
    return health


@router.get("/metrics", response_class=PlainTextResponse, tags=["system"], summary="Prometheus metrics")
def metrics(system: SystemDep) -> PlainTextResponse:
    return PlainTextResponse(system.metrics_text(), media_type=CONTENT_TYPE)


@router.get("/v1/devices", response_model=DeviceList, tags=["devices"], summary="Devices probes can run on")
def devices(system: SystemDep) -> DeviceList:
    return system.devices()
