"""vLLM's own OpenAI-compatible server over an engine actor's AsyncLLM, in the actor.

The routes, request validation and streaming are vLLM's (`build_app` and
`init_app_state`, as `vllm serve` builds them); rlloop adds the weight version to every
response (`x-rlloop-version-start`, and `x-rlloop-version-end` once a non-streaming
response is complete) and an optional bearer key. The server runs on the actor's event
loop beside generation and in-flight updates, so an update lands under a stream.
"""
from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable


def _serve_args(model: str, served_name: str):
    try:  # vLLM 0.32
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:  # vLLM 0.26
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--model", model, "--served-model-name", served_name, "--disable-uvicorn-access-log"]
    return make_arg_parser(FlexibleArgumentParser()).parse_args(argv)  # no --api-key: ours checks it


async def openai_app(llm, model: str, served_name: str, api_key: str | None, version: Callable[[], int]):
    """The ASGI app of vLLM's OpenAI server over `llm` (an AsyncLLM), with the
    weight-version headers and, given `api_key`, the key required on /v1 routes."""
    from vllm.entrypoints.openai.api_server import build_app, init_app_state

    args = _serve_args(model, served_name)
    supported_tasks = await llm.get_supported_tasks()
    app = build_app(args, supported_tasks)
    await init_app_state(llm, app.state, args, supported_tasks)
    return Versioned(app, api_key, version)


class Versioned:
    """ASGI wrapper: a /v1 request without the key gets 401; every response carries the
    weight version it started under and, unless it streams, the one it ended under."""

    def __init__(self, app, api_key: str | None, version: Callable[[], int]):
        self.app, self.api_key, self.version = app, api_key, version

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        if self.api_key is not None and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not bearer_ok(header, self.api_key):
                return await send_json(send, 401, {"error": {"message": "missing or wrong API key", "type": "auth"}})
        start = self.version()

        async def send_versioned(message):
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-rlloop-version-start", str(start).encode())]
                if not dict(headers).get(b"content-type", b"").startswith(b"text/event-stream"):
                    headers.append((b"x-rlloop-version-end", str(self.version()).encode()))  # body complete
                message = {**message, "headers": headers}
            await send(message)
        await self.app(scope, receive, send_versioned)


async def send_json(send, status: int, body: dict) -> None:
    await send_body(send, status, json.dumps(body).encode(), b"application/json")


async def send_body(send, status: int, data: bytes, content_type: bytes) -> None:
    """A whole ASGI response: its start, then its one body message."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def bearer_ok(header: str | None, key: str) -> bool:
    """An `Authorization: Bearer <key>` header with exactly `key` (constant time)."""
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


async def start_server(app, host: str, port: int):
    """Serve `app` with uvicorn on this event loop; returns (server, its task, the
    bound port) once it listens (port 0 picks a free one)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           access_log=False, lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():  # failed to bind: its own error
            task.result()
        await asyncio.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return server, task, bound
