"""lm-evaluation-harness: the model `mend` (distilled vectors in place of the few-shot context) and
`mendctl lm-eval`, which runs lm-eval's own command line with it.

lm-eval 0.4 has no hook through which its command line finds a model defined outside it, so
`mendctl lm-eval` registers `mend` in lm-eval's registry and then hands the rest of its arguments
to lm-eval's own entry point. From Python, importing this module registers it:

    import lm_eval, mendctl.commands.lm_eval
    lm_eval.simple_evaluate(model=mendctl.commands.lm_eval.MendLM(recipe=..., vectors=...), tasks=[...])

A request's context is read as raw text after the vectors (the recipe's separator opens it), as
`Mend.loglikelihood` reads it: the task's own prompt format, not the recipe's template.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lm_eval.models  # noqa: F401  (fills lm-eval's registry first: it fills itself only while empty)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..api.mend import Mend, Vectors

NAME = "mend"
eval_logger = logging.getLogger(__name__)


def _int(value, default: int) -> int:
    """lm-eval's batch size: an int, a numeric string, or 'auto' (then the default)."""
    try:
        return max(int(value), 1)
    except (TypeError, ValueError):
        return default


def _available(device: str) -> bool:
    import torch

    kind = device.split(":")[0]
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return kind == "cpu"


@register_model(NAME)
class MendLM(LM):
    """An lm-eval model: the recipe's LLM reading a vectors file before every request.

    `recipe` (a path, with `overrides`) or `mend` (a built Mend); `vectors` (a path or Vectors).
    `batch_size`: requests handed to the model at a time; `device` (e.g. cuda): where the LLM runs, when
    that device is available.
    """

    def __init__(self, recipe: str | None = None, vectors=None, overrides=(), mend: Mend | None = None,
                 batch_size=8, max_batch_size=None, device: str | None = None):
        super().__init__()
        if (recipe is None) == (mend is None):
            raise ValueError("give the model a recipe or a Mend (one of them)")
        if vectors is None:
            raise ValueError("give the model vectors (a vectors file)")
        if isinstance(overrides, str):
            overrides = overrides.split()
        self.mend = mend or Mend.from_recipe(recipe, tuple(overrides))
        if device and _available(device):
            self.mend.llm.to(device)
        elif device:  # lm-eval's command line asks for cuda:0 unless told otherwise, as for its hf model
            eval_logger.warning("device %s is not available here: the LLM stays on %s", device, self.mend.llm.device)
        self.vectors = vectors if isinstance(vectors, Vectors) else Vectors.load(Path(vectors), self.mend)
        self.mend.check(self.vectors)
        self.batch_size = _int(batch_size, 8)

    def _chunks(self, requests, what: str, disable_tqdm: bool):
        bar = tqdm(total=len(requests), desc=f"mend {what}", disable=disable_tqdm)
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            yield chunk
            bar.update(len(chunk))
        bar.close()

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for chunk in self._chunks(requests, "loglikelihood", disable_tqdm):
            contexts, continuations = zip(*(r.args for r in chunk))
            got = self.mend.loglikelihood(self.vectors, list(contexts), list(continuations))
            for args, result in zip(zip(contexts, continuations), got):
                self.cache_hook.add_partial("loglikelihood", args, result)
            out += got
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "the mend model scores a continuation after distilled vectors, which stand in for few-shot "
            "demonstrations; a perplexity task (loglikelihood_rolling) reads none: evaluate it with lm-eval's hf model")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for chunk in self._chunks(requests, "generate_until", disable_tqdm):
            for context, gen_kwargs in (r.args for r in chunk):
                kwargs = dict(gen_kwargs)
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                kwargs["max_new_tokens"] = kwargs.pop("max_gen_toks", 256)
                if not kwargs.get("do_sample") or not kwargs.get("temperature"):
                    kwargs.update(do_sample=False)
                    kwargs.pop("temperature", None)
                text = self.mend.generate(self.vectors, [context], raw=True, **kwargs)[0]
                cuts = [text.find(u) for u in until if u and u in text]
                text = text[:min(cuts)] if cuts else text
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
        return out


def run_lm_eval(recipe: Path, overrides: tuple[str, ...], vectors: Path, args: list[str]) -> None:
    """lm-eval's command line (`lm-eval run`) with `--model mend` reading the recipe and vectors."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from ..core.vectors import read_metadata

    if not vectors.is_file():
        raise FileNotFoundError(f"--vectors {vectors}: no such file")
    read_metadata(vectors)  # a file that is no safetensors is refused before lm-eval starts
    taken = [a for a in args if a.split("=", 1)[0] in ("--model", "-M")]
    if taken:
        raise ValueError(f"{taken[0]}: the model is mend here (the recipe and --vectors say which)")
    model_args = json.dumps({"recipe": str(recipe), "vectors": str(vectors), "overrides": list(overrides)})
    setup_logging()
    harness = HarnessCLI()
    run = harness._subparsers.choices["run"]

    def error(message: str):  # one message and exit 2, as for every bad input, not argparse's usage block
        raise ValueError(f"lm-eval: {message}")

    run.error = harness._parser.error = error
    harness.execute(harness._parser.parse_args(["run", "--model", NAME, "--model_args", model_args, *args]))
