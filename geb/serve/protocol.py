"""The OpenAI API as geb serves it: request models and their validation, errors, response bodies.

Requests are parsed by pydantic models that forbid unknown fields, so a misspelt parameter is a 400
naming it (as OpenAI's own API answers) rather than silently ignored. Types are strict (JSON `true`
is not an integer, `"10"` is not a number) and every value is bounded as OpenAI documents it (`seed`
to an unsigned 64-bit integer), so whatever reaches the engine is something it can run; `check_json`
refuses bodies nested too deep and strings that are not Unicode (lone UTF-16 surrogates). Parameters of the OpenAI API
that geb cannot honour (tools, logprobs, penalties, logit bias, JSON mode) are accepted only at their
neutral values. Unset sampling parameters take the model's release defaults (SamplingParams: GEB's
generation config), as vLLM does with a model's generation_config.json; `top_k`,
`repetition_penalty` and `ignore_eos` are accepted as extensions under vLLM's names.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from geb.infer.sampling import SamplingParams

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_N = 16
SEED_MAX = 2**64 - 1  # torch.Generator's seed range (unsigned 64 bits); the n choices wrap around it
# Floors far below any useful setting (temperature 0 is greedy decoding): a client asking for less has
# made a mistake worth a 400. The sampler itself is safe at any positive value (geb/infer/sampling.py).
MIN_TEMPERATURE = MIN_REPETITION_PENALTY = 1e-6
MAX_JSON_DEPTH = 64  # nesting levels of a request body (a chat request needs 5)
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's "\ud800" escapes decode to these; UTF-8 cannot hold them


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


def check_json(data: Any) -> None:
    """400 for a decoded body nested deeper than MAX_JSON_DEPTH, or holding a string (key or value)
    with a lone surrogate; iterative, so no body can exhaust the stack here."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                param = _param(path)
                raise invalid(f"Invalid value for '{param}': the string holds a lone UTF-16 surrogate "
                              "(\\ud800-\\udfff without its pair), which is not Unicode text.", param, "invalid_value")
        elif isinstance(v, (dict, list)):
            if len(path) >= MAX_JSON_DEPTH:
                raise invalid(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", _param(path[:1]),
                              "invalid_json")
            if isinstance(v, list):
                stack.extend((x, (*path, i)) for i, x in enumerate(v))
                continue
            for k, x in v.items():
                if _SURROGATE.search(k):
                    raise invalid(f"A key of '{_param(path) or 'the body'}' holds a lone UTF-16 surrogate, which is "
                                  "not Unicode text.", _param(path), "invalid_value")
                stack.append((x, (*path, k)))


def _param(path) -> str | None:
    """A location as OpenAI names parameters: messages.[0].content."""
    return ".".join(f"[{x}]" if isinstance(x, int) else x for x in path) or None


# -- requests ---------------------------------------------------------------------------------------
# strict: no bool or string where a number is expected, no number where a string is; finite floats only
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Open(BaseModel):
    # Clients echo back assistant messages as they received them (refusal, annotations, ...): allow extras.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # sent by newer clients; geb adds no padding anyway


class ContentPart(_Open):
    type: str
    text: str | None = None


class ChatMessage(_Open):
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
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY)
    ignore_eos: bool | None = False  # generate max_tokens whatever the model says (benchmarks)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if v is not None and 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy decoding) or at least {MIN_TEMPERATURE:g}")
        return v

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
            seed=None if self.seed is None else (self.seed + index) % (SEED_MAX + 1),
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
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    # OpenAI: up to 16 pairs, keys up to 64 characters, values up to 512
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = \
        Field(None, max_length=16)
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None

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
            if m.content is None and role != "assistant":  # OpenAI: only an assistant's content may be null
                raise invalid(f"Invalid value for 'messages.[{i}].content': a {m.role} message needs content (a "
                              "string or a list of text parts), not null.", f"messages.[{i}].content", "invalid_value")
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
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=20)

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


def _locate(data: Any, loc: tuple, missing: bool) -> tuple[list, bool]:
    """The body's path to an error from pydantic's loc, which also names the member of a union it tried
    ("str", "list[int]", ...): a step of loc is on the path when the body has it. (path, through a union?)"""
    path, union, cur = [], False, data
    for k, x in enumerate(loc):
        if isinstance(cur, dict) and x in cur:
            path.append(x)
            cur = cur[x]
        elif isinstance(cur, list) and isinstance(x, int) and 0 <= x < len(cur):
            path.append(x)
            cur = cur[x]
        elif missing and k == len(loc) - 1:
            path.append(x)
        else:
            union = True
    return path, union


def parse(model: type[BaseModel], data: Any):
    """Validate a decoded JSON body; a problem becomes a 400 naming the parameter, like OpenAI's API."""
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object")
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        path, union = _locate(data, err.get("loc", ()), err["type"] == "missing")
        param = _param(path)
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
