"""The OpenAI API as geb serves it: request models and their validation, errors, response bodies.

Requests are parsed by pydantic models that forbid unknown fields, so a misspelt parameter is a 400
naming it (as OpenAI's own API answers) rather than silently ignored. Parameters of the OpenAI API
that geb cannot honour (tools, logprobs, penalties, logit bias, JSON mode) are accepted only at their
neutral values. Unset sampling parameters take the model's release defaults (SamplingParams: GEB's
generation config), as vLLM does with a model's generation_config.json; `top_k`,
`repetition_penalty` and `ignore_eos` are accepted as extensions under vLLM's names.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from geb.infer.sampling import SamplingParams

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_N = 16
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES: ClassVar[dict[int, str]] = {429: "rate_limit_exceeded", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# -- requests ---------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # sent by newer clients; geb adds no padding anyway


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # Clients echo back assistant messages as they received them (refusal, annotations, ...): allow extras.
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list | None = None


class _Common(_Strict):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = False  # generate max_tokens whatever the model says (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        return v

    def stops(self) -> list[str]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [x for x in s if x]

    def unsupported(self) -> list[tuple[str, Any]]:
        """(param, value) pairs set to something geb cannot do."""
        bad = [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        bad = [(k, v) for k, v in bad if v]
        if self.logit_bias:
            bad.append(("logit_bias", self.logit_bias))
        return bad

    def sampling(self, max_new_tokens: int, index: int = 0) -> SamplingParams:
        d = SamplingParams()
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_p=d.top_p if self.top_p is None else self.top_p,
            top_k=d.top_k if self.top_k is None else self.top_k,
            repetition_penalty=d.repetition_penalty if self.repetition_penalty is None else self.repetition_penalty,
            # n choices from one seed must differ from each other yet stay reproducible
            seed=None if self.seed is None else self.seed + index,
            stop=self.stops(),
            stop_ids=[] if self.ignore_eos else None,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None
    function_call: Any = None
    response_format: dict | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self):
        bad = super().unsupported()
        if self.logprobs or self.top_logprobs:
            bad.append(("logprobs", True))
        for k in ("tools", "functions"):
            if getattr(self, k):
                bad.append((k, "function calling"))
        if self.tool_choice not in (None, "none", "auto") or self.function_call not in (None, "none", "auto"):
            bad.append(("tool_choice", self.tool_choice or self.function_call))
        if self.response_format and self.response_format.get("type") != "text":
            bad.append(("response_format", self.response_format.get("type")))
        return bad

    def conversation(self) -> list[dict]:
        """Messages as geb's chat template takes them: {"role", "content"} with plain text."""
        out = []
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            if role not in ("system", "user", "assistant"):
                raise invalid(f"messages[{i}].role: '{m.role}' is not supported (use system, developer, user "
                              "or assistant)", f"messages.[{i}].role")
            if m.tool_calls:
                raise invalid(f"messages[{i}]: tool calls are not supported", f"messages.[{i}].tool_calls")
            if m.content is None or isinstance(m.content, str):
                text = m.content or ""
            else:
                parts = []
                for j, part in enumerate(m.content):
                    if part.type != "text" or part.text is None:
                        raise invalid(f"messages[{i}].content[{j}]: content of type '{part.type}' is not "
                                      "supported (this model reads text)", f"messages.[{i}].content.[{j}].type")
                    parts.append(part.text)
                text = "".join(parts)
            out.append({"role": role, "content": text})
        return out


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = Field(None, ge=1)

    @property
    def limit(self) -> int | None:
        return self.max_tokens

    def unsupported(self):
        bad = super().unsupported()
        if self.suffix:
            bad.append(("suffix", "insertion"))
        if self.logprobs is not None:
            bad.append(("logprobs", self.logprobs))
        if self.best_of not in (None, 1, self.n or 1):
            bad.append(("best_of", self.best_of))
        return bad

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        if not p:
            raise invalid("prompt: must not be empty", "prompt")
        return list(p)


def parse(model: type[BaseModel], data: Any):
    """Validate a decoded JSON body; a problem becomes a 400 naming the parameter, like OpenAI's API."""
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object")
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        path, union = [], False
        for x in err.get("loc", ()):
            if isinstance(x, int):
                path.append(f"[{x}]")
            elif x.isidentifier() and x.islower() and x not in _TYPE_TAGS:
                path.append(x)
            else:  # pydantic names the member of a union it tried ("str", "list[int]", ...)
                union = True
        param = ".".join(path) or None
        if err["type"] == "extra_forbidden":
            raise invalid(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
        if err["type"] == "missing":
            raise invalid(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
        msg = "it has the wrong type" if union else err["msg"].removeprefix("Value error, ")
        raise invalid(f"Invalid value for '{param}': {msg}.", param, "invalid_value")
    bad = req.unsupported()
    if bad:
        k, v = bad[0]
        raise invalid(f"'{k}' is not supported by this server (got {v!r}).", k, "unsupported_parameter")
    return req


# -- responses --------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_body(rid: str, created: int, model: str, choices: list[tuple[str, str]], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish} for i, (text, finish) in enumerate(choices)],
            "usage": use}


def chat_chunk(rid: str, created: int, model: str, index: int | None, delta: dict | None = None,
               finish: str | None = None, use: dict | None = None, with_usage: bool = False) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [] if index is None else [{"index": index, "delta": delta or {}, "logprobs": None,
                                                  "finish_reason": finish}]}
    if with_usage:  # OpenAI: null in every chunk but the last when usage was asked for
        body["usage"] = use
    return body


def completion_body(rid: str, created: int, model: str, choices: list[tuple[str, str]], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                        for i, (text, finish) in enumerate(choices)],
            "usage": use}


def completion_chunk(rid: str, created: int, model: str, index: int | None, text: str = "",
                     finish: str | None = None, use: dict | None = None, with_usage: bool = False) -> dict:
    body = {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": [] if index is None else [{"index": index, "text": text, "logprobs": None,
                                                  "finish_reason": finish}]}
    if with_usage:
        body["usage"] = use
    return body
