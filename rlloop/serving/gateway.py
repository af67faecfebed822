"""One address in front of a run's engines: the OpenAI routes, balanced, and the
control plane, authenticated.

- `/v1/*` goes to the engine with the fewest requests in flight from here (each engine
  serves vLLM's own OpenAI routes, rlloop.serving.openai_app); responses stream through
  unchanged, with the engine's weight-version headers and `x-rlloop-engine`.
- `/control/*` needs `Authorization: Bearer <server.api_key>`; without it, or with a
  wrong one, 401 and nothing changes. Routes: GET version, stats, metrics (the rlloop
  gauges in Prometheus' text format, as Ray's metrics agent on this node exports them); POST pause, resume, update ({"plan": key, "version": n,
  "kv": "keep"|"recompute"}: the engines receive from their weight group as a
  Ray-driven update does; the plan must have been prepared on them before), swap
  ({"model": dir}: each engine in turn replaces its base model, swap_model; refused
  for a training run's endpoint).
Bodies over `max_body_bytes` get 413, bad JSON or fields 400, unknown routes 404, a
refused update 409; none of them reaches an engine's weights.
"""
from __future__ import annotations

import asyncio
import json
import urllib.request

from rlloop.serving.openai_app import bearer_ok, send_body, send_json

CONTROL_BODY_BYTES = 64 << 10
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade", b"content-length",
        b"host"}


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Gateway:
    """ASGI app over `engines` (Ray handles) serving at `urls` (their OpenAI servers)."""

    def __init__(self, engines: list, urls: list[str], api_key: str, max_body_bytes: int = 8 << 20,
                 allow_swap: bool = True):
        import httpx

        if not api_key:
            raise ValueError("the control plane needs an API key (server.api_key or RLLOOP_API_KEY)")
        self.engines, self.urls, self.api_key = list(engines), list(urls), api_key
        self.max_body_bytes = max_body_bytes
        self.in_flight = [0] * len(urls)
        self.allow_swap = allow_swap  # a training run's engines follow its learner: no swaps
        self.swapping: set[int] = set()  # engines replacing their model: no requests routed there
        self.swapped = asyncio.Event()
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=64))
        self.control = {("GET", "version"): self._version, ("GET", "stats"): self._stats,
                        ("GET", "metrics"): self._metrics, ("POST", "pause"): self._pause,
                        ("POST", "resume"): self._resume, ("POST", "update"): self._update,
                        ("POST", "swap"): self._swap}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send, on_shutdown=self.client.aclose)
        path = scope["path"]
        try:
            if path.startswith("/v1/") or path == "/v1":
                return await self._proxy(scope, receive, send)
            if path.startswith("/control/"):
                return await self._control(scope, receive, send)
            if path == "/health":
                return await send_json(send, 200, {"engines": len(self.urls)})
            raise BadRequest(404, f"no route {path}")
        except BadRequest as e:
            await send_json(send, e.status, {"error": {"message": str(e), "code": e.status}})

    # --- OpenAI routes ----------------------------------------------------------------

    async def _proxy(self, scope, receive, send):
        body = await _body(receive, self.max_body_bytes, dict(scope["headers"]))
        while len(self.swapping) == len(self.urls):  # every engine is swapping: wait for one
            self.swapped.clear()
            await self.swapped.wait()
        i = min((k for k in range(len(self.urls)) if k not in self.swapping), key=lambda k: self.in_flight[k])
        self.in_flight[i] += 1
        try:
            url = self.urls[i] + scope["path"] + (("?" + scope["query_string"].decode()) if scope["query_string"] else "")
            headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
            request = self.client.build_request(scope["method"], url, headers=headers, content=body)
            response = await self.client.send(request, stream=True)
            try:
                out = [(k.encode(), v.encode()) for k, v in response.headers.items() if k.encode() not in _HOP]
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": [*out, (b"x-rlloop-engine", str(i).encode())]})
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                await response.aclose()
        finally:
            self.in_flight[i] -= 1

    # --- control plane ----------------------------------------------------------------

    async def _control(self, scope, receive, send):
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if not bearer_ok(header, self.api_key):
            raise BadRequest(401, "missing or wrong bearer token")
        route = self.control.get((scope["method"], scope["path"].removeprefix("/control/")))
        if route is None:
            raise BadRequest(404, f"no control route {scope['method']} {scope['path']}")
        body = await _body(receive, CONTROL_BODY_BYTES, dict(scope["headers"]))
        result = await route(body)
        if isinstance(result, str):  # Prometheus' text format
            return await send_body(send, 200, result.encode(), b"text/plain; version=0.0.4")
        await send_json(send, 200, result)

    async def _all(self, method: str, *args):
        return list(await asyncio.gather(*(getattr(e, method).remote(*args) for e in self.engines)))

    async def _version(self, _):
        versions = await self._all("version")
        return {"version": min(versions), "engines": versions}

    async def _stats(self, _):
        return {"engines": await self._all("stats")}

    async def _pause(self, _):
        return {"engines": await self._all("pause")}

    async def _resume(self, _):
        return {"engines": await self._all("resume")}

    async def _update(self, body: bytes):
        from dataclasses import asdict

        from rlloop.actors.engine_io import KV_AFTER_UPDATE
        from rlloop.weights.protocol import UpdateTicket, WeightUpdateError

        fields = _object(body)
        plan, version, kv = fields.get("plan"), fields.get("version"), fields.get("kv")
        if set(fields) - {"plan", "version", "kv"}:
            raise BadRequest(400, f"unknown fields {sorted(set(fields) - {'plan', 'version', 'kv'})}")
        if not isinstance(plan, str) or not isinstance(version, int) or isinstance(version, bool):
            raise BadRequest(400, 'an update is {"plan": "<plan key>", "version": <int>} (and "kv")')
        if kv is not None and kv not in KV_AFTER_UPDATE:
            raise BadRequest(400, f"kv must be one of {KV_AFTER_UPDATE}")
        try:
            stats = await self._all("update_weights", UpdateTicket(version, plan), None, kv)
        except WeightUpdateError as e:
            raise BadRequest(409, str(e)) from None
        return {"version": version, "engines": [asdict(s) for s in stats]}

    async def _swap(self, body: bytes):
        """Replace every engine's base model, one engine at a time, so that the others
        keep answering; the engine's OpenAI routes come back on the new model."""
        fields = _object(body)
        model, requests = fields.get("model"), fields.get("requests")
        if set(fields) - {"model", "requests"} or not isinstance(model, str) or requests not in (None, "wait", "refuse"):
            raise BadRequest(400, 'a swap is {"model": "<local HF directory>"} (and "requests": "wait"|"refuse")')
        if not self.allow_swap:
            raise BadRequest(409, "this endpoint serves a training run, whose engines follow its learner: no swap")
        done = []
        for i, engine in enumerate(self.engines):
            self.swapping.add(i)
            try:
                done.append(await engine.swap_model.remote(model, requests))
                self.urls[i] = await engine.openai_url.remote()
            except ValueError as e:  # no model there: refused before anything changed
                raise BadRequest(400, str(getattr(e, "cause", e))) from None
            finally:
                self.swapping.discard(i)
                self.swapped.set()
        return {"model": model, "engines": done}

    async def _metrics(self, _):
        import ray

        node = ray._private.worker.global_worker.node
        url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        return "".join(line + "\n" for line in text.splitlines() if "rlloop_" in line)  # and their HELP, TYPE


def _object(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"body is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise BadRequest(400, "body must be a JSON object")
    return value


async def _body(receive, limit: int, headers: dict) -> bytes:
    declared = headers.get(b"content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadRequest(413, f"body over {limit} bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest(400, "client went away")
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise BadRequest(413, f"body over {limit} bytes")
        if not message.get("more_body"):
            return b"".join(chunks)


async def _lifespan(receive, send, on_shutdown):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return

