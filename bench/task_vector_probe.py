"""A training-free task-vector probe on the validation tasks: does one hidden state carry the task?

    .venv/bin/python bench/task_vector_probe.py RECIPE [--layers 6-15] [--queries 40] [--sets 3]
        [--mode add|replace] [--set key=value ...] [--out JSON]

For each validation demonstration set (tasks.validation x the first --sets seeds), the task vector at
layer l is the mean, over the k leave-one-out ICL prompts (k-1 demonstrations, then the left-out
demonstration's input as the query), of the hidden state that decoder layer l outputs at the query's
last position, where the LLM predicts the answer (Hendel et al. 2023; Todd et al. 2024). Each test
query is then scored zero-shot, with that vector added to (or put in place of) layer l's output at
its last position, as eval scores options (mean per-token loss). Reported per layer: macro-F1 (mean
over sets, then tasks), agreement with ICL; beside zero-shot, ICL and icl-truncated. A causal LLM
only. Nothing is trained; no test task is read.
"""
import torch
from recipe_args import MethodTable, baseline_runs, build, parser

from mendctl.data.workspace import data_dir
from mendctl.evaluation.scoring import demo_set, query_set
from mendctl.models.render import context_ids, render_context, render_query


class Patch:
    """Adds `vector` to (or puts it in place of) decoder layer `layer`'s output at the last position,
    on the one forward pass that reads the query (not on the options' pass after it)."""

    def __init__(self, layers, mode: str):
        self.layers, self.mode, self.vector, self.layer, self.armed = layers, mode, None, None, False
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(layers)]

    def _hook(self, i):
        def hook(module, args, out):
            if not self.armed or i != self.layer:
                return None
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[:, -1] = self.vector if self.mode == "replace" else h[:, -1] + self.vector
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return hook


def task_vectors(llm, template, demos, tok, layers: list[int]) -> dict[int, torch.Tensor]:
    """Per layer, the mean last-position hidden state of the leave-one-out ICL prompts."""
    acc = {l: [] for l in layers}
    for i, held in enumerate(demos):
        context = render_context(template, demos[:i] + demos[i + 1:], tok)
        q = render_query(template, held["input"], held["options"], tok, after_context=bool(context))
        ids = torch.tensor(context_ids(template, context, tok) + q.x, dtype=torch.long, device=llm.device)
        emb = llm.with_bos(llm.embed(ids)).unsqueeze(0)
        out = llm._base()(inputs_embeds=emb, output_hidden_states=True)
        for l in layers:
            acc[l].append(out.hidden_states[l + 1][0, -1])
    return {l: torch.stack(v).mean(0) for l, v in acc.items()}


@torch.no_grad()
def patched_predictions(llm, qs, patch: Patch) -> list[int]:
    preds = []
    for q in qs.alone:
        x = torch.tensor(q.x, dtype=torch.long, device=llm.device)
        options = [torch.tensor(o, dtype=torch.long, device=llm.device) for o in q.options]
        ctx = llm.with_bos(llm.embed(x)).unsqueeze(0)
        patch.armed = True
        out = llm._base()(inputs_embeds=ctx, use_cache=True)
        patch.armed = False
        preds.append(int(llm._options_after(out.cache, ctx.shape[1], out.last_hidden_state[:, -1], options).argmin()))
    return preds


def main() -> None:
    ap = parser(__doc__, "bench/results/task_vector_probe/probe.json")
    ap.add_argument("--layers", default="6-15")
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--sets", type=int, default=3)
    ap.add_argument("--mode", choices=["add", "replace"], default="add")
    args = ap.parse_args()
    lo, hi = map(int, args.layers.split("-"))
    layers = list(range(lo, hi + 1))
    recipe, models, template = build(args, "eval")
    llm, tok, root, k = models.llm, models.llm_tokenizer, data_dir(recipe), recipe.tasks.k
    patch = Patch(llm._base().layers, args.mode)
    table = MethodTable()
    for task in recipe.tasks.validation:
        for seed in recipe.tasks.seeds[: args.sets]:
            ds = demo_set(root, task, k, seed, template, tok)
            qs = query_set(root, ds, k, template, tok, args.queries)
            runs = baseline_runs(recipe, models, template, qs)
            with torch.no_grad():
                vectors = task_vectors(llm, template, ds.demos, tok, layers)
            for l in layers:
                patch.layer, patch.vector = l, vectors[l]
                runs[f"layer{l}"] = patched_predictions(llm, qs, patch)
            table.add(qs, runs)
        table.write(args.out, recipe=args.recipe, overrides=args.set, mode=args.mode, queries=args.queries,
                    sets=args.sets, layers=layers)
    table.print()


if __name__ == "__main__":
    main()
