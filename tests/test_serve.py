"""`mendctl serve`: OpenAI-compatible completions over a folder of vectors and demonstrations, on a tiny
model. In-process through FastAPI's TestClient, and once as a real uvicorn on loopback."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from mendctl.api.mend import Mend  # noqa: E402
from mendctl.api.batching import Batcher  # noqa: E402
from mendctl.commands.serve import Server, create_app, load_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPT2 = ROOT / "recipes" / "tiny" / "gpt2.yaml"
DEMOS = [{"input": "a delight from start to end", "output": "positive"},
         {"input": "two hours I will not get back", "output": "negative"},
         {"input": "the cast is superb", "output": "positive"},
         {"input": "dull and slow", "output": "negative"}]
PROMPTS = ["a joy to watch", "meh", "the plot is thin and the jokes are old"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny gpt2 Mend and a folder with one vectors file and its demonstrations."""
    folder = tmp_path_factory.mktemp("served")
    mend = Mend.from_recipe(GPT2, [f"output_dir={folder / 'out'}"])
    mend.distill(DEMOS, name="reviews", untrained=True).save(folder / "reviews.safetensors")
    (folder / "reviews.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DEMOS))
    return mend, folder


@pytest.fixture(scope="module")
def client(served):
    mend, folder = served
    with TestClient(create_app(Server(mend, load_folder(mend, folder), max_batch=4, max_wait=0.01))) as c:
        yield c


def complete(client, **body):
    return client.post("/v1/completions", json=body)


def test_models_health_and_what_each_model_holds(client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert {k: m["kind"] for k, m in models.items()} == {
        "reviews": "vectors", "reviews:icl": "icl", "reviews:icl-cached": "icl-cached"}
    assert models["reviews"]["prefix_positions"] == 4  # the tiny recipe's num_vectors
    assert models["reviews:icl"]["prefix_positions"] > 4 * len(DEMOS)
    # The vectors hold least; the cached prefix holds its keys and values on top of the demonstrations.
    assert models["reviews"]["memory_bytes"] < models["reviews:icl"]["memory_bytes"] < models["reviews:icl-cached"]["memory_bytes"]
    assert client.get("/health").json()["status"] == "ok"


def test_completions_are_what_the_api_generates(client, served):
    mend, folder = served
    vectors = mend.distill(DEMOS, name="reviews", untrained=True)  # the untrained distiller is deterministic
    want_mend = mend.generate(vectors, PROMPTS, max_new_tokens=5)
    want_icl = mend.generate(DEMOS, PROMPTS, max_new_tokens=5)
    for model, want in [("reviews", want_mend), ("reviews:icl", want_icl), ("reviews:icl-cached", want_icl)]:
        body = complete(client, model=model, prompt=PROMPTS, max_tokens=5).json()
        assert body["object"] == "text_completion" and body["model"] == model
        assert [c["text"] for c in body["choices"]] == want, model
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    one = complete(client, model="reviews", prompt=PROMPTS[0], max_tokens=5).json()
    assert one["choices"][0]["text"] == want_mend[0]


def test_stop_cuts_and_says_so(client):
    text = complete(client, model="reviews", prompt=PROMPTS[0], max_tokens=6).json()["choices"][0]["text"]
    assert len(text) >= 3
    stop = text[2:]
    cut = complete(client, model="reviews", prompt=PROMPTS[0], max_tokens=6, stop=stop).json()["choices"][0]
    assert cut["text"] == text[:text.find(stop)] and cut["finish_reason"] == "stop"


def test_a_prompt_the_context_cannot_hold_is_refused(client, served, monkeypatch):
    mend, _ = served
    monkeypatch.setattr(mend.models.llm, "max_positions", 40)  # an LLM of 40 positions: the demonstrations fill it
    r = complete(client, model="reviews:icl-cached", prompt="a", max_tokens=4)
    assert r.status_code == 400 and "exceed the LLM's 40" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert complete(client, model="reviews", prompt="a", max_tokens=4).status_code == 200


def test_concurrent_requests_share_one_model_call(served):
    mend, folder = served
    server = Server(mend, load_folder(mend, folder), max_batch=4, max_wait=30.0)  # full at 4, long before 30 s
    with TestClient(create_app(server)) as c, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: complete(c, model="reviews", prompt=p, max_tokens=3), PROMPTS + ["ok"]))
    assert [a.status_code for a in answers] == [200] * 4
    assert server.batcher.batches == [4]


BAD = [  # (body or raw bytes, status, phrase)
    ({"model": "reviewz", "prompt": "a"}, 404, "model 'reviewz' is not served here. Did you mean 'reviews'?"),
    (b'{"model": "reviews", "prompt": ', 400, "malformed JSON"),
    (b"\xff\xfe", 400, "malformed JSON"),
    (b"[1, 2]", 400, "the body must be a JSON object"),
    ({"model": "reviews", "prompt": 5}, 400, "prompt"),
    ({"model": "reviews", "prompt": "a", "max_tokens": "5"}, 400, "max_tokens: Input should be a valid integer"),
    ({"model": "reviews", "prompt": "a", "max_tokens": 0}, 400, "max_tokens: Input should be greater than or equal to 1"),
    ({"model": "reviews", "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"model": "reviews"}, 400, "prompt: Field required"),
    ({"model": "reviews", "prompt": "x" * 500}, 400, "a query is at most 64 (the recipe's template.max_example_tokens)"),
    ({"model": "reviews", "prompt": "a", "max_tokens": 513}, 400, "max_tokens: Input should be less than or equal to 512"),
    ({"model": "reviews", "prompt": []}, 400, "give 1 to 32 prompts"),
    ({"model": "reviews", "prompt": "a", "n": 2}, 400, "n: Input should be 1"),
    ({"model": "reviews", "prompt": "a", "stream": True}, 400, "stream"),
    ({"model": "reviews", "prompt": "a", "frequency_penalty": 1}, 400, "not a field this server reads"),
    ({"model": "reviews", "prompt": "a", "stop": ["", "b"]}, 400, "stop: at most 4 non-empty strings"),
]


@pytest.mark.parametrize("body, status, phrase", BAD, ids=[str(i) for i in range(len(BAD))])
def test_a_bad_request_gets_a_4xx_json_error_and_the_server_keeps_serving(client, body, status, phrase):
    if isinstance(body, bytes):
        r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = complete(client, **body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert phrase in error["message"] and error["type"] == "invalid_request_error"
    assert complete(client, model="reviews", prompt="still there?", max_tokens=2).status_code == 200


def test_other_routes_and_bodies_answer_json_errors(client):
    assert client.get("/v1/nothing").status_code == 404 and "error" in client.get("/v1/nothing").json()
    assert client.get("/v1/completions").status_code == 405
    big = client.post("/v1/completions", content=b" " * (2 << 20))
    assert big.status_code == 413 and "over" in big.json()["error"]["message"]


def test_the_batcher_groups_by_key_and_a_failed_call_fails_only_its_requests():
    calls = []

    def run(key, items):
        calls.append((key, list(items)))
        if key == "bad":
            raise RuntimeError("boom")
        return [f"{key}{i}" for i in items]

    async def main():
        batcher = Batcher(run, max_batch=3, max_wait=0.05)
        batcher.start()
        jobs = [batcher.submit("a", i) for i in range(4)] + [batcher.submit("bad", 9)]
        got = await asyncio.gather(*jobs, return_exceptions=True)
        after = await batcher.submit("a", 7)
        await batcher.stop()
        return got, after, batcher.batches

    got, after, batches = asyncio.run(main())
    assert got[:4] == ["a0", "a1", "a2", "a3"] and isinstance(got[4], RuntimeError) and after == "a7"
    assert sum(batches) == 6 and max(batches) == 3 and len(calls) == len(batches)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mendctl_serve_answers_over_http_on_loopback(served, tmp_path):
    import httpx

    mend, folder = served
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mendctl", "serve", str(GPT2), f"output_dir={tmp_path / 'out'}",
                             "--vectors", str(folder), "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "reviews", "prompt": "a joy to watch", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/completions", content=b"{", timeout=60)
        assert bad.status_code == 400
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
