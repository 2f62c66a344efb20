"""POST /v1/completions and /v1/chat/completions."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest

from prefixtune.server import protocol as P
from prefixtune.server import schemas as S
from prefixtune.server.jobs import EventStream, check_errors
from prefixtune.server.protocol import APIError
from prefixtune.server.state import AppState, app_state
from prefixtune.server.streaming import stream_chat, stream_completion

completions_router = APIRouter()
chat_router = APIRouter()


async def _prompt_ids(state: AppState, body: P.CompletionRequest) -> list[list[int]]:
    """Each prompt as token ids: text tokenized on the text thread, task inputs filled into the template."""
    items = body.prompts()
    if body.inputs is not None:  # extension: the adapter's template filled from a row of fields
        from prefixtune.server.task_inputs import task_prompts

        await state.registry.resolve(body.model)  # 404 for an unknown model (the store re-listed if it changed)
        items = await run_in_threadpool(task_prompts, state.registry, body.model, body.inputs, items)
    vocab = len(state.tokenizer)
    prompts = []
    for item in items:
        ids = await state.encode(item, param="inputs" if body.inputs is not None else "prompt") if isinstance(
            item, str) else list(item)
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        prompts.append(ids)
    return prompts


@completions_router.post("/v1/completions", responses=S.generation(S.CompletionResponse))
async def completions(body: P.CompletionRequest, http: HTTPRequest, state: AppState = Depends(app_state)):
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of must equal n (no server-side ranking)", param="best_of")
    prompts = await _prompt_ids(state, body)
    job = await state.start_job(http, body, prompts, "prompt", body.max_tokens, 16)
    rid, created = P.new_id("cmpl"), P.now()
    if body.stream:
        return EventStream(stream_completion(job, body, rid, created, prompts), job)
    choices = await job.collect(http)
    check_errors(choices)
    out = [P.completion_choice(i, "".join(c.text), c.finish_reason) for i, c in enumerate(choices)]
    use = P.usage(sum(map(len, prompts)), sum(c.tokens for c in choices))
    return P.envelope("text_completion", rid, created, body.model, out, use)


@chat_router.post("/v1/chat/completions", responses=S.generation(S.ChatCompletionResponse))
async def chat(body: P.ChatRequest, http: HTTPRequest, state: AppState = Depends(app_state)):
    tokenizer = state.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"{state.settings.model_name} has no chat template; use /v1/completions",
                       param="messages")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                for m in body.messages]
    try:
        text = await state.on_text_thread(partial(tokenizer.apply_chat_template, messages,
                                                  add_generation_prompt=True, tokenize=False))
    except Exception as err:  # noqa: BLE001 - templates raise anything (e.g. jinja's TemplateError)
        raise APIError(400, f"chat template failed: {err}", param="messages") from err
    ids = await state.encode(text, special=False, param="messages")
    job = await state.start_job(http, body, [ids], "messages", body.new_tokens(), None)
    rid, created = P.new_id("chatcmpl"), P.now()
    if body.stream:
        return EventStream(stream_chat(job, body, rid, created, len(ids)), job)
    choices = await job.collect(http)
    check_errors(choices)
    out = [P.chat_choice(i, "".join(c.text), c.finish_reason) for i, c in enumerate(choices)]
    use = P.usage(len(ids), sum(c.tokens for c in choices))
    return P.envelope("chat.completion", rid, created, body.model, out, use)
