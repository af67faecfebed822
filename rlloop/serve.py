"""Entry point: `python -m rlloop.serve [model.path=DIR] [server.port=8000] [engines.count=2]`.

Starts the engines of the config (the same keys as a training run: engines.*, model.*)
and serves, at one address, the OpenAI-compatible routes of vLLM balanced over them and
the authenticated control plane (rlloop/serving/gateway.py). Prints the address; the
address and the control token go to <output_dir>/server.json (readable by the owner
only). Ctrl-C stops it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rlloop.config import ConfigError
from rlloop.defaults import CONF_DIR


def serve(cfg: DictConfig):
    """Start the engines and the endpoint; returns (Endpoint, engines)."""
    import ray

    from rlloop.actors.engine import engine_actor
    from rlloop.config import build_run_config
    from rlloop.serving.gateway import Endpoint

    run = build_run_config(cfg)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if not ray.is_initialized():
        ray.init(address=cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local",
                 include_dashboard=cfg.ray.dashboard, log_to_driver=cfg.ray.log_to_driver,
                 runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": os.environ["VLLM_LOGGING_LEVEL"]}})
    e, s = run.engines, run.server
    engines = [engine_actor(e.engine, name=f"{run.name}/engine/{i}", num_gpus=e.num_gpus,
                            max_restarts=0, node_resource=e.node_resource) for i in range(e.count)]
    ray.get([engine.ready.remote() for engine in engines])
    endpoint = Endpoint(engines, s.host, s.port, s.api_key, s.openai_api_key,
                        s.served_model_name or run.model, s.max_body_bytes)
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = out / "server.json"
    info.touch(mode=0o600)
    info.write_text(json.dumps({"url": endpoint.url, "model": s.served_model_name or run.model,
                                "engines": e.count, "api_key": s.api_key}))
    return endpoint, engines


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        endpoint, engines = serve(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"[rlloop] serving {len(engines)} engine(s) at {endpoint.url}/v1 (OpenAI) and {endpoint.url}/control "
          f"(bearer token in {Path(cfg.output_dir) / 'server.json'})", flush=True)
    try:
        while endpoint.thread.is_alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    endpoint.close()


if __name__ == "__main__":
    main()
