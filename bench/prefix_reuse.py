"""Scoring one ICL query set with the prefix run once (prefix cache, queries packed) against the
scoring as it was before, which ran prefix + query for every query.

    .venv/bin/python bench/prefix_reuse.py tasks.bigbench=null tasks.data_dir=DATA [--queries 20] [--rounds 3]

(DATA: BIG-bench converted, `mendctl data bigbench --fetch DATA`.) The demo recipe's LLM (SmolLM2-135M)
scores the first `queries` test queries of the first test task and seed after its embedded
demonstrations, as `mendctl eval` scores `icl`. The ways timed, each over the whole set:

- `before`: the scoring before the prefix cache (commit 1ca9fc5's CausalLM.option_losses, kept below
  verbatim): prefix + query per query, then every option token but the first on a copy of its cache
  per option;
- `per_query`: today's code without the cache (`score(..., reuse_prefix=False)`): prefix + query per
  query, options without their last token;
- `reused_pack1`, `reused_pack{N}`: the prefix once, then the queries one at a time or N together
  (`scoring.PACK` is the default), the prefix's time included.

One untimed query first absorbs start-up costs; then the ways alternate, `rounds` times each, so all
see the same load on a busy machine; speedups are ratios of the medians. `--synthetic N` replaces the
demonstrations by N random tokens (for when no task data is at hand). Writes bench/results/prefix_reuse.json.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mendctl.core.config import load_recipe
from mendctl.models.lm import _cut_left
from mendctl.models.padding import pad
from mendctl.data.prepare import prepare
from mendctl.core.provenance import stamp
from mendctl.core.registry import get_backend
from mendctl.models.render import context_ids
from mendctl.evaluation.scoring import PACK, demo_sets, option_losses, query_set, score
from mendctl.data.workspace import data_dir


def before_option_losses(self, prefix, x, options):
    """CausalLM.option_losses as of commit 1ca9fc5, before the prefix cache."""
    if self.max_positions is not None:
        options = [o[: self.max_positions - 1] for o in options]
        room = self.max_positions - max(o.shape[0] for o in options)
        prefix, x = _cut_left(room, prefix, x)
    ctx = torch.cat([self.with_bos(prefix), self.embed(x)]).unsqueeze(0)
    out = self._base()(inputs_embeds=ctx, use_cache=True)
    cache = out.cache
    first = F.log_softmax(self.head(out.last_hidden_state[:, -1]), -1)[0]
    n, c = len(options), ctx.shape[1]
    loss_sum = torch.stack([-first[o[0]] for o in options])
    lengths = torch.tensor([o.shape[0] for o in options], device=ctx.device)
    if int(lengths.max()) > 1:
        ids, mask = pad(options, self.pad_token_id)
        cache.batch_repeat_interleave(n)
        full_mask = torch.cat([mask.new_ones(n, c), mask], dim=1)
        pos = (c + torch.arange(ids.shape[1], device=ids.device)).unsqueeze(0).expand(n, -1)
        hidden = self._base()(inputs_embeds=self.embed(ids), attention_mask=full_mask, position_ids=pos,
                              cache=cache).last_hidden_state
        rows, cols = torch.nonzero(mask[:, 1:], as_tuple=True)
        logp = F.log_softmax(self.head(hidden[rows, cols]), -1)
        tok_loss = -logp.gather(1, ids[rows, cols + 1].unsqueeze(1)).squeeze(1)
        loss_sum = loss_sum.index_add(0, rows, tok_loss)
    return loss_sum / lengths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--recipe", default="recipes/llama/smollm2-demo.yaml")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--packs", default=f"1,{PACK},20", help="queries per pack to time with the cache")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared CPU)")
    ap.add_argument("--synthetic", type=int, default=0, help="a prefix of this many random tokens instead")
    ap.add_argument("--out", default="bench/results/prefix_reuse.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    recipe = load_recipe(a.recipe, a.overrides)
    prepare(recipe, "eval")
    backend = get_backend(recipe.backend)
    models = backend.build(recipe)
    llm, template, tok = models.llm, backend.template(recipe), models.llm_tokenizer
    ds = demo_sets(recipe, template, tok)[0]
    qs = query_set(data_dir(recipe), ds, recipe.tasks.k, template, tok, a.queries)
    ids = context_ids(template, ds.context, tok)
    if a.synthetic:
        ids = torch.randint(1000, 20000, (a.synthetic,), generator=torch.Generator().manual_seed(0)).tolist()
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=llm.device)

    def before() -> list[list[float]]:
        return [before_option_losses(llm, prefix, as_t(q.x), [as_t(o) for o in q.options]).tolist()
                for q in qs.queries]

    ways = {"before": before,
            "per_query": lambda: score(llm, prefix, qs, models.gated_mlp, reuse_prefix=False).losses}
    for n in map(int, a.packs.split(",")):
        ways[f"reused_pack{n}"] = lambda n=n: score(llm, prefix, qs, models.gated_mlp, pack=n).losses
    times, losses = {name: [] for name in ways}, {}
    with torch.no_grad():
        prefix = llm.embed(as_t(ids))
        option_losses(llm, prefix, qs.queries[0])  # untimed: start-up costs
        for _ in range(a.rounds):
            for name, way in ways.items():
                tic = time.perf_counter()
                losses[name] = way()
                times[name].append(time.perf_counter() - tic)
    med = {name: statistics.median(t) for name, t in times.items()}
    ref = losses["before"]
    summary = {
        "recipe": a.recipe, "overrides": a.overrides, "task": ds.task, "seed": ds.seed,
        "prefix": "synthetic random tokens" if a.synthetic else "icl (embedded demonstrations)",
        "prefix_tokens": len(ids), "bos": llm.bos_len, "queries": len(qs.queries),
        "query_tokens_mean": statistics.fmean(len(q.x) for q in qs.queries),
        "options_per_query_mean": statistics.fmean(len(q.options) for q in qs.queries),
        "option_tokens_mean": statistics.fmean(len(o) for q in qs.queries for o in q.options),
        "threads": a.threads, "rounds": a.rounds,
        "set_seconds": times, "set_seconds_median": med,
        "speedup_over_before": {name: med["before"] / m for name, m in med.items()},
        "speedup_over_before_per_round": {name: [b / t for b, t in zip(times["before"], ts)]
                                          for name, ts in times.items()},
        "max_abs_loss_diff_to_before": {name: max(abs(u - v) for lu, lv in zip(ref, ls) for u, v in zip(lu, lv))
                                        for name, ls in losses.items()},
        "same_predictions_as_before": {name: [min(range(len(v)), key=v.__getitem__) for v in ls]
                                       == [min(range(len(v)), key=v.__getitem__) for v in ref]
                                       for name, ls in losses.items()},
        "provenance": stamp(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("task", "prefix_tokens", "queries", "set_seconds_median",
                                              "speedup_over_before", "max_abs_loss_diff_to_before")}, indent=2))


if __name__ == "__main__":
    main()
