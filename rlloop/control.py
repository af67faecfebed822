"""The control plane from a shell: `python -m rlloop.control ACTION [ARG] [--server runs/NAME]`.

Actions: version, stats, metrics, pause, resume, swap MODEL_DIR, update PLAN_KEY VERSION.
The address and the bearer token come from <run dir>/server.json (written by
`rlloop.serve` or a run with server.enabled=true), or from --url and $RLLOOP_API_KEY.
Prints the answer (JSON, or Prometheus text for metrics); exits 1 on a refusal.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx

ACTIONS = {"version": ("GET", 0), "stats": ("GET", 0), "metrics": ("GET", 0), "pause": ("POST", 0),
           "resume": ("POST", 0), "swap": ("POST", 1), "update": ("POST", 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlloop.control", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=sorted(ACTIONS))
    parser.add_argument("args", nargs="*", help="swap: MODEL_DIR; update: PLAN_KEY VERSION")
    parser.add_argument("--server", type=Path, help="a run directory (or its server.json)")
    parser.add_argument("--url", help="the endpoint's address (with $RLLOOP_API_KEY as the token)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds (a swap loads a model)")
    a = parser.parse_args(argv)
    method, nargs = ACTIONS[a.action]
    if len(a.args) != nargs:
        parser.error(f"{a.action} takes {nargs} argument(s), got {len(a.args)}")
    if a.server is not None:
        info = json.loads((a.server / "server.json" if a.server.is_dir() else a.server).read_text())
        url, token = info["url"], info["api_key"]
    elif a.url:
        url, token = a.url, os.environ.get("RLLOOP_API_KEY")
    else:
        parser.error("give --server RUN_DIR or --url (and $RLLOOP_API_KEY)")
    body = None
    if a.action == "swap":
        body = {"model": str(Path(a.args[0]).resolve())}
    elif a.action == "update":
        body = {"plan": a.args[0], "version": int(a.args[1])}
    r = httpx.request(method, f"{url}/control/{a.action}", json=body, timeout=a.timeout,
                      headers={"authorization": f"Bearer {token}"} if token else {})
    print(r.text if a.action == "metrics" and r.is_success else json.dumps(r.json(), indent=1))
    return 0 if r.is_success else 1


if __name__ == "__main__":
    sys.exit(main())
