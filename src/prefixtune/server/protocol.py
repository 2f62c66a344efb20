"""OpenAI request bodies (pydantic) and response/chunk builders, plus the OpenAI error format.

Unknown fields are rejected (a typo such as `max_token` fails loudly with the field named, as OpenAI does);
OpenAI fields we do not implement are accepted only at their neutral value. Types are strict, as OpenAI's:
`"stream": "yes"` or `"max_tokens": "5"` is a 400, not a silent coercion; NaN/Infinity are refused, and so is
any string holding a lone UTF-16 surrogate (`"\ud800"` parses in JSON but no tokenizer can encode it).
Size limits that depend on the server's settings (stop strings, prompt tokens, n) are checked in app.py.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's limit for top_logprobs; vLLM's default max_logprobs)


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after  # seconds, sent as Retry-After (a 503 that will pass)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _neutral(name: str, value: Any, neutral: tuple[Any, ...] = (None, 0, 0.0, False, {}, [])) -> Any:
    if value not in neutral:
        raise ValueError(f"{name} is not supported by this server")
    return value


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone UTF-16 surrogate (invalid Unicode); send valid UTF-8 text") from None
    return value


# Every free-text field: valid Unicode only, so tokenizers and logs never see what they cannot encode.
Text = Annotated[str, AfterValidator(_utf8)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False  # send a last chunk with token counts (choices empty)


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` extension: exactly one field (engine/structured.py)."""

    json_: dict[str, Any] | Text | None = Field(None, alias="json")  # a JSON schema (object or its JSON text)
    json_object: bool | None = None  # any JSON object
    regex: Text | None = None  # a regular expression the whole output matches
    choice: list[Text] | None = None  # the output is exactly one of these strings
    grammar: Text | None = None  # a grammar: GBNF (llama.cpp's EBNF, rule `root`) or Lark (rule `start`)


class JSONSchemaFormat(_Body):
    """OpenAI's response_format.json_schema (what `client.chat.completions.parse` sends)."""

    name: Text = Field(min_length=1, max_length=64)  # the schema's name (OpenAI requires it)
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # the JSON schema (None: any JSON object)
    strict: bool | None = None  # accepted: schemas are always enforced (no properties beyond the schema's)


class ResponseFormat(_Body):
    """OpenAI's response_format: text, any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None  # required with type json_schema


class SamplingBody(_Body):
    """Fields completions and chat share."""

    model: Text = Field(min_length=1)  # base model id or adapter name (see GET /v1/models)
    max_tokens: int | None = Field(None, ge=1)  # new tokens per choice
    temperature: float | None = Field(None, ge=0, le=2)  # 0 = greedy; None = 1 (OpenAI's default)
    top_p: float | None = Field(None, gt=0, le=1)  # nucleus mass
    top_k: int | None = Field(None, ge=-1)  # extension (as vLLM): -1 / 0 = off
    min_p: float | None = Field(None, ge=0, le=1)  # extension (as vLLM): drop tokens under min_p x the top one's
    n: int = Field(1, ge=1, le=128)  # choices per prompt
    seed: int | None = None  # reproducible sampling; choice i uses seed + i
    stop: Text | list[Text] | None = None  # stop strings, cut from the text (count/length limits: app.py)
    stream: bool = False  # server-sent events, OpenAI chunk format, ends with [DONE]
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (as vLLM): keep generating past EOS
    # Extensions: classifier-free guidance against an unconditioned row (engine/guidance.py). None = what the
    # adapter's manifest recommends (else off); 1 = off. The negative is an adapter name or "none" (base model).
    guidance_scale: float | None = Field(None, ge=0)
    guidance_negative: Text | None = None
    # Extensions: a composed model "a+b" (engine/compose.py): "guidance" (product of experts, the default) or
    # "concat" (prefixes side by side); per-adapter weights = each part's guidance scale, in the name's order.
    compose_mode: Literal["guidance", "concat"] | None = None
    compose_weights: list[Annotated[float, Field(ge=0)]] | None = None
    # Extensions: beam search (server/beams.py); the n best of num_beams beams are the choices. 1 = off.
    num_beams: int = Field(1, ge=1)
    length_penalty: float | None = Field(None, ge=-10, le=10)  # beams: score = log-prob sum / length ** this (1)
    no_repeat_ngram_size: int | None = Field(None, ge=0)  # beams: no n-gram of this size twice (0 = off)
    early_stopping: bool | None = None  # beams: end once num_beams hypotheses are finished (false)
    user: Text | None = None  # accepted and ignored
    # OpenAI's penalties on tokens already generated (engine/penalties.py) and its per-token logit bias
    # ({"token id": value}, -100 bans a token); vLLM's repetition_penalty (prompt and output tokens; 1 = off).
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=1024)
    structured_outputs: StructuredOutputs | None = None  # extension (as vLLM): the output must match this

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else list(value)
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        bad = next((k for k in value or {} if not (k.isascii() and k.isdigit())), None)
        if bad is not None:
            raise ValueError(f"logit_bias keys are token ids (as strings of digits), got {bad!r}")
        return value

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def token_logprobs(self) -> int | None:
        """Top alternatives per generated token's log-prob (None: none returned)."""
        return None

    def prompt_logprobs(self) -> int | None:
        """Top alternatives per prompt token's log-prob (None: the prompt is not scored)."""
        return None


class CompletionRequest(SamplingBody):
    """POST /v1/completions."""

    prompt: Text | list[Text] | list[int] | list[list[int]]  # text, texts, token ids, or lists of token ids
    max_tokens: int | None = Field(None, ge=0)  # new tokens per choice; 0 only with echo (scores the prompt)
    echo: bool = False  # the prompt before the completion (with logprobs: the prompt's log-probs, first null)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # each token's log-prob and its top N alternatives
    suffix: str | None = None  # only null
    # samples per prompt, the n with the most evidence returned (non-streamed); above n only for a composed
    # model in guidance mode (engine/compose.py: nothing else has a score to rank by)
    best_of: int | None = Field(None, ge=1, le=128)
    inputs: dict[str, Any] | None = None  # extension: a task adapter's input fields (filled into its template)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("suffix")
    @classmethod
    def _unsupported_completion(cls, value: Any, info) -> Any:
        return _neutral(info.field_name, value, (None, False))

    def token_logprobs(self) -> int | None:
        return self.logprobs

    def prompt_logprobs(self) -> int | None:
        # A pure scoring request (max_tokens 0) runs the prompt's log-probs even when they are not shown.
        return (self.logprobs or 0) if self.echo and (self.logprobs is not None or self.max_tokens == 0) else None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt as token ids
        return list(p)


class TextPart(_Body):
    type: Literal["text"]  # only text parts (no images or audio)
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(SamplingBody):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None  # each generated token's log-prob in choices[].logprobs.content
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # with logprobs: the top N alternatives per token
    tools: list[dict[str, Any]] | None = None  # only empty
    tool_choice: str | None = None  # only null / "none"
    response_format: ResponseFormat | None = None  # text, json_object or json_schema (server/controls.py)

    @field_validator("tools")
    @classmethod
    def _unsupported_chat(cls, value: Any, info) -> Any:
        return _neutral(info.field_name, value)

    def token_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value: str | None) -> str | None:
        return _neutral("tool_choice", value, (None, "none"))

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Body):
    """POST /tokenize (vLLM's shape): a prompt, or chat messages through the chat template."""

    model: Text | None = None  # checked to be served when given (every model shares the base's tokenizer)
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # None: true for a prompt, false for messages (as vLLM)
    add_generation_prompt: bool = True  # messages: end with the assistant's turn opening
    return_token_strs: bool = False  # also each token's text

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Body):
    """POST /detokenize (vLLM's shape)."""

    model: Text | None = None
    tokens: list[int]


class LoadAdapterRequest(_Body):
    """POST /v1/adapters: load `name` from the store, or from `path` (under an allowed root) as `name`."""

    name: Text = Field(min_length=1)
    path: Text | None = None


# ---- responses ------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None
                      ) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict[str, Any], finish_reason: str | None, logprobs: dict | None = None
               ) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def envelope(kind: str, rid: str, created: int, model: str, choices: list[dict[str, Any]],
             usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """A response or chunk: kind is text_completion | chat.completion | chat.completion.chunk."""
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, "usage": usage_}


def model_card(model_id: str, parent: str | None = None, **extra: Any) -> dict[str, Any]:
    card = {"id": model_id, "object": "model", "created": now(), "owned_by": "prefixtune"}
    if parent is not None:
        card["parent"] = parent  # adapters name their base model, as vLLM's LoRA cards do
        card["root"] = parent
    card.update(extra)
    return card
