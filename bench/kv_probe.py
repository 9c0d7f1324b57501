"""A training-free probe of per-layer vectors: the demonstrations' own keys and values at a few positions.

    .venv/bin/python bench/kv_probe.py RECIPE [--queries 20] [--sets 3] [--tasks a,b] [--set key=value ...]
        [--out JSON]

For each validation demonstration set (tasks.validation, or --tasks, x the first --sets seeds) the LLM
reads BOS + the demonstrations once, as ICL's prompt opens, and keeps the keys and values of every layer
at a few positions only; each query then runs after them, at the positions it holds in the ICL prompt,
and attends to nothing else. So a query sees what those positions gathered from the whole set, where
icl-truncated's last tokens see only themselves. Positions kept (BOS always):

- `kv-last`: the context's last `num_vectors` tokens;
- `kv-labels`: each demonstration's label, its last token (one per demonstration: `k` in all);
- `kv-labels+sep`: those and the token after each label (the separator that opens the next one).

Label positions aggregate the demonstrations' information in ICL (Wang et al., "Label Words are
Anchors", EMNLP 2023). Options are scored as eval scores them (mean per-token loss). Reported: macro-F1
(mean over sets, then tasks) and agreement with ICL, beside zero-shot, ICL and icl-truncated. A causal
LLM only. Nothing is trained; no test task is read.
"""
import statistics

import torch
from recipe_args import MethodTable, baseline_runs, build, parser

from mendctl.data.workspace import data_dir
from mendctl.evaluation.scoring import demo_set, query_set
from mendctl.models.render import _fill, context_ids


def label_spans(template, context: str, demos: list[dict]) -> list[tuple[int, int]]:
    """Character spans of the labels of the demonstrations that `context` holds (its newest ones)."""
    spans, end = [], len(context)
    for d in reversed(demos):
        out = _fill(template.output, output=d["output"])
        if end < len(out) or context[end - len(out):end] != out:
            break
        spans.append((end - len(out), end))
        end -= len(out)
        piece = context.rfind(template.separator, 0, end)
        if piece < 0:
            break
        end = piece
    return spans[::-1]


def positions(template, tok, context: str, demos: list[dict], mode: str, k: int, bos: int) -> list[int]:
    """Indices into BOS + context ids of the positions `mode` keeps (BOS's first)."""
    enc = tok(context, add_special_tokens=False, return_offsets_mapping=True)
    n = len(enc.input_ids)
    keep = list(range(bos))
    if mode == "kv-last":
        return keep + [bos + i for i in range(max(0, n - k), n)]
    ends = []
    for a, b in label_spans(template, context, demos):
        toks = [i for i, (s, e) in enumerate(enc.offset_mapping) if s < b and e > a]
        if toks:
            ends.append(toks[-1])
    chosen = set(ends)
    if mode == "kv-labels+sep":
        chosen |= {i + 1 for i in ends if i + 1 < n}
    return keep + [bos + i for i in sorted(chosen)]


def losses_after(llm, kv, x: torch.Tensor, options: list[torch.Tensor], start: int | None = None) -> torch.Tensor:
    """The options' mean per-token losses after the positions whose keys and values `kv` holds (each layer's
    (keys, values) [1, kv heads, n, head size]) and then the query input `x`, which begins at position
    `start` (n unless the kept positions sit where a longer context had them)."""
    from transformers import DynamicCache

    n = kv[0][0].shape[2]
    start = n if start is None else start
    cache = DynamicCache(ddp_cache_data=kv)
    pos = (start + torch.arange(x.shape[0], device=x.device))[None]
    out = llm._base()(inputs_embeds=llm.embed(x)[None], attention_mask=torch.ones(1, n + x.shape[0], dtype=torch.long,
                      device=x.device), position_ids=pos, cache=cache, use_cache=True)
    return llm._options_after(out.cache, n + x.shape[0], out.last_hidden_state[:, -1], options,
                              start=start + x.shape[0])


@torch.no_grad()
def kv_predictions(llm, ids: list[int], keep: list[int], qs, compact: bool = False) -> list[int]:
    """`compact`: the kept keys rotated to positions 0..n-1 (rotary embeddings rotate by position, so a
    key moves by one more rotation) and the query right after them; otherwise all stay where ICL has them."""
    from transformers.models.llama.modeling_llama import rotate_half

    base = llm._base()
    emb = llm.with_bos(llm.embed(torch.tensor(ids, dtype=torch.long, device=llm.device)))[None]
    full = base(inputs_embeds=emb, use_cache=True).cache
    idx = torch.tensor(keep, device=llm.device)
    kv = [(layer.keys.index_select(2, idx), layer.values.index_select(2, idx)) for layer in full.layers]
    start, n = emb.shape[1], len(keep)
    if compact:
        delta = (torch.arange(n, device=idx.device) - idx)[None]
        cos, sin = base.rotary_emb(emb, position_ids=delta)
        cos, sin = cos[:, None], sin[:, None]
        kv = [(k * cos + rotate_half(k) * sin, v) for k, v in kv]
        start = n
    preds = []
    for q in qs.queries:
        options = [torch.tensor(o, dtype=torch.long, device=llm.device) for o in q.options]
        losses = losses_after(llm, kv, torch.tensor(q.x, dtype=torch.long, device=llm.device), options, start)
        preds.append(int(losses.argmin()))
    return preds


def main() -> None:
    ap = parser(__doc__, "bench/results/kv_probe/probe.json")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--sets", type=int, default=3)
    ap.add_argument("--tasks", default=None, help="comma-separated tasks in place of tasks.validation")
    ap.add_argument("--modes", default="kv-last,kv-labels,kv-labels+sep")
    args = ap.parse_args()
    recipe, models, template = build(args, "eval")
    llm, tok, root, k = models.llm, models.llm_tokenizer, data_dir(recipe), recipe.tasks.k
    tasks = args.tasks.split(",") if args.tasks else recipe.tasks.validation
    modes = args.modes.split(",")
    table, kept = MethodTable(), {}
    for task in tasks:
        for seed in recipe.tasks.seeds[: args.sets]:
            ds = demo_set(root, task, k, seed, template, tok)
            qs = query_set(root, ds, k, template, tok, args.queries)
            ids = context_ids(template, ds.context, tok)
            runs = baseline_runs(recipe, models, template, qs)
            for mode in modes:
                name, compact = mode.removesuffix("@compact"), mode.endswith("@compact")
                keep = positions(template, tok, ds.context, ds.demos, name, recipe.num_vectors, llm.bos_len)
                kept.setdefault(mode, []).append(len(keep))
                runs[mode] = kv_predictions(llm, ids, keep, qs, compact)
            table.add(qs, runs)
        table.write(args.out, recipe=args.recipe, overrides=args.set, queries=args.queries, sets=args.sets,
                    positions_kept={m: statistics.fmean(v) for m, v in kept.items()})
    table.print()


if __name__ == "__main__":
    main()
