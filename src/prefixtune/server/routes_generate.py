"""POST /v1/completions and /v1/chat/completions."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest

from prefixtune.engine.generation import keep_best
from prefixtune.server import protocol as P
from prefixtune.server import schemas as S
from prefixtune.server.compose import samples_per_prompt
from prefixtune.server.jobs import EventStream, check_errors
from prefixtune.server.logprobs import Formatter, legacy
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
    per = samples_per_prompt(body)
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 generates nothing: it is only for scoring a prompt with echo: true",
                       param="max_tokens")
    prompts = await _prompt_ids(state, body)
    extra = await Formatter.create(state, body, prompts)  # logprobs and echo (server/logprobs.py); else None
    job = await state.start_job(http, body, prompts, "prompt", body.max_tokens, 16, per)
    rid, created = P.new_id("cmpl"), P.now()
    if body.stream:
        return EventStream(stream_completion(job, body, rid, created, prompts, extra), job)
    drawn = await job.collect(http)
    check_errors(drawn)
    choices = drawn if per == body.n else keep_best(drawn, per, body.n)  # best first within each prompt
    out = [P.completion_choice(i, "".join(c.text), c.finish_reason) for i, c in enumerate(choices)]
    if extra is not None:
        await extra.prepare(choices)
        for i, (c, choice) in enumerate(zip(choices, out)):
            choice["text"], choice["logprobs"] = extra.completion(i, choice["text"], c)
            if extra.top is not None and choice["logprobs"] is None:  # asked for, and nothing generated
                choice["logprobs"] = legacy({}, [], [])
    use = P.usage(sum(map(len, prompts)), sum(c.tokens for c in drawn))  # best_of: every sample drawn counts
    return P.envelope("text_completion", rid, created, body.model, out, use)


async def chat_ids(state: AppState, messages: list[P.ChatMessage], add_generation_prompt: bool = True,
                   special: bool = False) -> list[int]:
    """The messages through the model's chat template, as token ids (the template holds its special tokens)."""
    tokenizer = state.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"{state.settings.model_name} has no chat template; use /v1/completions",
                       param="messages")
    turns = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
    try:
        text = await state.on_text_thread(partial(tokenizer.apply_chat_template, turns,
                                                  add_generation_prompt=add_generation_prompt, tokenize=False))
    except Exception as err:  # noqa: BLE001 - templates raise anything (e.g. jinja's TemplateError)
        raise APIError(400, f"chat template failed: {err}", param="messages") from err
    return await state.encode(text, special=special, param="messages")


@chat_router.post("/v1/chat/completions", responses=S.generation(S.ChatCompletionResponse))
async def chat(body: P.ChatRequest, http: HTTPRequest, state: AppState = Depends(app_state)):
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    ids = await chat_ids(state, body.messages)
    extra = await Formatter.create(state, body, [ids])
    job = await state.start_job(http, body, [ids], "messages", body.new_tokens(), None)
    rid, created = P.new_id("chatcmpl"), P.now()
    if body.stream:
        return EventStream(stream_chat(job, body, rid, created, len(ids), extra), job)
    choices = await job.collect(http)
    check_errors(choices)
    if extra is not None:
        await extra.prepare(choices)
    out = [P.chat_choice(i, "".join(c.text), c.finish_reason, extra and extra.chat(c)) for i, c in enumerate(choices)]
    use = P.usage(len(ids), sum(c.tokens for c in choices))
    return P.envelope("chat.completion", rid, created, body.model, out, use)
