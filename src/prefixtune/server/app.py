"""The OpenAI-compatible HTTP API over one PrefixLM and its Scheduler: `create_app(lm, scheduler, settings)`.

`model` in a request is the base model's id or an adapter name; rows of different adapters share the
scheduler's batches. The routes live in routers (routes_generate: completions and chat; routes_admin: health,
metrics, models and adapters) over one `AppState` (state.py); they only validate, tokenize and format:
generation runs in the engine.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefixtune.engine.scheduler import Scheduler
from prefixtune.server import protocol as P
from prefixtune.server import schemas as S
from prefixtune.server.adapters import AdapterRegistry
from prefixtune.server.metrics import RequestMetricsMiddleware, ServerMetrics
from prefixtune.server.protocol import APIError
from prefixtune.server.routes_admin import admin_router, health_router
from prefixtune.server.routes_generate import chat_router, completions_router
from prefixtune.server.routes_tokens import tokens_router
from prefixtune.server.security import ApiKeyMiddleware, BodyLimitMiddleware
from prefixtune.server.state import AppState, ServerSettings
from prefixtune.version import __version__

__all__ = ["AppState", "ServerSettings", "create_app", "model_limit"]


def model_limit(model) -> int | None:
    from prefixtune.models import max_positions

    return max_positions(model.config)


def _invalid_body(err: RequestValidationError) -> JSONResponse:
    problems = err.errors()
    if problems and problems[0].get("type") == "json_invalid":
        where = [p for p in problems[0].get("loc", ()) if p != "body"]
        at = f" at character {where[0]}" if where else ""
        return JSONResponse(P.error_body(f"the request body is not valid JSON{at}"), status_code=400)
    paths = [[str(p) for p in e.get("loc", ()) if p != "body"] for e in problems]
    message = "; ".join(f"{'.'.join(path) or 'body'}: {e.get('msg')}" for path, e in zip(paths, problems[:5]))
    param = paths[0][0] if paths and paths[0] else None  # the top-level field, as OpenAI names it
    return JSONResponse(P.error_body(message or "invalid request", param=param), status_code=400)


def _openai_errors(app: FastAPI) -> None:
    """Every error in OpenAI's format."""

    @app.exception_handler(APIError)
    async def _api_error(_req, err: APIError):
        headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, err: RequestValidationError):
        return _invalid_body(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, err: StarletteHTTPException):
        return JSONResponse(P.error_body(str(err.detail), code=str(err.status_code)), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_req, err: Exception):
        return JSONResponse(P.error_body(f"internal error: {type(err).__name__}: {err}", "server_error"),
                            status_code=500)


def _describe(app: FastAPI) -> None:
    """The schema FastAPI generates from the routes' request models and schemas.py's responses, built once."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = S.without_422(get_openapi(
                title=app.title, version=app.version, routes=app.routes,
                description="OpenAI-compatible completions and chat over a base model and its prefix adapters "
                            "(model = adapter name); extension fields are marked in docs/SERVING.md."))
        return app.openapi_schema

    app.openapi = openapi


def create_app(lm, scheduler: Scheduler, settings: ServerSettings) -> FastAPI:
    lm.max_compose = settings.max_compose
    registry = AdapterRegistry(lm, scheduler.lm_lock, {settings.model_name, lm.loaded.name},
                               settings.adapter_roots, getattr(scheduler, "adapter_changed", None))
    metrics = ServerMetrics(scheduler, registry.loaded, lambda: len(registry.names()))
    max_len = settings.max_model_len or model_limit(lm.model) or 1 << 30
    state = AppState(lm, scheduler, settings, registry, metrics, max_len)

    @asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.shutdown, settings.shutdown_timeout)
        registry.close()
        state.text_pool.shutdown(wait=False)

    docs = settings.docs  # /openapi.json and /docs, as vLLM serves them (`--no-docs` turns both off)
    app = FastAPI(title="prefixtune", version=__version__, lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url=None, openapi_url="/openapi.json" if docs else None)
    _describe(app)
    app.state.prefixtune = state
    app.state.registry, app.state.metrics, app.state.scheduler = registry, metrics, scheduler
    _openai_errors(app)
    for router in (health_router, admin_router, completions_router, chat_router, tokens_router):
        app.include_router(router)
    # Outermost first: count every generation request, then authenticate, then bound the body.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app
