"""A run's network face, started in the process that holds the engines' handles (the
`rlloop.serve` driver, or a training run's coordinator): each engine's OpenAI server,
the gateway in front of them on a daemon thread, and <output_dir>/server.json with the
address and the control token (readable by the owner only)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

from rlloop.serving.gateway import Gateway


class Endpoint:
    def __init__(self, engines: list, server, model: str, output_dir: str | Path, allow_swap: bool = True):
        """`server`: the run's ServerConfig; `model`: the name clients pass unless
        server.served_model_name is set; `allow_swap`: whether /control/swap may
        replace the engines' model (not under a training run's learner)."""
        import ray
        import uvicorn

        self.engines, self.config = list(engines), server
        self.model = server.served_model_name or model
        urls = ray.get([self._serve(e) for e in self.engines])
        self.gateway = Gateway(self.engines, urls, server.api_key, server.max_body_bytes, allow_swap)
        self.server = uvicorn.Server(uvicorn.Config(self.gateway, host=server.host, port=server.port,
                                                    log_level="warning", access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="rlloop-gateway", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the gateway could not listen on {server.host}:{server.port} (see the log above)")
            self.thread.join(0.05)
        self.url = f"http://{server.host}:{self.server.servers[0].sockets[0].getsockname()[1]}"
        info = Path(output_dir) / "server.json"
        info.parent.mkdir(parents=True, exist_ok=True)
        info.touch(mode=0o600)
        info.write_text(json.dumps({"url": self.url, "model": self.model, "engines": len(self.engines),
                                    "api_key": server.api_key}))

    def _serve(self, engine):
        # engines listen where the gateway reaches them: this host's loopback, else every interface
        host = "127.0.0.1" if self.config.host in ("127.0.0.1", "localhost") else "0.0.0.0"
        return engine.serve_openai.remote(host, 0, self.config.openai_api_key, self.model)

    def refresh(self) -> None:
        """Serve again on engines that lost their server (restarted by Ray)."""
        import ray

        urls = ray.get([e.openai_url.remote() for e in self.engines])
        for i, url in enumerate(urls):
            if url is None:
                self.gateway.urls[i] = ray.get(self._serve(self.engines[i]))

    def close(self) -> None:
        """Stop the gateway and the engines' OpenAI servers (the engines keep running)."""
        import ray

        self.server.should_exit = True
        self.thread.join(10)
        ray.get([e.stop_openai.remote() for e in self.engines])
