"""The HTTP server: a FastAPI app speaking the OpenAI API over one continuous-batching engine.

`create_app(settings)` builds the app from the module-level route handlers, which read a `State`
(`app.state.geb`); its startup loads the model on a background thread, so the
port answers at once (503 "loading" until the engine is ready). `run_server(settings)` runs it under
uvicorn. Every /v1 route checks, in order: the API key (401), readiness (503), the body size (413),
the JSON and its fields (400, geb.serve.protocol), the model name (404), the prompt and token limits
(400), and room in the queue (429). Streams are server-sent events ending with `data: [DONE]`; a
client that disconnects (stream or not) cancels its requests, which frees their batch slots at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import sys
import threading
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from geb.errors import GebError
from geb.serve.protocol import (
    MAX_JSON_DEPTH,
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    check_json,
    completion_body,
    completion_chunk,
    invalid,
    new_id,
    now,
    parse,
    usage,
)
from geb.serve.scheduler import Busy, Scheduler, Ticket

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
DRAIN_LIMIT = 64 << 20  # an oversized body is read and dropped up to this much, so the client sees the 413


@dataclass
class ServerSettings:
    model: str
    format: str | None = None  # None: a quantized folder's own format, else fp32
    model_name: str | None = None  # None: the folder's name
    api_key: str | None = None
    max_concurrency: int = 8  # batch slots
    max_waiting: int | None = None  # queued beyond the slots before 429 (None: 4 x slots)
    max_tokens: int | None = None  # per request (None: min(512, context - 1))
    max_prompt_tokens: int | None = None  # None: context - 1
    max_body_bytes: int = 1 << 20
    threads: int | None = None
    url: str = ""  # where it listens, for the ready message

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model).resolve().name


class State:
    """What the routes read: loading/ready/error, the engine's scheduler and the resolved limits."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.status = "loading"
        self.error: str | None = None
        self.scheduler: Scheduler | None = None
        self.tok = None
        self.info: dict = {}
        self.max_tokens = self.max_prompt = self.context = 0
        self.on_fatal = None  # set by run_server: stop uvicorn when the model cannot load
        self.created = now()

    def load(self, engine_factory=None) -> None:
        s = self.settings
        try:
            say(f"loading {s.model} ...")
            if engine_factory is None:
                from geb.infer.engine import Engine

                engine = Engine.from_folder(s.model, format=s.format, threads=s.threads)
            else:
                engine = engine_factory()
            ctx = engine.cfg.max_seq_len
            max_tokens = s.max_tokens if s.max_tokens is not None else min(512, ctx - 1)
            max_prompt = s.max_prompt_tokens if s.max_prompt_tokens is not None else ctx - 1
            if not 1 <= max_tokens <= ctx - 1:
                raise GebError(f"--max-tokens {max_tokens}: must be between 1 and the model's context - 1 ({ctx - 1})")
            if not 1 <= max_prompt <= ctx - 1:
                raise GebError(f"--max-prompt-tokens {max_prompt}: must be between 1 and the model's context - 1 "
                               f"({ctx - 1})")
            if s.max_concurrency < 1:
                raise GebError(f"--max-concurrency {s.max_concurrency}: must be at least 1")
            context = min(ctx, max_prompt + max_tokens)  # KV cache positions per slot
            waiting = s.max_waiting if s.max_waiting is not None else 4 * s.max_concurrency
            sched = Scheduler(engine, s.max_concurrency, context, max(0, waiting))
            sched.start()
            self.tok, self.max_tokens, self.max_prompt, self.context = engine.tok, max_tokens, max_prompt, context
            cache_mb = sched.be.cache.nbytes / 2**20
            self.info = {"format": engine.fmt, "context": ctx, "slots": s.max_concurrency,
                         "kv_cache_mib": round(cache_mb, 1)}
            self.scheduler, self.status = sched, "ready"
            say(f"ready: {s.url or 'serving'} model '{s.name}' ({engine.fmt}), {s.max_concurrency} slots x "
                f"{context} positions ({cache_mb:.0f} MiB KV cache), max {max_tokens} new tokens, "
                f"max {max_prompt} prompt tokens")
        except Exception as e:  # noqa: BLE001 - any load failure ends the server with its message
            self.error = str(e) if isinstance(e, GebError) else f"{type(e).__name__}: {e}"
            self.status = "error"
            if not isinstance(e, GebError):
                traceback.print_exc()
            say(f"error: {self.error}")
            if self.on_fatal:
                self.on_fatal()

    def require_ready(self) -> Scheduler:
        if self.status == "ready":
            return self.scheduler
        if self.status == "loading":
            raise APIError(503, "The model is still loading; retry shortly.", code="model_loading",
                           headers={"Retry-After": "2"})
        raise APIError(503, f"The model failed to load: {self.error}", code="model_load_failed")


def say(msg: str) -> None:
    print(f"geb serve: {msg}", file=sys.stderr, flush=True)


# -- request plumbing -------------------------------------------------------------------------------
async def read_json(request: Request, limit: int):
    """The body as JSON; 413 past `limit` bytes (declared or streamed), 400 when it is not JSON."""
    too_big = APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                       code="request_too_large")
    declared = request.headers.get("content-length", "")
    buf, seen = bytearray(), 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen <= limit and not (declared.isdigit() and int(declared) > limit):
                buf += chunk
            elif seen > DRAIN_LIMIT:
                break
    except ClientDisconnect:  # gone before its body was sent: nobody reads the answer
        raise APIError(400, "The client closed the connection before sending the whole body.",
                       code="client_disconnected") from None
    if seen > limit or (declared.isdigit() and int(declared) > limit):
        raise too_big
    try:
        data = json.loads(buf, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:  # UnicodeDecodeError: not UTF-8
        raise invalid(f"We could not parse the JSON body of your request ({e}). The OpenAI API expects a "
                      "JSON payload.", code="invalid_json") from None
    except RecursionError:  # json's C parser counts its nesting against Python's recursion limit
        raise invalid(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json") from None
    check_json(data)
    return data


def _no_constant(name: str):
    """Python's json reads NaN and Infinity, which JSON does not have."""
    raise ValueError(f"{name} is not a JSON value")


async def wait_disconnect(request: Request) -> None:
    """Return when the client goes away (the body has been read; uvicorn then only reports that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """Server-sent events that always watch for the client leaving, then run `on_close` (cancel)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tg:
                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the socket broke under us: the same as a disconnect
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self.on_close()


# Line breaks that JSON leaves raw but line splitters (Python's splitlines, httpx's iter_lines) honour:
# escaped, so an event is always one line. Other text stays raw UTF-8 (Chinese at 3 bytes, not 6).
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


# -- the app ----------------------------------------------------------------------------------------
def create_app(settings: ServerSettings, engine_factory=None) -> FastAPI:
    """The app; the model loads on a thread when it starts (settings.model, or `engine_factory()`).
    The routes are the module-level handlers below; each reads the app's State (`app.state.geb`)."""
    state = State(settings)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load, args=(engine_factory,), name="geb-load", daemon=True).start()
        yield
        if state.scheduler is not None:
            await anyio.to_thread.run_sync(state.scheduler.stop)

    app = FastAPI(title="geb", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.geb = state
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _crash)
    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    return app


def _state(request: Request) -> State:
    return request.app.state.geb


# -- errors as OpenAI-shaped JSON ----------------------------------------------------------------------
async def _api_error(request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _http_error(request, e: StarletteHTTPException):
    err = APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))


async def _crash(request, e: Exception):
    traceback.print_exc()
    return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)


def authorize(request: Request) -> None:
    key = _state(request).settings.api_key
    if not key:
        return
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Incorrect API key provided." if got else
                       "You didn't provide an API key (Authorization: Bearer KEY).", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def check_model(state: State, name: str) -> None:
    if name != state.settings.name:
        raise APIError(404, f"The model '{name}' does not exist (this server has '{state.settings.name}').",
                       "model", "model_not_found")


def model_card(state: State) -> dict:
    return {"id": state.settings.name, "object": "model", "created": state.created, "owned_by": "geb"}


# -- routes --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _page() -> bytes:
    return resources.files("geb.serve").joinpath("static", "chat.html").read_bytes()


async def index():
    return HTMLResponse(_page())


async def health(request: Request):
    state = _state(request)
    body = {"status": state.status, "model": state.settings.name}
    if state.status == "ready":
        return {**body, **state.info, **state.scheduler.stats()}
    if state.error:
        body["error"] = state.error
    return JSONResponse(body, status_code=503)


async def models(request: Request):
    authorize(request)
    return {"object": "list", "data": [model_card(_state(request))]}


async def model(model_id: str, request: Request):
    authorize(request)
    check_model(_state(request), model_id)
    return model_card(_state(request))


async def _admit(request: Request, kind):
    """The checks every generating route makes first (key, readiness, body, model): (state, scheduler, request)."""
    authorize(request)
    state = _state(request)
    sched = state.require_ready()
    req = parse(kind, await read_json(request, state.settings.max_body_bytes))
    check_model(state, req.model)
    return state, sched, req


async def chat_completions(request: Request):
    state, sched, req = await _admit(request, ChatRequest)
    try:
        ids, _ = state.tok.render_chat(req.conversation(), add_generation_prompt=True)
    except GebError as e:
        raise invalid(str(e), "messages") from None
    return await respond(request, state, sched, req, [ids], chat=True)


async def completions(request: Request):
    state, sched, req = await _admit(request, CompletionRequest)
    prompts, texts = [], []
    vocab = state.tok.vocab_size
    for i, p in enumerate(req.prompts()):
        if isinstance(p, str):
            ids, text = state.tok.encode(p), p
        else:
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                raise invalid(f"prompt[{i}]: token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt")
            ids, text = list(p), state.tok.decode(p)
        prompts.append(ids or [state.tok.doc_id])  # an empty prompt starts a new document
        texts.append(text)
    return await respond(request, state, sched, req, prompts, chat=False, echo=texts if req.echo else None)


def budgets(state: State, sched: Scheduler, req, prompts: list[list[int]], chat: bool) -> list[int]:
    """Tokens each prompt may generate, after checking the request against the server's limits (400)."""
    n = req.n or 1
    if len(prompts) * n > sched.slots:
        raise invalid(f"{len(prompts)} prompt(s) x n={n} is more than this server's {sched.slots} batch "
                      "slots (--max-concurrency)", "n")
    for ids in prompts:
        if len(ids) > state.max_prompt:
            raise invalid(f"This model's prompt limit is {state.max_prompt} tokens, but the prompt has "
                          f"{len(ids)} tokens (--max-prompt-tokens).", "messages" if chat else "prompt",
                          "context_length_exceeded")
    limit = req.limit
    if limit is not None and limit > state.max_tokens:
        raise invalid(f"max_tokens is {limit}, but this server generates at most {state.max_tokens} tokens "
                      "per request (--max-tokens).", "max_tokens", "invalid_value")
    out = []
    for ids in prompts:
        room = state.context - len(ids)
        if limit is not None and limit > room:
            raise invalid(f"This server's context is {state.context} tokens, but you requested "
                          f"{len(ids) + limit} tokens ({len(ids)} in the prompt, {limit} to generate).",
                          "max_tokens", "context_length_exceeded")
        default = state.max_tokens if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
        out.append(limit if limit is not None else min(default, room))
    return out


async def respond(request: Request, state: State, sched: Scheduler, req, prompts: list[list[int]], chat: bool,
                  echo: list[str] | None = None):
    """Submit the prompts (n choices each) and answer: a stream of events, or one body when all are done."""
    n = req.n or 1
    jobs = [(ids, req.sampling(b, j)) for ids, b in zip(prompts, budgets(state, sched, req, prompts, chat))
            for j in range(n)]
    try:
        ticket = sched.submit(jobs, new_id("req"))
    except Busy as e:
        raise APIError(429, f"The server is busy: {e}. Retry shortly.", code="rate_limit_exceeded",
                       headers={"Retry-After": "1"}) from None
    except GebError as e:  # the engine refuses the prompt (the checks above should have caught it)
        raise invalid(str(e), "messages" if chat else "prompt") from None
    rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
    prompt_tokens = sum(len(ids) for ids in prompts)  # once per prompt, not per choice (as OpenAI counts)
    model = state.settings.name
    if req.stream:
        gen = (stream_chat(ticket, model, rid, created, req, prompt_tokens) if chat
               else stream_text(ticket, model, rid, created, req, prompt_tokens, echo, n))
        return EventStream(gen, ticket.cancel)
    texts = [""] * len(jobs)
    collect = asyncio.ensure_future(_collect(ticket, texts))
    gone = asyncio.ensure_future(wait_disconnect(request))
    left = True
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        left = not collect.done()
    finally:
        gone.cancel()
        if left:  # the client went away (or the server is stopping): free the slots
            collect.cancel()
            ticket.cancel()
    if left:
        return Response(status_code=499)  # "client closed request" (nginx's code): nobody reads it
    error = collect.result()
    if error:
        raise error
    if echo:
        texts = [echo[k // n] + t for k, t in enumerate(texts)]
    choices = list(zip(texts, ticket.finish))
    use = usage(prompt_tokens, sum(ticket.completion_tokens))
    return (chat_body if chat else completion_body)(rid, created, model, choices, use)


async def stream_chat(ticket: Ticket, model: str, rid: str, created: int, req: ChatRequest, prompt_tokens: int):
    with_usage = req.include_usage
    for i in range(len(ticket.rids)):
        yield sse(chat_chunk(rid, created, model, i, {"role": "assistant", "content": ""}, with_usage=with_usage))
    async for i, u in ticket:
        if u.finish in FAILED:
            yield sse(failure(u).body())
            return
        if u.text:
            yield sse(chat_chunk(rid, created, model, i, {"content": u.text}, with_usage=with_usage))
        if u.finish is not None:
            yield sse(chat_chunk(rid, created, model, i, {}, finish=u.finish, with_usage=with_usage))
    if with_usage:
        use = usage(prompt_tokens, sum(ticket.completion_tokens))
        yield sse(chat_chunk(rid, created, model, None, use=use, with_usage=True))
    yield "data: [DONE]\n\n"


async def stream_text(ticket: Ticket, model: str, rid: str, created: int, req: CompletionRequest,
                      prompt_tokens: int, echo: list[str] | None, n: int):
    with_usage = req.include_usage
    if echo:
        for k in range(len(ticket.rids)):
            yield sse(completion_chunk(rid, created, model, k, echo[k // n], with_usage=with_usage))
    async for i, u in ticket:
        if u.finish in FAILED:
            yield sse(failure(u).body())
            return
        if u.text or u.finish is not None:
            yield sse(completion_chunk(rid, created, model, i, u.text, u.finish, with_usage=with_usage))
    if with_usage:
        use = usage(prompt_tokens, sum(ticket.completion_tokens))
        yield sse(completion_chunk(rid, created, model, None, use=use, with_usage=True))
    yield "data: [DONE]\n\n"


async def _collect(ticket: Ticket, texts: list[str]) -> APIError | None:
    """Gather every choice's text; return the error to answer if the engine failed or is stopping."""
    async for i, u in ticket:
        if u.finish in FAILED:
            ticket.cancel()
            return failure(u)
        texts[i] += u.text
    return None


FAILED = ("error", "cancelled")  # a client's own cancel is never answered: "cancelled" means shutdown


def failure(u) -> APIError:
    if u.finish == "cancelled":
        return APIError(503, "The server is shutting down.", code="server_shutting_down")
    return APIError(500, u.error or "the engine failed")


def run_server(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted; a model that fails to load stops the server with a GebError."""
    import uvicorn

    settings.url = f"http://{host}:{port}/"
    app = create_app(settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    state: State = app.state.geb
    state.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.status == "error":
        raise GebError(state.error)
