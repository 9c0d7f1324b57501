"""`mendctl serve`: an OpenAI-compatible completions server over one folder of vectors files.

Each file in the folder is a model a request can name:

- `NAME.safetensors` (vectors, `mendctl distill`): model `NAME`, the LLM reading the K vectors
  in place of the demonstrations;
- `NAME.jsonl` (demonstrations, one {"input", "output"} a line): the ICL baselines, model
  `NAME:icl` (the demonstrations run with every request, as a plain server runs a few-shot prompt)
  and `NAME:icl-cached` (their keys and values computed once at start and reused, as a serving
  engine with prefix caching does; decoder-only LLMs).

A prompt is a query: rendered with the recipe's template after the vectors or demonstrations, as
`mendctl predict` renders it, and answered by greedy decoding unless a temperature is given.
Concurrent requests are batched (batching.py); a bad request gets a 4xx error in OpenAI's shape,
and the server keeps serving.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from ..api.batching import Batcher
from ..api.mend import Mend, Vectors
from ..core.suggest import did_you_mean
from ..data.rows import read_demos
from ..models.prefix_kv import PrefixKV
from ..models.render import render_query

MAX_BODY = 1 << 20    # bytes of a request body
MAX_PROMPTS = 32      # prompts in one request
MAX_TOKENS = 512      # max_tokens of one request
KINDS = ("vectors", "icl", "icl-cached")


@dataclass
class Served:
    """One model of the folder: what the LLM reads before each query."""

    id: str
    kind: str                  # one of KINDS
    path: Path
    prefix: torch.Tensor       # [P, d] embeddings before the query (BOS not included)
    kv: PrefixKV | None = None  # icl-cached: the prefix's keys and values
    created: int = 0

    @property
    def memory_bytes(self) -> int:
        """What the server holds for this task beside the LLM: the vectors, the embedded
        demonstrations, and for icl-cached their keys and values too."""
        held = self.prefix.numel() * self.prefix.element_size()
        return held + (self.kv.nbytes if self.kv is not None else 0)

    def card(self) -> dict:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "mendctl", "kind": self.kind,
                "file": self.path.name, "prefix_positions": int(self.prefix.shape[0]),
                "memory_bytes": self.memory_bytes}


def load_folder(mend: Mend, folder: Path) -> dict[str, Served]:
    """Every vectors file and demonstrations file of `folder` as the models they serve."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--vectors {folder}: no such folder")
    served: dict[str, Served] = {}
    for path in sorted(folder.iterdir()):
        created = int(path.stat().st_mtime)
        if path.suffix == ".safetensors":
            vectors = Vectors.load(path, mend)
            served[path.stem] = Served(path.stem, "vectors", path, vectors.tensor, created=created)
        elif path.suffix == ".jsonl":
            prefix = mend.prefix(read_demos(path))
            served[f"{path.stem}:icl"] = Served(f"{path.stem}:icl", "icl", path, prefix, created=created)
            try:
                kv = PrefixKV(mend.engine, prefix)
            except ValueError:  # an encoder-decoder LLM: no cached-prefix baseline
                continue
            served[f"{path.stem}:icl-cached"] = Served(f"{path.stem}:icl-cached", "icl-cached", path, prefix, kv,
                                                       created)
    if not served:
        raise FileNotFoundError(f"--vectors {folder}: no vectors (.safetensors) or demonstrations (.jsonl) to serve")
    return served


class CompletionRequest(BaseModel):
    """The fields of OpenAI's /v1/completions this server reads; any other is refused, not ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[str] = Field(union_mode="left_to_right")
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: Literal[False] = False
    echo: Literal[False] = False
    logprobs: None = None
    user: str | None = None


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Server:
    """The models, the batcher, and the checks a request passes before it is queued."""

    def __init__(self, mend: Mend, served: dict[str, Served], max_batch: int = 8, max_wait: float = 0.01):
        self.mend, self.served = mend, served
        self.batcher = Batcher(self._generate, max_batch, max_wait)

    def _generate(self, key: tuple, items: list[tuple[list[int], int]]) -> list[list[int]]:
        served = self.served[key[0]]
        kwargs = {"max_new_tokens": max(n for _, n in items)}
        if key[1] > 0:
            kwargs.update(do_sample=True, temperature=key[1], top_p=key[2])
        xs = [x for x, _ in items]
        ids = served.kv.generate(xs, **kwargs) if served.kv is not None else self.mend.engine.generate(
            served.prefix, xs, **kwargs)
        return [row[:n] for row, (_, n) in zip(ids, items)]

    def model(self, name: str) -> Served:
        if name not in self.served:
            raise RequestError(404, f"model {name!r} is not served here.{did_you_mean(name, self.served)} "
                               f"Served: {', '.join(self.served)}", "model", "model_not_found")
        return self.served[name]

    def query(self, served: Served, prompt: str, max_tokens: int, param: str) -> tuple[list[int], int]:
        """The prompt's ids as a query, and the positions the LLM reads before answering; refused
        when longer than the template lets a query be or than the LLM's context holds."""
        mend = self.mend
        limit = mend.template.max_example_tokens
        n = len(mend.tokenizer(prompt, add_special_tokens=False).input_ids)
        if n > limit:
            raise RequestError(400, f"the prompt is {n} tokens; a query is at most {limit} "
                               "(the recipe's template.max_example_tokens)", param, "context_length_exceeded")
        x = render_query(mend.template, prompt, [], mend.tokenizer, after_context=True).x
        reads = mend.models.llm.bos_len + served.prefix.shape[0] + len(x)
        if mend.max_length is not None and reads + max_tokens > mend.max_length:
            raise RequestError(400, f"{reads} positions before the answer plus max_tokens={max_tokens} exceed the "
                               f"LLM's {mend.max_length}", param, "context_length_exceeded")
        return x, reads

    async def complete(self, req: CompletionRequest) -> dict:
        served = self.model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise RequestError(400, f"prompt: give 1 to {MAX_PROMPTS} prompts, not {len(prompts)}", "prompt")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise RequestError(400, "stop: at most 4 non-empty strings", "stop")
        queries = [self.query(served, p, req.max_tokens, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
                   for i, p in enumerate(prompts)]
        key = (served.id, req.temperature, req.top_p if req.temperature > 0 else 1.0)
        outs = await asyncio.gather(*(self.batcher.submit(key, (x, req.max_tokens)) for x, _ in queries))
        choices, generated = [], 0
        for i, ids in enumerate(outs):
            text = self.mend.tokenizer.decode(ids, skip_special_tokens=True)
            reason = "length" if len(ids) >= req.max_tokens else "stop"
            cuts = [text.find(s) for s in stops if s in text]
            if cuts:
                text, reason = text[:min(cuts)], "stop"
            generated += len(ids)
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
        read = sum(r for _, r in queries)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": served.id, "choices": choices,
                "usage": {"prompt_tokens": read, "completion_tokens": generated, "total_tokens": read + generated}}


def _param(errors: list[dict]) -> str | None:
    loc = errors[0].get("loc", ()) if errors else ()
    return ".".join(str(p) for p in loc) or None


def _message(errors: list[dict]) -> str:
    """A validation error as one line: the first problem, naming the field."""
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "extra_forbidden":
        return f"{_param(errors)}: not a field this server reads (it reads {', '.join(CompletionRequest.model_fields)})"
    if first.get("type") == "model_type":
        return "the body must be a JSON object"
    return f"{_param(errors)}: {first['msg']}" if _param(errors) else first["msg"]


def create_app(server: Server):
    """The FastAPI application: /v1/completions, /v1/models, /health."""
    @asynccontextmanager
    async def lifespan(app):
        server.batcher.start()
        yield
        await server.batcher.stop()

    app = FastAPI(title="mendctl", lifespan=lifespan)
    app.state.server = server

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return JSONResponse(error_body(f"the request body is over {MAX_BODY} bytes"), status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return JSONResponse(error_body(e.message, param=e.param, code=e.code), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):
        return JSONResponse(error_body(f"the server failed: {type(e).__name__}: {e}", "server_error"), status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request):
        # The body read as JSON whatever its content type says (curl -d sends form encoding).
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"malformed JSON: {e}") from None
        try:
            req = CompletionRequest.model_validate(body)
        except ValidationError as e:
            errors = e.errors()
            raise RequestError(400, _message(errors), _param(errors)) from None
        return await server.complete(req)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [s.card() for s in server.served.values()]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": len(server.served), "waiting": server.batcher.waiting}

    return app


def run_serve(recipe, folder: Path, host: str, port: int, max_batch: int, max_wait_ms: float, console) -> None:
    """Loads the recipe's LLM and the folder's models, then serves until interrupted."""
    import uvicorn

    mend = Mend.from_recipe(recipe)
    served = load_folder(mend, folder)
    server = Server(mend, served, max_batch, max_wait_ms / 1000)
    for s in served.values():
        console.print(f"  {s.id}: {s.kind}, {s.prefix.shape[0]} positions before each query, "
                      f"{s.memory_bytes / 1e6:.2f} MB held", highlight=False)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning[/]: serving on {host}, beyond this machine; there is no authentication")
    uvicorn.run(create_app(server), host=host, port=port, log_level="info")
