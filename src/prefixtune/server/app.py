"""The OpenAI-compatible HTTP API over one PrefixLM and its Scheduler: `create_app(lm, scheduler, settings)`.

`model` in a request is the base model's id or an adapter name; rows of different adapters share the
scheduler's batches. Route handlers only validate, tokenize and format: generation runs on the worker thread.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from prefixtune.engine.sampling import SamplingParams
from prefixtune.engine.scheduler import Scheduler, cost
from prefixtune.server import protocol as P
from prefixtune.server.adapters import AdapterRegistry
from prefixtune.server.beams import beam_fields
from prefixtune.server.jobs import FINISH, EventStream, Job, check_errors
from prefixtune.server.metrics import CONTENT_TYPE, RequestMetricsMiddleware, ServerMetrics
from prefixtune.server.protocol import APIError
from prefixtune.server.security import ApiKeyMiddleware, BodyLimitMiddleware


@dataclass
class ServerSettings:
    """HTTP-side policy (batch and queue limits live on the Scheduler)."""

    model_name: str  # the base model's id in /v1/models and in requests
    host: str = "127.0.0.1"  # loopback unless asked otherwise
    port: int = 8000  # 0 = any free port
    api_key: str | None = None  # required as `Authorization: Bearer` on every endpoint but /health
    admin: bool = True  # POST /v1/adapters and DELETE /v1/adapters/{name}
    adapter_roots: list[Path] = field(default_factory=list)  # folders adapters may be loaded from by path
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_model_len: int | None = None  # virtual + prompt + new tokens per row; None = the model's limit
    max_tokens: int = 1024  # cap on max_tokens per choice
    # Per-request limits (each refused with a 400 naming it): every one bounds work a single request can cause.
    max_prompt_tokens: int | None = None  # tokens per prompt; None = max_model_len
    max_n: int = 16  # choices per prompt (each is a batch row)
    max_num_beams: int = 8  # beams per prompt (each is a batch row; server/beams.py)
    max_stop_strings: int = 4  # OpenAI's limit
    max_stop_chars: int = 256  # characters per stop string (matching cost per token grows with it)
    shutdown_timeout: float = 10.0  # seconds in-flight requests get to finish on shutdown


def model_limit(model) -> int | None:
    from prefixtune.models import max_positions

    return max_positions(model.config)


def create_app(lm, scheduler: Scheduler, settings: ServerSettings) -> FastAPI:
    max_len = settings.max_model_len or model_limit(lm.model) or 1 << 30
    base_ids = {settings.model_name, lm.loaded.name}
    registry = AdapterRegistry(lm, scheduler.lm_lock, base_ids, settings.adapter_roots,
                               getattr(scheduler, "adapter_changed", None))
    metrics = ServerMetrics(scheduler, registry.loaded, lambda: len(registry.names()))
    tokenizer = lm.tokenizer  # the text thread only (the engine decodes with its own copy)

    @asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.shutdown, settings.shutdown_timeout)
        registry.close()
        text_pool.shutdown(wait=False)

    app = FastAPI(title="prefixtune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry, app.state.metrics, app.state.scheduler = registry, metrics, scheduler

    # ---- errors in OpenAI's format -------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_req, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, err: RequestValidationError):
        problems = err.errors()
        if problems and problems[0].get("type") == "json_invalid":
            where = [p for p in problems[0].get("loc", ()) if p != "body"]
            at = f" at character {where[0]}" if where else ""
            return JSONResponse(P.error_body(f"the request body is not valid JSON{at}"), status_code=400)
        paths = [[str(p) for p in e.get("loc", ()) if p != "body"] for e in problems]
        message = "; ".join(f"{'.'.join(path) or 'body'}: {e.get('msg')}" for path, e in zip(paths, problems[:5]))
        param = paths[0][0] if paths and paths[0] else None  # the top-level field, as OpenAI names it
        return JSONResponse(P.error_body(message or "invalid request", param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, err: StarletteHTTPException):
        return JSONResponse(P.error_body(str(err.detail), code=str(err.status_code)), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_req, err: Exception):
        return JSONResponse(P.error_body(f"internal error: {type(err).__name__}: {err}", "server_error"),
                            status_code=500)

    # ---- info ------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        ok = scheduler.alive
        body = {"status": "ok" if ok else "unavailable", "model": settings.model_name,
                "waiting": scheduler.waiting, "running": scheduler.running}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models():
        await registry.refresh()
        cards = [P.model_card(settings.model_name)]
        cards += [P.model_card(name, parent=settings.model_name) for name in registry.names()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        adapter = await registry.resolve(model)
        return P.model_card(settings.model_name) if adapter is None else P.model_card(adapter, settings.model_name)

    # ---- admin -----------------------------------------------------------------------------------------
    def require_admin() -> None:
        if not settings.admin:
            raise APIError(403, "admin endpoints are disabled on this server (--no-admin)", "permission_error",
                           code="admin_disabled")

    @app.post("/v1/adapters")
    async def load_adapter(body: P.LoadAdapterRequest):
        require_admin()
        return await run_in_threadpool(registry.load, body.name, body.path)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        require_admin()
        return await run_in_threadpool(registry.unload, name)

    # ---- generation ------------------------------------------------------------------------------------
    def check_limits(body: P.SamplingBody, prompts: list[list[int]], prompt_field: str) -> None:
        def refuse(param: str, message: str) -> None:
            raise APIError(400, message, param=param, code="limit_exceeded")

        stops = body.stop or []
        if len(stops) > settings.max_stop_strings:
            refuse("stop", f"{len(stops)} stop strings; this server's limit max_stop_strings is "
                           f"{settings.max_stop_strings}")
        longest = max(map(len, stops), default=0)
        if longest > settings.max_stop_chars:
            refuse("stop", f"a stop string of {longest} characters; this server's limit max_stop_chars is "
                           f"{settings.max_stop_chars}")
        if body.n > settings.max_n:
            refuse("n", f"n={body.n}; this server's limit max_n is {settings.max_n}")
        limit = settings.max_prompt_tokens or max_len
        for p, ids in enumerate(prompts):
            if len(ids) > limit:
                refuse(prompt_field, f"prompt {p} has {len(ids)} tokens; this server's limit max_prompt_tokens "
                                     f"is {limit}")
        if body.n * len(prompts) > scheduler.max_queue:
            refuse("n", f"n x prompts = {body.n * len(prompts)} rows exceed this server's max_queue "
                        f"{scheduler.max_queue}")

    async def start_job(http: HTTPRequest, body: P.SamplingBody, prompts: list[list[int]], prompt_field: str,
                        max_tokens: int | None, default_tokens: int | None) -> Job:
        adapter = await registry.resolve(body.model)
        http.state.adapter = body.model  # metrics label, only once the model is known to be served
        check_limits(body, prompts, prompt_field)
        if max_tokens is not None and max_tokens > settings.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's cap {settings.max_tokens}",
                           param="max_tokens")
        beams = beam_fields(body, settings.max_num_beams, scheduler.max_batch)
        # Disk reads (a cold adapter, a guidance negative) happen on a worker thread, never on the loop. A
        # manifest's recommended guidance is for sampling: beams (checked above to ask for none) run without.
        prep = await run_in_threadpool(registry.prepare, adapter, 1.0 if beams else body.guidance_scale,
                                       body.guidance_negative)
        virtual = prep.virtual
        job = Job(scheduler, metrics.ttft.labels(adapter=body.model))
        for p, ids in enumerate(prompts):
            room = max_len - virtual - len(ids)
            if room < 1:
                raise APIError(400, f"prompt {p} has {len(ids)} tokens (+{virtual} virtual); max_model_len is "
                               f"{max_len}", param=prompt_field, code="context_length_exceeded")
            if max_tokens is not None and max_tokens > room:
                raise APIError(400, f"max_tokens {max_tokens} + {len(ids)} prompt + {virtual} virtual tokens "
                               f"exceed max_model_len {max_len}", param="max_tokens", code="context_length_exceeded")
            new = max_tokens if max_tokens is not None else min(default_tokens or room, room, settings.max_tokens)
            if beams is not None:  # one request: a group of num_beams rows whose n best beams are the choices
                job.add(ids, adapter, prep.prefix, SamplingParams(max_new_tokens=new, stop=list(body.stop or []),
                                                                  **beams))
                continue
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + p * body.n + j
                params = SamplingParams(
                    max_new_tokens=new, temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p, top_k=max(body.top_k or 0, 0),
                    min_p=body.min_p or 0.0, seed=seed,
                    stop=list(body.stop or []), ignore_eos=body.ignore_eos, guidance_scale=prep.guidance_scale,
                )
                job.add(ids, adapter, prep.prefix, params, prep.negative, prep.negative_prefix)
        # A request that could never fit (alone) is the client's error; one that fits later is a 429 (submit).
        need = sum(map(cost, job.requests))
        if need > scheduler.max_inflight_tokens:
            raise APIError(400, f"this request needs {need} tokens of batch room (prompt + max_tokens per row); "
                           f"this server's limit max_inflight_tokens is {scheduler.max_inflight_tokens}",
                           param="max_tokens", code="limit_exceeded")
        await job.submit()
        return job

    # Tokenizing a 1 MB prompt takes a while: it runs on one dedicated thread (a fast tokenizer must not be
    # used by two threads at once), so the event loop keeps serving streams meanwhile.
    text_pool = ThreadPoolExecutor(1, thread_name_prefix="prefixtune-tokenize")

    async def on_text_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(text_pool, fn, *args)

    def _encode(text: str, special: bool = True) -> list[int]:
        # As PrefixLM.generate encodes, so greedy outputs match offline ones: a chat template already
        # holds its special tokens (special=False), a plain prompt gets the tokenizer's usual ones.
        return list(tokenizer(text, add_special_tokens=special).input_ids)

    async def encode(text: str, special: bool = True, param: str = "prompt") -> list[int]:
        try:
            text.encode("utf-8")  # fields are checked on parsing; text built from them (task inputs) here
        except UnicodeEncodeError:
            raise APIError(400, "the text holds a lone UTF-16 surrogate (invalid Unicode); send valid UTF-8 text",
                           param=param) from None
        return await on_text_thread(_encode, text, special)

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, http: HTTPRequest):
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of must equal n (no server-side ranking)", param="best_of")
        prompts = []
        items = body.prompts()
        if body.inputs is not None:  # extension: the adapter's template filled from a row of fields
            from prefixtune.server.task_inputs import task_prompts

            await registry.resolve(body.model)  # 404 for an unknown model (the store re-listed if it changed)
            items = await run_in_threadpool(task_prompts, registry, body.model, body.inputs, items)
        for item in items:
            ids = await encode(item, param="inputs" if body.inputs is not None else "prompt") if isinstance(
                item, str) else list(item)
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            if any(not 0 <= t < len(tokenizer) for t in ids):
                raise APIError(400, f"prompt token ids must lie in [0, {len(tokenizer)})", param="prompt")
            prompts.append(ids)
        job = await start_job(http, body, prompts, "prompt", body.max_tokens, 16)
        rid, created = P.new_id("cmpl"), P.now()
        if body.stream:
            return EventStream(_stream_completion(job, body, rid, created, prompts), job)
        choices = await job.collect(http)
        check_errors(choices)
        out = [P.completion_choice(i, "".join(c.text), c.finish_reason) for i, c in enumerate(choices)]
        use = P.usage(sum(map(len, prompts)), sum(c.tokens for c in choices))
        return P.envelope("text_completion", rid, created, body.model, out, use)

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatRequest, http: HTTPRequest):
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"{settings.model_name} has no chat template; use /v1/completions",
                           param="messages")
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        try:
            text = await on_text_thread(partial(tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                                tokenize=False))
        except Exception as err:  # noqa: BLE001 - templates raise anything (e.g. jinja's TemplateError)
            raise APIError(400, f"chat template failed: {err}", param="messages") from err
        ids = await encode(text, special=False, param="messages")
        job = await start_job(http, body, [ids], "messages", body.new_tokens(), None)
        rid, created = P.new_id("chatcmpl"), P.now()
        if body.stream:
            return EventStream(_stream_chat(job, body, rid, created, len(ids)), job)
        choices = await job.collect(http)
        check_errors(choices)
        out = [P.chat_choice(i, "".join(c.text), c.finish_reason) for i, c in enumerate(choices)]
        use = P.usage(len(ids), sum(c.tokens for c in choices))
        return P.envelope("chat.completion", rid, created, body.model, out, use)

    # Outermost first: count every generation request, then authenticate, then bound the body.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app


def _sse(data) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


def _finish(out) -> str | None:
    return FINISH.get(out.finish_reason, out.finish_reason) if out.finish_reason else None


def _stream_completion(job: Job, body: P.CompletionRequest, rid: str, created: int, prompts):
    def choices(index: int, out) -> list[dict]:
        finish = _finish(out)
        return [P.completion_choice(index, out.text, finish)] if out.text or finish else []

    return _stream(job, body, "text_completion", rid, created, sum(map(len, prompts)), choices)


def _stream_chat(job: Job, body: P.ChatRequest, rid: str, created: int, prompt_tokens: int):
    def choices(index: int, out) -> list[dict]:
        text = [P.chat_delta(index, {"content": out.text}, None)] if out.text else []
        return text + ([P.chat_delta(index, {}, _finish(out))] if out.finish_reason else [])

    # OpenAI opens every choice with the role.
    opening = [P.chat_delta(index, {"role": "assistant", "content": ""}, None) for index in range(job.size)]
    return _stream(job, body, "chat.completion.chunk", rid, created, prompt_tokens, choices, opening)


async def _stream(job: Job, body, kind: str, rid: str, created: int, prompt_tokens: int, choices_of,
                  opening: list[dict] = ()):
    """Server-sent events of a streaming job: `choices_of(index, output)` gives an output's choice chunks."""
    tokens = [0] * job.size
    if opening:
        yield "".join(_sse(P.envelope(kind, rid, created, body.model, [choice])) for choice in opening)
    async for batch in job.merged():  # one write per wake-up, one chunk per choice however many steps it spans
        events, failed = [], False
        for index, out in batch:
            if out.error:
                events.append(_sse(APIError(500, f"generation failed: {out.error}", "server_error").body()))
                failed = True
                break
            tokens[index] = out.completion_tokens
            events.extend(_sse(P.envelope(kind, rid, created, body.model, [choice]))
                          for choice in choices_of(index, out))
        if events:
            yield "".join(events)
        if failed:
            break
    if body.include_usage():
        yield _sse(P.envelope(kind, rid, created, body.model, [], P.usage(prompt_tokens, sum(tokens))))
    yield _sse("[DONE]")
