"""Load test of `mendctl serve`: the same server answering with vectors, with the demonstrations (ICL),
and with the demonstrations' keys and values computed once (ICL, cached prefix), side by side.

    nice -n 19 .venv/bin/python bench/serve_load.py RECIPE [key=value ...] --vectors DIR --model NAME \\
        --queries QUERIES.jsonl [--requests 64] [--clients 8] [--max-tokens 8]

DIR holds NAME.safetensors (the vectors) and NAME.jsonl (the demonstrations they were distilled
from): the server serves them as models NAME, NAME:icl and NAME:icl-cached. QUERIES.jsonl gives the
prompts (its rows' "input"), cycled. The script starts `mendctl serve` on 127.0.0.1 (loopback only)
at a free port, waits for /health, sends a few untimed requests per model, then `--requests`
requests per model from `--clients` concurrent clients, in two rounds whose order is reversed in the
second, so that every model sees the same load on a shared machine. It stops by itself: after the
requests, or when `--time-limit` seconds have passed (what is left is not sent), then stops the
server. It reports requests/s and p50/p99 latency per model, their ratios against ICL and ICL with a
cached prefix, and the memory each holds per task (from /v1/models), and writes them as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HOST = "127.0.0.1"  # loopback only: the load never leaves this machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def side(client: httpx.AsyncClient, url: str, model: str, prompts: list[str], clients: int, max_tokens: int,
               deadline: float) -> tuple[list[float], float, int]:
    """`len(prompts)` requests to `model` from `clients` concurrent clients: latencies, wall time, errors."""
    todo = list(enumerate(prompts))
    latencies, errors = [], 0

    async def worker():
        nonlocal errors
        while todo and time.monotonic() < deadline:
            _, prompt = todo.pop(0)
            start = time.perf_counter()
            r = await client.post(url, json={"model": model, "prompt": prompt, "max_tokens": max_tokens})
            if r.status_code != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies, time.perf_counter() - start, errors


async def load(base: str, models: list[str], prompts: list[str], requests: int, clients: int, max_tokens: int,
               warmup: int, deadline: float) -> dict:
    url = f"{base}/v1/completions"
    results = {m: {"latencies": [], "seconds": 0.0, "errors": 0} for m in models}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=clients)) as c:
        for m in models:  # untimed: first calls pay one-off costs
            await side(c, url, m, prompts[:warmup], 1, max_tokens, deadline)
        half = requests // 2
        for order, sent in ((models, prompts[:half]), (models[::-1], prompts[half:requests])):
            for m in order:
                lat, seconds, errors = await side(c, url, m, sent, clients, max_tokens, deadline)
                results[m]["latencies"] += lat
                results[m]["seconds"] += seconds
                results[m]["errors"] += errors
        cards = {card["id"]: card for card in (await c.get(f"{base}/v1/models")).json()["data"]}
    out = {}
    for m, r in results.items():
        lat = r["latencies"]
        out[m] = {"kind": cards[m]["kind"], "requests": len(lat), "errors": r["errors"],
                  "requests_per_s": len(lat) / r["seconds"] if r["seconds"] else 0.0,
                  "p50_s": statistics.median(lat) if lat else None, "p99_s": percentile(lat, 99) if lat else None,
                  "prefix_positions": cards[m]["prefix_positions"], "memory_bytes": cards[m]["memory_bytes"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--vectors", required=True, help="folder with NAME.safetensors and NAME.jsonl")
    ap.add_argument("--model", required=True, help="NAME")
    ap.add_argument("--queries", required=True, help="JSONL whose rows' input are the prompts")
    ap.add_argument("--requests", type=int, default=64, help="timed requests per model (at most 1000)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (at most 64)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests per model first")
    ap.add_argument("--time-limit", type=float, default=3600.0, help="seconds after which no request is sent")
    ap.add_argument("--out", default="bench/results/serve_load/results.json")
    a = ap.parse_args()
    if not (1 <= a.requests <= 1000 and 1 <= a.clients <= 64 and a.warmup >= 0):
        ap.error("--requests 1..1000, --clients 1..64, --warmup >= 0")
    rows = [json.loads(line) for line in Path(a.queries).read_text().splitlines() if line.strip()]
    prompts = [rows[i % len(rows)]["input"] for i in range(max(a.requests, a.warmup))]
    models = [a.model, f"{a.model}:icl", f"{a.model}:icl-cached"]

    port = free_port()
    base = f"http://{HOST}:{port}"
    command = [sys.executable, "-m", "mendctl", "serve", a.recipe, *a.overrides, "--vectors", a.vectors,
               "--host", HOST, "--port", str(port), "--max-batch", str(a.max_batch)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    try:
        while True:
            if server.poll() is not None:
                sys.exit(f"the server stopped: {server.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - started > 900:
                sys.exit("the server did not start within 900 s")
            time.sleep(1)
        deadline = time.monotonic() + a.time_limit
        sides = asyncio.run(load(base, models, prompts, a.requests, a.clients, a.max_tokens, a.warmup, deadline))
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    vec, icl, cached = (sides[m] for m in models)
    ratios = {
        "vectors_over_icl_requests_per_s": vec["requests_per_s"] / icl["requests_per_s"],
        "vectors_over_icl_cached_requests_per_s": vec["requests_per_s"] / cached["requests_per_s"],
        "icl_over_vectors_p99": icl["p99_s"] / vec["p99_s"],
        "icl_cached_over_vectors_p99": cached["p99_s"] / vec["p99_s"],
    }
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mendctl.core.provenance import stamp

    report = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "sides": sides, "ratios": ratios,
              "config": {"recipe": a.recipe, "overrides": a.overrides, "requests": a.requests, "clients": a.clients,
                         "max_tokens": a.max_tokens, "max_batch": a.max_batch, "warmup": a.warmup},
              "machine": {"cpus": os.cpu_count(), "niceness": os.nice(0), "load_avg_at_end": os.getloadavg(),
                          "python": platform.python_version(), "platform": platform.platform()},
              **stamp()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'model':<28}{'req/s':>8}{'p50 s':>9}{'p99 s':>9}{'positions':>11}{'memory MB':>11}{'errors':>8}")
    for m in models:
        s = sides[m]
        print(f"{m:<28}{s['requests_per_s']:>8.3f}{s['p50_s']:>9.2f}{s['p99_s']:>9.2f}{s['prefix_positions']:>11}"
              f"{s['memory_bytes'] / 1e6:>11.3f}{s['errors']:>8}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    print(f"written: {a.out}")


if __name__ == "__main__":
    main()
