"""Server-sent events for streamed completions and chat: one write per wake-up, one chunk per choice."""

from __future__ import annotations

import json

from prefixtune.server import protocol as P
from prefixtune.server.jobs import FINISH, Job
from prefixtune.server.logprobs import Formatter
from prefixtune.server.protocol import APIError


def _sse(data) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


def _finish(out) -> str | None:
    return FINISH.get(out.finish_reason, out.finish_reason) if out.finish_reason else None


def stream_completion(job: Job, body: P.CompletionRequest, rid: str, created: int, prompts,
                      extra: Formatter | None = None):
    def choices(index: int, out) -> list[dict]:
        finish = _finish(out)
        text, logprobs = extra.completion(index, out.text, out) if extra is not None else (out.text, None)
        return [P.completion_choice(index, text, finish, logprobs)] if text or finish or logprobs else []

    return _stream(job, body, "text_completion", rid, created, sum(map(len, prompts)), choices, extra=extra)


def stream_chat(job: Job, body: P.ChatRequest, rid: str, created: int, prompt_tokens: int,
                extra: Formatter | None = None):
    def choices(index: int, out) -> list[dict]:
        logprobs = extra.chat(out) if extra is not None and (out.token_ids or out.stop_token is not None) else None
        text = [P.chat_delta(index, {"content": out.text}, None, logprobs)] if out.text or logprobs else []
        return text + ([P.chat_delta(index, {}, _finish(out))] if out.finish_reason else [])

    # OpenAI opens every choice with the role.
    opening = [P.chat_delta(index, {"role": "assistant", "content": ""}, None) for index in range(job.size)]
    return _stream(job, body, "chat.completion.chunk", rid, created, prompt_tokens, choices, opening, extra)


async def _stream(job: Job, body, kind: str, rid: str, created: int, prompt_tokens: int, choices_of,
                  opening: list[dict] = (), extra: Formatter | None = None):
    """Server-sent events of a streaming job: `choices_of(index, output)` gives an output's choice chunks."""
    tokens = [0] * job.size
    if opening:
        yield "".join(_sse(P.envelope(kind, rid, created, body.model, [choice])) for choice in opening)
    async for batch in job.merged():  # one write per wake-up, one chunk per choice however many steps it spans
        if extra is not None:
            await extra.prepare(out for _, out in batch)
        events, failed = [], False
        for index, out in batch:
            if out.error:
                code = getattr(out.error, "code", None)  # replica_lost: a Ray replica died, a retry will pass
                events.append(_sse(APIError(500, f"generation failed: {out.error}", "server_error", code=code).body()))
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
