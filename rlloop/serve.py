"""Entry point: `python -m rlloop.serve [model.path=DIR] [server.port=8000] [engines.count=2]`.

Starts the engines of the config (the same keys as a training run: engines.*, model.*)
and serves, at one address, the OpenAI-compatible routes of vLLM balanced over them and
the authenticated control plane (rlloop/serving/gateway.py). Prints the address; the
address and the control token go to <output_dir>/server.json (readable by the owner
only). Ctrl-C stops it.
"""
from __future__ import annotations

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
    from rlloop.handle import connect_ray
    from rlloop.serving.endpoint import Endpoint

    run = build_run_config(cfg)
    connect_ray(cfg)
    e = run.engines
    engines = [engine_actor(e.engine, name=f"{run.name}/engine/{i}", num_gpus=e.num_gpus,
                            max_restarts=0, node_resource=e.node_resource) for i in range(e.count)]
    ray.get([engine.ready.remote() for engine in engines])
    return Endpoint(engines, run.server, run.model, run.output_dir), engines


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
