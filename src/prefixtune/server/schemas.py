"""Response bodies for /openapi.json: what each route answers, per status, as pydantic models.

Only documentation: the routes build plain dicts (protocol.py) and FastAPI never re-validates them, so serving
costs nothing extra; tests/server/test_openapi.py runs schemathesis, which checks every response against these.
The request bodies are protocol.py's own models (extension fields included): the schema is what is enforced.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error | permission_error | rate_limit_error | server_error
    param: str | None
    code: str | None  # e.g. model_not_found, limit_exceeded, adapter_damaged


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format (server/logprobs.py); with echo the prompt's tokens come first (the first null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]  # the top N and the token itself
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None  # stop | length | error


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = None  # adapters: the base model
    root: str | None = None
    # Extension: {"kind": "base", "adapters"} or {"kind": "prefix", "base_model", "template", "label", "labels",
    # "fields", "num_virtual_tokens", "guidance"} from the adapter's manifest (server/model_cards.py).
    prefixtune: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class LoadedAdapter(BaseModel):
    id: str
    object: Literal["model"]
    num_virtual_tokens: int
    load_ms: float
    source: str


class UnloadedAdapter(BaseModel):
    id: str
    object: Literal["model"]
    deleted: Literal[True]


class Tokenized(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class Detokenized(BaseModel):
    prompt: str


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str
    waiting: int
    running: int


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


AUTH = {401: _error("missing or wrong API key (--api-key)")}
BODY = {400: _error("invalid request: the field is named in `param`"),
        413: _error("request body over --max-body-bytes")}
ADMIN = {403: _error("admin endpoints disabled (--no-admin), or a path outside --adapter-root"),
         503: _error("the engine process did not take the change")}
# `stream: true`: server-sent events; before OpenAPI 3.2 `schema` describes one event. Each event's data is a
# JSON chunk (OpenAI's chunk format), the last one `[DONE]`.
_STREAM = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE] at the end"}}}}}


def generation(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "content": _STREAM}, **BODY, **AUTH,
            404: _error("`model` is neither the base model nor a served adapter"),
            429: _error("queue full or batch room exhausted: retry later"),
            500: _error("a served adapter's files are damaged (code adapter_damaged), or an internal error"),
            503: _error("the server is shutting down or the engine is gone")}


MODELS = {200: {"model": ModelList}, **AUTH}
MODEL = {200: {"model": ModelCard}, 404: _error("not served"), **AUTH}
LOAD = {200: {"model": LoadedAdapter}, **BODY, **AUTH, **ADMIN, 404: _error("no such adapter in the store"),
        409: _error("the folder changed while it was loaded: retry")}
UNLOAD = {200: {"model": UnloadedAdapter}, **AUTH, **ADMIN, 404: _error("not served")}
TOKENIZE = {200: {"model": Tokenized}, **BODY, **AUTH, 404: _error("`model` is not served")}
DETOKENIZE = {200: {"model": Detokenized}, **BODY, **AUTH, 404: _error("`model` is not served")}
HEALTH = {200: {"model": Health}, 503: {"model": Health, "description": "the engine is not running"}}
METRICS = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"},
           **AUTH}


def without_422(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents its 422 for every body; this server answers invalid bodies 400 (OpenAI's format)."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema
