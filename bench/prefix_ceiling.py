"""The fitted ceiling of per-layer prefixes beside that of input embeddings, on the validation tasks.

    .venv/bin/python bench/prefix_ceiling.py RECIPE [--steps 0,5,15] [--kv-lr 0.03] [--set key=value ...]
        [--out JSON]

Both forms start from the same point, each validation set's anchors (the recipe's `distiller.anchor`
tokens; `last`: the demonstrations' last num_vectors tokens, icl-truncated's prefix):
- `embeddings`: the K anchor embeddings, fitted by `refine` as `distill.refine_from: anchors` fits them;
- `per-layer`: the keys and values every layer holds at those K positions after BOS + the anchors, all
  fitted directly (prefix tuning's form, Li and Liang 2021; Gist tokens, Mu et al. 2023): 2 x layers x
  kv heads x head size numbers a vector where an embedding has hidden size.
Both are fitted on the same loss, `refine`'s: the option KL to ICL over the set's leave-one-out episodes
plus distill.refine_ce_weight times each demonstration's label loss, with Adam. The embeddings take
distill.refine_lr; each layer's keys and values take steps of --kv-lr times their own RMS at the start
(the two forms' numbers differ in size from layer to layer).

Each form is scored at every listed step on the set's queries the same way: the LLM reads the form's
keys and values (an embedding prefix is first run through the LLM to give them) and then the query,
its options scored as eval scores them. Reported per step: macro-F1 and agreement with ICL and KL(ICL ||
form), each a mean over sets, then tasks, beside zero-shot and ICL. A causal LLM with a dynamic cache
only. Nothing reads a test task.
"""
import json
import time

import torch
from kv_probe import losses_after
from recipe_args import parser

from mendctl.core.config import load_recipe
from mendctl.core.provenance import stamp
from mendctl.core.registry import get_backend
from mendctl.data.prepare import prepare
from mendctl.evaluation import metrics
from mendctl.evaluation.scoring import MethodRun, predicted
from mendctl.models.anchors import anchor_embeddings
from mendctl.training.curves import Validation
from mendctl.training.refine import adam_steps, option_episodes, refine


def prefix_kv(llm, embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) [1, kv heads, BOS + K, head size] after BOS + `embeds`."""
    out = llm._base()(inputs_embeds=llm.with_bos(embeds)[None], use_cache=True)
    return [(layer.keys, layer.values) for layer in out.cache.layers]


class PerLayer(torch.nn.Module):
    """Keys and values at K positions after BOS, each layer's moved by `scale` times its start's RMS a unit."""

    def __init__(self, kv):
        super().__init__()
        self.start = [(k.detach(), v.detach()) for k, v in kv]
        self.scale = [(k[:, :, 1:].pow(2).mean().sqrt(), v[:, :, 1:].pow(2).mean().sqrt()) for k, v in self.start]
        self.delta = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros_like(t[:, :, 1:]))
                                            for k, v in self.start for t in (k, v))

    def kv(self):
        out = []
        for i, ((k, v), (sk, sv)) in enumerate(zip(self.start, self.scale)):
            # BOS stays as it is: every query attends to it most (an attention sink), whatever the set
            out.append((torch.cat([k[:, :, :1], k[:, :, 1:] + sk * self.delta[2 * i]], 2),
                        torch.cat([v[:, :, :1], v[:, :, 1:] + sv * self.delta[2 * i + 1]], 2)))
        return out


def fit_per_layer(llm, kv, demos, template, tok, steps: int, lr: float, ce_weight: float, keep) -> None:
    """`refine`'s fitting with the per-layer keys and values as the parameters; `keep(n, kv)` after step n."""
    ep = option_episodes(llm, demos, template, tok)
    prefix = PerLayer(kv)

    def loss_of():
        now = prefix.kv()
        return ep.loss([losses_after(llm, now, x, o) for x, o in zip(ep.xs, ep.options)], ce_weight)

    adam_steps(list(prefix.parameters()), loss_of, steps, lr,
               lambda n: keep(n, [(k.detach(), v.detach()) for k, v in prefix.kv()]))


@torch.no_grad()
def run_on(llm, kv, qs) -> MethodRun:
    run = MethodRun()
    for q in qs.queries:
        options = [torch.tensor(o, dtype=torch.long, device=llm.device) for o in q.options]
        losses = losses_after(llm, kv, torch.tensor(q.x, dtype=torch.long, device=llm.device), options)
        run.predictions.append(int(losses.argmin()))
        run.losses.append(losses.tolist())
    return run


def main() -> None:
    ap = parser(__doc__, "bench/results/prefix_ceiling/ceiling.json")
    ap.add_argument("--steps", default="0,5,15")
    ap.add_argument("--kv-lr", type=float, default=0.03, help="per-layer steps, in units of each layer's RMS")
    args = ap.parse_args()
    steps = sorted({int(s) for s in args.steps.split(",")})
    recipe = load_recipe(args.recipe, args.set)
    prepare(recipe, "eval")
    backend = get_backend(recipe.backend)
    models, template = backend.build(recipe), backend.template(recipe)
    llm, tok, spec, ft = models.llm, models.llm_tokenizer, recipe.distill, recipe.finetune
    validation = Validation(recipe, models, template, ft.eval_queries, ft.eval_sets)
    if validation.anchors is None:
        raise SystemExit(f"{args.recipe}: distiller.anchor is none, so there is no start to fit from (set it to last)")
    anchors = list(anchor_embeddings(llm, validation.anchors, recipe.num_vectors))
    # runs[form][step]: one MethodRun per validation set
    runs = {form: {s: [] for s in steps} for form in ("embeddings", "per-layer")}
    tic = time.perf_counter()
    for qs, anchor, icl in zip(validation.sets, anchors, validation.icl):
        demos = qs.demos.demos
        with torch.no_grad():
            kv0 = prefix_kv(llm, anchor)
        fitted = {"embeddings": {0: kv0}, "per-layer": {0: kv0}}

        def keep_embeddings(n, v):
            if n in runs["embeddings"]:
                with torch.no_grad():
                    fitted["embeddings"][n] = prefix_kv(llm, v)

        def keep_kv(n, kv):
            if n in runs["per-layer"]:
                fitted["per-layer"][n] = kv

        refine(llm, anchor, demos, template, tok, steps[-1], spec.refine_lr, "options", spec.refine_ce_weight,
               after_step=keep_embeddings)
        fit_per_layer(llm, kv0, demos, template, tok, steps[-1], args.kv_lr, spec.refine_ce_weight, keep_kv)
        line = []
        for form, by_step in fitted.items():
            for s, kv in by_step.items():
                run = run_on(llm, kv, qs)
                runs[form][s].append(run)
                line.append(f"{form}@{s} {100 * metrics.macro_f1(predicted(run.predictions, qs), qs.golds):.1f}"
                            f"/{metrics.mean_kl(icl.losses, run.losses):.3f}")
        print(f"{qs.key} {time.perf_counter() - tic:.0f}s F1/KL: " + ", ".join(line), flush=True)

    def f1(run, qs):
        return metrics.macro_f1(predicted(run.predictions, qs), qs.golds)

    points = {}
    for form, by_step in runs.items():
        for s, rs in by_step.items():
            points[f"{form}@{s}"] = {
                "form": form, "steps": s,
                "val_f1": validation._mean(map(f1, rs, validation.sets)),
                "val_agreement": validation._mean(metrics.agreement(i.predictions, r.predictions)
                                                  for i, r in zip(validation.icl, rs)),
                "val_kl": validation._mean(metrics.mean_kl(i.losses, r.losses) for i, r in zip(validation.icl, rs)),
                "per_set_f1": {qs.key: f1(r, qs) for r, qs in zip(rs, validation.sets)}}
    print("| form | steps | macro-F1 | agreement with ICL | KL(ICL, form) |")
    print("|---|---|---|---|---|")
    for p in points.values():
        print(f"| {p['form']} | {p['steps']} | {100 * p['val_f1']:.1f} | {p['val_agreement']:.2f} | {p['val_kl']:.3f} |")
    b = validation.baselines
    print(f"ICL {100 * b['val_icl_f1']:.1f}, zero-shot {100 * b['val_zero_shot_f1']:.1f} "
          f"(agreement {b['val_zero_shot_agreement']:.2f}, KL {b['val_zero_shot_kl']:.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"recipe": args.recipe, "overrides": args.set, "steps": steps, "kv_lr": args.kv_lr,
                                    "points": points, "baselines": b, "seconds": time.perf_counter() - tic,
                                    **stamp()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
