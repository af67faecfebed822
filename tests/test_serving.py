"""The network face: `python -m rlloop.serve` answered by the official openai client,
a control plane that refuses every request without the right token, malformed input
that never reaches the weights, and an update through HTTP landing under a stream."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from rlloop.run_config import ServerConfig
from rlloop.serving.endpoint import Endpoint
from rlloop.weights.sender import buckets_of

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
CONTROL, OPENAI_KEY = "control-token-for-tests", "openai-key-for-tests"
ROUTES = [("GET", "version"), ("GET", "stats"), ("GET", "metrics"), ("POST", "pause"), ("POST", "resume"),
          ("POST", "update")]


@pytest.fixture(scope="module")
def served(own_model, tmp_path_factory):
    """rlloop.serve on a model with its own chat template, one engine, both keys set."""
    model, _ = own_model
    out = tmp_path_factory.mktemp("served")
    proc = subprocess.Popen([sys.executable, "-m", "rlloop.serve", f"model.path={model}", "server.port=0",
                             f"server.api_key={CONTROL}", f"server.openai_api_key={OPENAI_KEY}",
                             "server.served_model_name=own", "server.max_body_bytes=1048576",
                             f"output_dir={out}", "name=served", "seed=0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not (out / "server.json").exists() or not (out / "server.json").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    info = json.loads((out / "server.json").read_text())
    assert info["api_key"] == CONTROL and (out / "server.json").stat().st_mode & 0o077 == 0
    yield info["url"]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)


def _client(url: str, key: str = OPENAI_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _control(url: str, method: str, route: str, token: str | None = CONTROL, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.request(method, f"{url}/control/{route}", headers=headers, timeout=60, **kw)


def test_the_openai_client_lists_completes_chats_and_streams(served):
    client = _client(served)
    assert [m.id for m in client.models.list().data] == ["own"]
    raw = client.completions.with_raw_response.create(model="own", prompt="What is 2 + 3?", max_tokens=12,
                                                      temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    assert raw.headers["x-rlloop-version-start"] == raw.headers["x-rlloop-version-end"] == "0"
    done = raw.parse()
    assert len(done.choices[0].logprobs.token_logprobs) == 12 and all(
        lp <= 0 for lp in done.choices[0].logprobs.token_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="own", prompt="What is 2 + 3?", max_tokens=12, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == done.choices[0].text  # greedy: the same tokens either way
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    chat = client.chat.completions.create(model="own", messages=messages, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 8
    chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="own", messages=messages, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True})
        if c.choices]
    assert "".join(chunks) == chat.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        _client(served, key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)


def test_every_control_route_needs_the_token_and_a_refusal_changes_nothing(served):
    for method, route in ROUTES:
        for token in (None, "wrong", CONTROL[:-1], CONTROL + "x"):
            r = _control(served, method, route, token)
            assert r.status_code == 401, (method, route, token, r.text)
    stats = _control(served, "GET", "stats").json()["engines"][0]
    assert stats["updates"] == stats["rejected_updates"] == 0 and stats["version"] == 0
    assert _control(served, "GET", "version").json() == {"version": 0, "engines": [0]}
    # paused: a request waits; resumed: it completes
    assert _control(served, "POST", "pause").json()["engines"][0]["paused"]
    result = {}
    waiter = threading.Thread(target=lambda: result.update(r=_client(served).completions.create(
        model="own", prompt="1", max_tokens=4, temperature=0)))
    waiter.start()
    waiter.join(3)
    assert waiter.is_alive(), "a paused engine answered"
    assert _control(served, "POST", "resume").status_code == 200
    waiter.join(60)
    assert len(result["r"].choices[0].text) > 0
    deadline = time.time() + 60  # Ray's metrics agent exports the request's gauges within seconds
    while "rlloop_in_flight" not in (metrics := _control(served, "GET", "metrics")).text and time.time() < deadline:
        time.sleep(1)
    assert metrics.headers["content-type"].startswith("text/plain") and 'role="engine"' in metrics.text, metrics.text
    # the token is right, the update is not: refused before anything changes
    r = _control(served, "POST", "update", json={"plan": "no-such-plan", "version": 1})
    assert r.status_code == 409 and "has not been given" in r.json()["error"]["message"]
    assert _control(served, "GET", "version").json()["version"] == 0


def _malformed(url: str, rng: random.Random) -> list[tuple[str, str, dict]]:
    """200 requests that are wrong in one way each: bad JSON, wrong types, a huge body,
    unknown routes, models and fields; half to the OpenAI routes, half to control."""
    auth = {"authorization": f"Bearer {OPENAI_KEY}"}
    ctl = {"authorization": f"Bearer {CONTROL}"}
    junk = [b"{", b"[1, 2", b"null", b"\xff\xfe", b'{"prompt": }', b"42", b'"text"', b"{}" * 3]
    wrong_types = [{"model": "own", "prompt": 123, "max_tokens": 4}, {"model": "own", "prompt": "x", "max_tokens": "four"},
                   {"model": "own", "prompt": "x", "temperature": "hot"}, {"model": "own", "prompt": "x", "max_tokens": -5},
                   {"model": ["own"], "prompt": "x"}, {"model": "own", "messages": "hello"},
                   {"model": "own", "messages": [{"role": 7}]}, {"model": "nope", "prompt": "x", "max_tokens": 1},
                   {"model": "own", "prompt": "x", "max_tokens": 10 ** 9}, {"model": "own", "prompt": "x", "n": 0}]
    bad_updates = [{"plan": 5, "version": 1}, {"plan": "k", "version": "1"}, {"plan": "k", "version": True},
                   {"plan": "k"}, {"version": 3}, {"plan": "k", "version": 1, "kv": "later"},
                   {"plan": "k", "version": 1, "extra": 1}, {"plan": "k", "version": 1.5}, [], "update"]
    requests = []
    for i in range(200):
        kind = i % 10
        if kind == 0:
            requests.append(("POST", f"{url}/v1/completions", dict(content=rng.choice(junk), headers={
                **auth, "content-type": "application/json"})))
        elif kind == 1:
            requests.append(("POST", f"{url}/v1/{rng.choice(['completions', 'chat/completions'])}",
                             dict(json=rng.choice(wrong_types), headers=auth)))
        elif kind == 2:
            requests.append(("POST", f"{url}/v1/completions", dict(
                content=b'{"model": "own", "prompt": "' + b"9" * (2 << 20) + b'"}',
                headers={**auth, "content-type": "application/json"})))
        elif kind == 3:
            requests.append((rng.choice(["GET", "POST", "DELETE"]), f"{url}/v1/{rng.choice(['x', 'admin', 'models/../..'])}",
                             dict(headers=auth)))
        elif kind == 4:
            requests.append(("POST", f"{url}/control/update", dict(json=rng.choice(bad_updates), headers=ctl)))
        elif kind == 5:
            requests.append(("POST", f"{url}/control/update", dict(content=rng.choice(junk), headers=ctl)))
        elif kind == 6:
            requests.append(("POST", f"{url}/control/update", dict(content=b"{" + b" " * (1 << 20) + b"}", headers=ctl)))
        elif kind == 7:
            requests.append((rng.choice(["GET", "POST", "PUT"]), f"{url}/control/{rng.choice(['reload', 'shutdown', ''])}",
                             dict(headers=ctl)))
        elif kind == 8:
            requests.append(("POST", f"{url}/control/update", dict(json={"plan": "k", "version": 1},
                                                                    headers={"authorization": rng.choice(["", "Basic x", "Bearer"])})))
        else:
            requests.append(("POST", f"{url}/{rng.choice(['', 'v2/completions', 'metrics'])}", dict(json={}, headers=auth)))
    return requests


def test_200_malformed_requests_get_4xx_and_leave_the_engine_serving_its_weights(served):
    client = _client(served)
    prompt = "What is 7 + 8?"

    def greedy():
        return client.completions.create(model="own", prompt=prompt, max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
    before = greedy()
    statuses = {}
    with httpx.Client(timeout=60) as http:
        for method, url, kw in _malformed(served, random.Random(0)):
            r = http.request(method, url, **kw)
            statuses.setdefault(r.status_code, []).append(url)
            assert 400 <= r.status_code < 500, (method, url, str(kw)[:200], r.status_code, r.text[:300])
    print("statuses:", {k: len(v) for k, v in sorted(statuses.items())})
    assert {400, 401, 404, 413} <= set(statuses)
    assert greedy() == before
    stats = _control(served, "GET", "stats").json()["engines"][0]
    assert stats["version"] == 0 and stats["updates"] == 0 and stats["in_flight"] == 0


def test_a_swap_through_the_control_cli_replaces_the_served_model(served, tiny_model):
    """`python -m rlloop.control swap DIR`: the engine replaces its base model (another
    architecture and tokenizer) and the same address answers with it, as transformers
    does; a directory without a model is refused and the old one keeps serving."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def control(*args, timeout=900):
        return subprocess.run([sys.executable, "-m", "rlloop.control", *args, "--url", served], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, env={**os.environ, "RLLOOP_API_KEY": CONTROL})

    def greedy(prompt):
        return _client(served).completions.create(model="own", prompt=prompt, max_tokens=16, temperature=0,
                                                  extra_body={"ignore_eos": True}).choices[0].text
    before = greedy("3+4=")
    refused = control("swap", str(REPO / "no-such-model"), timeout=120)
    assert refused.returncode == 1 and "no config.json" in refused.stdout, refused.stdout + refused.stderr
    assert greedy("3+4=") == before
    done = control("swap", tiny_model)
    assert done.returncode == 0, done.stdout + done.stderr
    swap = json.loads(done.stdout)["engines"][0]
    assert swap["model"] == tiny_model and swap["load_ms"] > 0
    tok = AutoTokenizer.from_pretrained(tiny_model)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = tok("3+4=", return_tensors="pt").input_ids
    want = tok.decode(hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=1)[0, ids.shape[1]:])
    assert greedy("3+4=") == want != before
    assert json.loads(control("version", timeout=60).stdout)["version"] == 0


def test_an_update_through_the_control_plane_lands_under_a_stream(updater, tiny_model, tmp_path):
    """The engines' weight group and plan are set up as a trainer sets them up; the
    update itself is started over HTTP while an OpenAI stream runs: the stream ends
    with every token, the version rises, and the new weights give transformers' output."""
    updater.push(seed=601)  # the plan travels once, through Ray
    server = ServerConfig(enabled=True, host="127.0.0.1", port=0, api_key=CONTROL, openai_api_key=None,
                          served_model_name="tiny", max_body_bytes=1 << 20)
    endpoint = Endpoint(updater.engines, server, tiny_model, tmp_path)
    try:
        url, before = endpoint.url, updater.version
        client = _client(url, key="unused")
        stream = client.completions.with_streaming_response.create(
            model="tiny", prompt="3+4=", max_tokens=480, temperature=0, stream=True, extra_body={"ignore_eos": True})
        with stream as response:
            assert response.headers["x-rlloop-version-start"] == str(before)
            lines = response.iter_lines()
            first = [next(lines) for _ in range(4)]  # tokens are flowing
            updater.randomize(602)
            request = updater.request()
            send = lambda: updater.sender.send(request, buckets_of(request.plan, updater.tensors()))  # noqa: E731
            posted = {}
            post = threading.Thread(target=lambda: posted.update(r=_control(
                url, "POST", "update", json={"plan": request.plan.key, "version": request.version})))
            if updater.sender.shared:  # the sender fills its region, then the engines copy
                send()
                post.start()
            else:  # the engines receive while the sender broadcasts (either may start first)
                post.start()
                send()
            post.join(120)
            rest = list(lines)
        assert posted["r"].status_code == 200, posted["r"].text
        assert max(e["in_flight"] for e in posted["r"].json()["engines"]) == 1, "it landed under the stream"
        updater.version = updater.pusher.version = request.version
        chunks = [json.loads(line[6:]) for line in first + rest if line.startswith("data: {")]
        assert sum(len(c["choices"][0]["text"]) for c in chunks) == 480 and rest[-1 if rest[-1] else -2] == "data: [DONE]"
        assert _control(url, "GET", "version").json() == {"version": request.version, "engines": [request.version] * 2}
        text = client.completions.create(model="tiny", prompt="3+4=", max_tokens=24, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
        assert text == updater.tokenizer.decode(updater.greedy_reference("3+4=", 24))
    finally:
        endpoint.close()


