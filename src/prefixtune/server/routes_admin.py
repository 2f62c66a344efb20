"""Health and metrics (operations), the model list, and the admin endpoints that load and unload adapters."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from prefixtune.server import protocol as P
from prefixtune.server import schemas as S
from prefixtune.server.metrics import CONTENT_TYPE
from prefixtune.server.protocol import APIError
from prefixtune.server.state import AppState, app_state

health_router = APIRouter()
admin_router = APIRouter()


@health_router.get("/health", responses=S.HEALTH)
async def health(state: AppState = Depends(app_state)):
    scheduler = state.scheduler
    ok = scheduler.alive
    # A supervised engine process (engine/supervisor.py) says "restarting" or "failed" and why.
    status = "ok" if ok else getattr(scheduler, "state", "unavailable")
    body = {"status": "unavailable" if status == "ok" and not ok else status, "model": state.settings.model_name,
            "waiting": scheduler.waiting, "running": scheduler.running}
    if getattr(scheduler, "reason", None):
        body["reason"] = scheduler.reason
    if hasattr(scheduler, "restarts"):
        body["engine_restarts"] = scheduler.restarts
    headers = {"Retry-After": "5"} if status == "restarting" else None
    return JSONResponse(body, status_code=200 if ok else 503, headers=headers)


@health_router.get("/metrics", responses=S.METRICS)
async def metrics_endpoint(state: AppState = Depends(app_state)):
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@admin_router.get("/v1/models", responses=S.MODELS)
async def list_models(state: AppState = Depends(app_state)):
    await state.registry.refresh()
    base, names = state.settings.model_name, state.registry.names()
    info = await run_in_threadpool(state.cards.cards, names)  # extension: server/model_cards.py
    cards = [P.model_card(base, prefixtune=state.cards.base(len(names)))]
    return {"object": "list", "data": cards + [P.model_card(n, parent=base, prefixtune=info[n]) for n in names]}


@admin_router.get("/v1/models/{model:path}", responses=S.MODEL)
async def get_model(model: str, state: AppState = Depends(app_state)):
    adapter = await state.registry.resolve(model)
    base = state.settings.model_name
    if adapter is None:
        return P.model_card(base, prefixtune=state.cards.base(len(state.registry.names())))
    return P.model_card(adapter, base, prefixtune=await run_in_threadpool(state.cards.adapter, adapter))


def _require_admin(state: AppState) -> None:
    if not state.settings.admin:
        raise APIError(403, "admin endpoints are disabled on this server (--no-admin)", "permission_error",
                       code="admin_disabled")


@admin_router.post("/v1/adapters", responses=S.LOAD)
async def load_adapter(body: P.LoadAdapterRequest, state: AppState = Depends(app_state)):
    _require_admin(state)
    return await run_in_threadpool(state.registry.load, body.name, body.path)


@admin_router.delete("/v1/adapters/{name}", responses=S.UNLOAD)
async def unload_adapter(name: str, state: AppState = Depends(app_state)):
    _require_admin(state)
    return await run_in_threadpool(state.registry.unload, name)
