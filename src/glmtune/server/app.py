"""The FastAPI application: OpenAI-shaped endpoints, errors, auth and body limits over a backend.

A backend (:class:`~glmtune.server.native.NativeBackend` or
:class:`~glmtune.server.vllm_backend.VLLMBackend`) provides ``template``, ``context_length``,
``encode_chat(messages)``, ``encode_text(prompt)``, ``submit(jobs)`` (raises ``QueueFull``),
``cancel(job)``, ``stats()``, ``close()`` and ``name``; see :mod:`glmtune.server` for the overview.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .jobs import Delta, Done, Failed, Job, QueueFull
from .schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "server_overloaded",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or _TYPES.get(status, "server_error")


def error_response(
    status: int,
    message: str,
    type: str | None = None,
    code: str | None = None,
    param: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": type or _TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


class _Guard:
    """Pure ASGI middleware: API key (before anything is read) and request body size."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.key is not None and scope["path"].startswith("/v1"):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if not auth:
                msg, code = (
                    "Missing API key: send it as the header 'Authorization: Bearer KEY'.",
                    "missing_api_key",
                )
            elif scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                msg, code = "Incorrect API key provided.", "invalid_api_key"
            else:
                msg = None
            if msg:
                resp = error_response(401, msg, code=code, headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send)
        too_big = f"Request body too large: the limit is {self.max_body} bytes."
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            return await error_response(413, too_big, code="request_too_large")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # chunked upload without a Content-Length
                    raise StarletteHTTPException(413, too_big)
            return message

        await self.app(scope, limited, send)


class _SSEResponse(StreamingResponse):
    """A stream that cancels its jobs however it ends (finished, client gone, never started)."""

    def __init__(self, content, on_close):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


@dataclass
class _Ctx:
    backend: object
    model_name: str
    timeout: float


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(
    backend,
    *,
    model_name: str,
    api_key: str | None = None,
    timeout: float = 120.0,
    max_body_bytes: int = DEFAULT_MAX_BODY,
) -> FastAPI:
    """The ASGI app serving ``backend`` under ``model_name``; closes the backend on shutdown."""
    ctx = _Ctx(backend, model_name, timeout)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, backend.close)

    app = FastAPI(title="glmtune OpenAI-compatible API", lifespan=lifespan)
    app.state.backend = backend
    app.add_middleware(_Guard, api_key=api_key, max_body=max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.code, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return error_response(
            exc.status_code,
            str(exc.detail),
            code=codes.get(exc.status_code),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        bad_json = [e for e in errors if e.get("type") == "json_invalid"]
        if bad_json:
            detail = (bad_json[0].get("ctx") or {}).get("error", "JSON decode error")
            return error_response(400, f"The request body is not valid JSON: {detail}.", code="invalid_json")
        parts = []
        for e in errors:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        first = errors[0].get("loc", ()) if errors else ()
        param = ".".join(str(x) for x in first if x != "body") or None
        return error_response(422, "Invalid request: " + "; ".join(parts), code="invalid_value", param=param)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"Internal server error: {type(exc).__name__}", "server_error")

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": model_name,
            "backend": backend.name,
            "context_length": backend.context_length,
            **backend.stats(),
        }

    def _model_card():
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "glmtune"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(ctx, model_id)
        return _model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(ctx, body.model)
        _check_text(body.model_dump(exclude_none=True))
        if body.logprobs or body.top_logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")
        messages, tool_names = _messages(body, backend.template)
        try:
            prompt = backend.encode_chat(messages)
        except (ValueError, KeyError, TypeError) as e:
            raise APIError(
                400, f"The messages cannot be encoded with this model's chat template: {e}", param="messages"
            ) from None
        max_tokens = _budget(
            backend.context_length, len(prompt), body.max_completion_tokens or body.max_tokens, "messages"
        )
        jobs = [_job(body, prompt, max_tokens, asyncio.Queue(), chat=True, timeout=timeout, tools=tool_names)]
        return await _respond(ctx, request, jobs, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(ctx, body.model)
        _check_text(body.model_dump(exclude_none=True))
        if body.logprobs is not None or body.echo or body.suffix:
            raise APIError(400, "logprobs, echo and suffix are not supported by this server")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        jobs, events = [], asyncio.Queue()  # one queue: the jobs (one per prompt) answer one request
        for i, text in enumerate(prompts):
            ids = backend.encode_text(text)
            max_tokens = _budget(backend.context_length, len(ids), body.max_tokens or 16, "prompt")
            jobs.append(
                _job(body, ids, max_tokens, events, chat=False, timeout=timeout, index_base=i * body.n)
            )
        return await _respond(ctx, request, jobs, body, chat=False)

    return app


# --------------------------------------------------------------------------------------- helpers
def _check_model(ctx: _Ctx, name: str | None) -> None:
    if name is not None and name != ctx.model_name:
        raise APIError(
            404,
            f"The model `{name}` does not exist: this server serves `{ctx.model_name}`.",
            code="model_not_found",
            param="model",
        )


def _check_text(value, where: str = "") -> None:
    """400 for an unpaired surrogate (JSON lets a client send "\\ud800"; no tokenizer can encode it,
    it is not a character), naming the field, instead of a tokenizer's RuntimeError (500)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(
                400,
                f"{where}: unpaired UTF-16 surrogate U+{ord(value[e.start]):04X} at character {e.start}; "
                "send text as valid Unicode",
                param=where,
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_text(v, f"{where}[{i}]")


def _functions(body: ChatCompletionRequest) -> list[dict]:
    """The function definitions the prompt shows, after ``tool_choice``; 400 for what cannot be served."""
    functions = []
    for i, tool in enumerate(body.tools or []):
        kind = tool.get("type", "function")
        if kind != "function":
            raise APIError(
                400, f"tools[{i}]: only function tools are supported, got type {kind!r}", param=f"tools[{i}]"
            )
        fn = tool.get("function", tool if "name" in tool else None)  # bare definitions: ChatGLM3's demo
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}].function.name is required", param=f"tools[{i}].function.name")
        functions.append(fn)
    choice = body.tool_choice
    if choice is None or choice == "auto":
        return functions
    if choice == "none":
        return []
    if isinstance(choice, dict) and choice.get("type", "function") == "function":
        name = (choice.get("function") or {}).get("name")
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise APIError(
                400, f"tool_choice names the function {name!r}, which is not in tools", param="tool_choice"
            )
        return chosen  # as the official GLM-4 server does: only that tool is shown to the model
    raise APIError(
        400,
        f"tool_choice {choice!r} is not supported: use 'auto', 'none' or a named function "
        "(this server cannot force a call)",
        param="tool_choice",
    )


def _messages(body: ChatCompletionRequest, template) -> tuple[list[dict], tuple[str, ...]]:
    """The template's messages for a request, and the names of the functions the reply may call."""
    functions = _functions(body)
    uses_tools = body.tools or any(m.tools or m.tool_calls for m in body.messages)
    if uses_tools and not template.supports_tools:
        raise APIError(
            400,
            f"tools are not supported by the {template.name} chat format of this model "
            "(tool calling works with ChatGLM3 and GLM-4 models)",
            param="tools",
        )
    out = []
    for i, m in enumerate(body.messages):
        role = {"developer": "system", "tool": "observation"}.get(m.role, m.role)
        if role == "assistant" and m.tool_calls:
            if m.text():  # text before the calls: its own turn, as the model wrote it
                out.append({"role": "assistant", "content": m.text()})
            for j, call in enumerate(m.tool_calls):
                try:
                    out.append(template.tool_call_message(call.function.name, call.function.arguments))
                except ValueError as e:
                    where = f"messages[{i}].tool_calls[{j}].function.arguments"
                    raise APIError(400, f"{where}: {e}", param=where) from None
            continue
        msg = {"role": role, "content": m.text()}
        if m.metadata:
            msg["metadata"] = m.metadata
        if m.tools:
            msg["tools"] = m.tools
        out.append(msg)
    if any(m["role"] == "observation" for m in out) and not template.supports_observation:
        raise APIError(
            400,
            f"tool / observation messages are not supported by the {template.name} template",
            param="messages",
        )
    if functions:
        if out[0]["role"] == "system":
            out[0] = {**out[0], "tools": functions}
        else:
            out.insert(0, {"role": "system", "content": template.tools_system_prompt, "tools": functions})
    names: list[str] = []
    if body.tool_choice != "none":  # every function the prompt shows (ChatGLM3 extension: a system
        for m in out:  # message may bring its own tools)
            for t in m.get("tools") or []:
                fn = t.get("function", t) if isinstance(t, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                    names.append(fn["name"])
    return out, tuple(dict.fromkeys(names))


def _budget(context: int, prompt_tokens: int, requested: int | None, what: str) -> int:
    """max_tokens for the request, or 400 when prompt + completion exceed the context."""
    if requested is None:
        requested = context - prompt_tokens
        if requested <= 0:
            raise APIError(
                400,
                f"The prompt is too long: this model's maximum context length is {context} "
                f"tokens and the {what} take {prompt_tokens} tokens.",
                code="context_length_exceeded",
                param=what,
            )
    if prompt_tokens + requested > context:
        raise APIError(
            400,
            f"The prompt is too long: this model's maximum context length is {context} tokens, "
            f"but you requested {prompt_tokens + requested} tokens ({prompt_tokens} in the {what}, "
            f"{requested} in the completion). Reduce the length of the {what} or max_tokens.",
            code="context_length_exceeded",
            param=what,
        )
    return requested


def _job(
    body,
    prompt: list[int],
    max_tokens: int,
    events: asyncio.Queue,
    *,
    chat: bool,
    timeout: float,
    index_base: int = 0,
    tools: tuple[str, ...] = (),
) -> Job:
    loop = asyncio.get_running_loop()
    return Job(
        prompt_ids=prompt,
        max_tokens=max_tokens,
        loop=loop,
        events=events,
        n=body.n,
        temperature=body.temperature,
        top_p=body.top_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=body.stops(),
        stream=body.stream,
        chat=chat,
        deadline=time.monotonic() + timeout,
        index_base=index_base,
        tools=tools,
    )


class _Events:
    """A request's event queue, read with a deadline. One ``get`` stays pending across timeouts (never
    cancelled mid-way, so no event can be lost) and is cancelled when the request is over."""

    def __init__(self, queue: asyncio.Queue):
        self.queue = queue
        self._get: asyncio.Future | None = None

    async def next(self, deadline: float, request: Request | None = None):
        """The next event, or None at the deadline; raises ConnectionAbortedError if the client left."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self._get is None:
                self._get = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({self._get}, timeout=min(left, 1.0))
            if done:
                event, self._get = self._get.result(), None
                return event
            if request is not None and await request.is_disconnected():
                raise ConnectionAbortedError

    def close(self) -> None:
        if self._get is not None:
            self._get.cancel()
            self._get = None


async def _respond(ctx: _Ctx, request: Request, jobs: list[Job], body, *, chat: bool):
    backend = ctx.backend
    total = sum(j.n for j in jobs)
    prompt_tokens = sum(len(j.prompt_ids) for j in jobs)
    try:
        backend.submit(jobs)
    except QueueFull as e:
        raise APIError(503, str(e), code="queue_full") from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())

    def cancel_all():
        for j in jobs:
            backend.cancel(j)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _SSEResponse(
            _stream(ctx, jobs, total, prompt_tokens, rid, created, chat, include_usage), cancel_all
        )

    done: dict[int, Done] = {}
    events = _Events(jobs[0].events)
    try:
        while len(done) < total:
            try:
                ev = await events.next(jobs[0].deadline, request)
            except ConnectionAbortedError:
                return Response(status_code=499)
            if ev is None:
                raise APIError(504, f"The request timed out after {ctx.timeout:g} s.", code="timeout")
            if isinstance(ev, Failed):
                raise APIError(ev.status, ev.message, ev.type)
            if isinstance(ev, Done):
                done[ev.index] = ev
    finally:
        events.close()
        if len(done) < total:
            cancel_all()
    choices = []
    for i in sorted(done):
        d = done[i]
        if chat:
            message = {"role": "assistant", "content": d.text}
            if d.tool_calls:
                message = {"role": "assistant", "content": d.text or None, "tool_calls": d.tool_calls}
            choices.append(
                {"index": i, "message": message, "logprobs": None, "finish_reason": d.finish_reason}
            )
        else:
            choices.append({"index": i, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason})
    completion_tokens = sum(d.completion_tokens for d in done.values())
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": ctx.model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


async def _stream(
    ctx: _Ctx,
    jobs: list[Job],
    total: int,
    prompt_tokens: int,
    rid: str,
    created: int,
    chat: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(
        index: int,
        content: str | None = None,
        finish: str | None = None,
        role: bool = False,
        tool_calls: list[dict] | None = None,
    ) -> str:
        if chat:
            delta = (
                {"role": "assistant", "content": ""} if role else ({"content": content} if content else {})
            )
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": content or "", "logprobs": None, "finish_reason": finish}
        return _sse(
            {"id": rid, "object": obj, "created": created, "model": ctx.model_name, "choices": [choice]}
        )

    if chat:
        for i in range(total):
            yield chunk(i, role=True)
    finished, completion_tokens = 0, 0
    events = _Events(jobs[0].events)
    try:
        while finished < total:
            ev = await events.next(jobs[0].deadline)
            if ev is None:
                ev = Failed(504, f"The request timed out after {ctx.timeout:g} s.", "timeout_error")
            if isinstance(ev, Failed):
                yield _sse({"error": {"message": ev.message, "type": ev.type, "param": None, "code": None}})
                break
            if isinstance(ev, Delta) and ev.tool_calls:
                # As OpenAI streams them: per call, its id and name, then its arguments.
                for k, call in enumerate(ev.tool_calls):
                    fn = call["function"]
                    head = {"name": fn["name"], "arguments": ""}
                    yield chunk(ev.index, tool_calls=[{"index": k, **call, "function": head}])
                    yield chunk(
                        ev.index, tool_calls=[{"index": k, "function": {"arguments": fn["arguments"]}}]
                    )
            elif isinstance(ev, Delta):
                yield chunk(ev.index, ev.text)
            elif isinstance(ev, Done):
                finished += 1
                completion_tokens += ev.completion_tokens
                yield chunk(ev.index, finish=ev.finish_reason)
    finally:
        events.close()
    if include_usage and finished == total:
        yield _sse(
            {
                "id": rid,
                "object": obj,
                "created": created,
                "model": ctx.model_name,
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------------- running it
def build_backend(
    model,
    *,
    backend: str = "native",
    adapter=None,
    dtype: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    max_batch_size: int = 8,
    max_queue: int = 64,
    generation: str | None = None,
    quantization: str | None = None,
    template=None,
):
    """The serving backend. ``dtype``/``device``/``quantization`` None: a run's own settings, else the
    machine's (CUDA when present, bf16/fp16 there, float32 on the CPU). ``template``: a prompt template
    (name or YAML file; None: a run's own, else the model's)."""
    from ..runs import Run, resolve_model_or_run

    if backend == "vllm":
        from .vllm_backend import VLLMBackend

        # A full fine-tune's run serves final/ with the run's generation; an adapter run is refused below.
        run = Run.find(model)
        if run is not None:
            what = run.model(generation=generation, adapter=adapter, trust_remote_code=trust_remote_code)
            model, adapter, generation = what.path, what.adapter, generation or run.generation
            trust_remote_code = what.trust_remote_code
            template = template if template is not None else run.template
        if adapter is not None:
            from ..errors import ConfigError

            raise ConfigError(
                "--backend vllm serves merged models: run `glmtune export RUN --out DIR` first, "
                "then serve DIR (without --adapter)"
            )
        return VLLMBackend(
            model,
            dtype=dtype or "auto",
            trust_remote_code=trust_remote_code,
            generation=generation,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            template=template,
        )
    from ..inference import Engine
    from .native import NativeBackend

    # A run folder (or run config) is what the run produced: its base + final/ adapter, or final/.
    resolved = resolve_model_or_run(
        model,
        adapter=adapter,
        dtype=dtype,
        device=device,
        quantization=quantization,
        trust_remote_code=trust_remote_code,
        generation=generation,
        template=template,
    )
    engine = Engine.load(resolved)
    return NativeBackend(engine, max_batch_size=max_batch_size, max_queue=max_queue)


def default_model_name(model, adapter=None) -> str:
    from pathlib import Path

    return Path(adapter or model).resolve().name


class ServerThread:
    """uvicorn in a background thread on a loopback port (tests, benchmarks, notebooks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
        )
        self.thread = threading.Thread(target=self.server.run, name="glmtune-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.host = host
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(
    model,
    *,
    adapter=None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    timeout: float = 120.0,
    model_name: str | None = None,
    backend: str = "native",
    dtype: str | None = None,
    device: str | None = None,
    quantization: str | None = None,
    trust_remote_code: bool = False,
    generation: str | None = None,
    template=None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    log_level: str = "info",
) -> None:
    """Load the model and serve it until interrupted (``glmtune serve``)."""
    import uvicorn

    api_key = api_key or os.environ.get("GLMTUNE_API_KEY") or None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning(
            "serving on %s without an API key: anyone who can reach this port can use the model "
            "(set --api-key or GLMTUNE_API_KEY)",
            host,
        )
    be = build_backend(
        model,
        backend=backend,
        adapter=adapter,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        generation=generation,
        quantization=quantization,
        template=template,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
    )
    name = model_name or default_model_name(model, adapter)
    app = create_app(be, model_name=name, api_key=api_key, timeout=timeout, max_body_bytes=max_body_bytes)
    print(
        f"glmtune serve: {name} ({be.name} backend, context {be.context_length}) on http://{host}:{port}/v1"
        + (" (API key required)" if api_key else ""),
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
