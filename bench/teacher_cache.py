"""The teacher cache on the demo's real models (SmolLM2-135M, stage 2): how far the cached sparse KL is
from the exact KL for several top-k, and seconds per training step with the cache (hit) vs without.

    .venv/bin/python bench/teacher_cache.py tasks.bigbench=null tasks.data_dir=DATA [--episodes 24]   (DATA: BIG-bench converted, `mendctl data bigbench --fetch DATA`)

Both measurements in one run, on the first `episodes` example positions of the recipe's stage 2 and
its initial distiller; the timed steps alternate (no cache, cache hit) on the same batches. The
cache goes to a temporary folder, not the user's. Writes bench/results/teacher_cache.json.
"""
from demo_setting import AS_MEASURED  # bench/ is on sys.path when a bench script runs
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mendctl.core.config import load_recipe
from mendctl.training.examples import example_source
from mendctl.training.losses import ForwardKL, SparseKL
from mendctl.data.prepare import prepare
from mendctl.core.provenance import stamp
from mendctl.core.registry import get_backend
from mendctl.training.teacher_cache import CachedTeacher, TeacherCache, sparsify
from mendctl.models.distiller import distiller_inputs
from mendctl.commands.train import Objective, step_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--recipe", default="recipes/llama/smollm2-demo.yaml")
    ap.add_argument("--episodes", type=int, default=24)
    ap.add_argument("--ks", default="16,64,256")
    ap.add_argument("--timed-k", type=int, default=64)
    ap.add_argument("--out", default="bench/results/teacher_cache.json")
    a = ap.parse_args()
    recipe = load_recipe(a.recipe, [*AS_MEASURED, *a.overrides])
    prepare(recipe, "finetune")
    spec, backend = recipe.finetune, get_backend(recipe.backend)
    models = backend.build(recipe)
    llm, template = models.llm, backend.template(recipe)
    examples = example_source("finetune", recipe, models.llm_tokenizer, llm.is_encoder_decoder, template)
    bs = spec.batch_size
    batches = [[examples.get(p) for p in range(b, b + bs)] for b in range(0, a.episodes, bs)]
    ks = [int(k) for k in a.ks.split(",")]
    distiller = models.distiller.train()
    as_t = lambda ids: torch.tensor(ids, dtype=torch.long)  # noqa: E731

    # 1. Accuracy: exact vs sparse KL of the same (initial) student, per batch as the trainer averages it.
    exact, sparse, mass = [], {k: [] for k in ks}, {k: [] for k in ks}
    with torch.no_grad():
        for batch in batches:
            xs, ys = [as_t(e.x) for e in batch], [as_t(e.y) for e in batch]
            t = llm.target_logits([llm.embed(as_t(e.ctx)) for e in batch], xs, ys)
            d_ids, d_mask = distiller_inputs([e.distiller_text for e in batch], models.distiller_tokenizer,
                                             recipe.distiller.max_length, "cpu")
            s = llm.target_logits(list(distiller(d_ids, d_mask)), xs, ys)
            exact.append(ForwardKL(spec.temperature)(t.logits, s.logits).item())
            for k in ks:
                top = sparsify(t.logits, t.targets, k, spec.temperature)
                sparse[k].append(SparseKL(spec.temperature)(top.logp, top.ids, top.log_rest, s.logits).item())
                mass[k].append(top.logp.exp().sum(-1).mean().item())
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    per_k = {}
    for k in ks:
        diffs = [e - s for e, s in zip(exact, sparse[k])]
        per_k[k] = {"sparse_kl_mean": mean(sparse[k]), "abs_diff_mean": mean(diffs), "abs_diff_max": max(diffs),
                    "rel_diff_mean": mean([d / e for d, e in zip(diffs, exact)]),
                    "teacher_mass_in_top_k_mean": mean(mass[k])}

    # 2. Speed: fill the cache (the teacher's cost, paid once), then alternate no-cache and cache-hit steps.
    with tempfile.TemporaryDirectory() as folder:
        cached = CachedTeacher(llm, TeacherCache(Path(folder)), a.timed_k, spec.temperature)
        tic = time.perf_counter()
        for i, batch in enumerate(batches):
            cached(batch, list(range(i * bs, (i + 1) * bs)))
        cached.cache.flush()
        fill_s = (time.perf_counter() - tic) / len(batches)
        opt = torch.optim.AdamW(distiller.parameters(), lr=spec.lr, fused=True)
        times = {"no_cache": [], "cache_hit": []}
        for i, batch in enumerate(batches):
            for mode in ("no_cache", "cache_hit"):
                use = cached if mode == "cache_hit" else None
                kl = SparseKL(spec.temperature) if use else ForwardKL(spec.temperature)
                tic = time.perf_counter()
                stats = step_loss(models, distiller, batch, recipe, Objective(kl, 1.0, spec.kl_weight, use),
                                  list(range(i * bs, (i + 1) * bs)))
                stats.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i:  # the first batch pays one-off allocation costs
                    times[mode].append(time.perf_counter() - tic)
        hits, forwards = cached.cache.hits, cached.forwards
    result = {"recipe": a.recipe, "overrides": a.overrides, "episodes": a.episodes, "batch_size": bs,
              "temperature": spec.temperature, "exact_kl_mean": mean(exact), "k": per_k,
              "timed_k": a.timed_k, "s_per_step_no_cache": mean(times["no_cache"]),
              "s_per_step_cache_hit": mean(times["cache_hit"]), "s_per_batch_teacher_fill": fill_s,
              "timed_steps_each": len(times["no_cache"]), "cache_hits_during_timing": hits,
              "teacher_forwards_after_fill": forwards - len(batches), "threads": torch.get_num_threads(), **stamp()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
