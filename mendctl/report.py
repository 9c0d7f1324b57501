"""`mendctl eval`'s results shown and written: the table, results.json, results.md and the plot.

Everything here reads the results in their results.json layout (results.py), so a saved
results.json can be shown again the same way without rerunning anything.
"""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .fileio import atomic_path, write_json

HEADER = ("method", "quality (%)", "FLOPs/query", "ratio to icl", "latency ms/query", "ratio", "memory",
          "distill FLOPs/set")


def _si(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _memory(n: int, estimated: bool) -> str:
    unit, scale = next(((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if n >= s), ("B", 1))
    return f"{n / scale:.1f} {unit}" + (" (est.)" if estimated else "")


def rows(results: dict) -> list[tuple[str, ...]]:
    estimated = results["memory_kind"] == "estimated"
    out = []
    for m, a in results["aggregate"].items():
        out.append((m, f"{100 * a['score']:.1f}", _si(a["flops_per_query"]), _ratio(a.get("flops_ratio_to_icl")),
                    f"{a['latency_ms_per_query']:.2f}" + (" (cached)" if a["from_cache"] else ""),
                    _ratio(a.get("latency_ratio_to_icl")), _memory(a["memory_bytes"], estimated),
                    _si(a.get("distill_flops_per_set", a.get("compress_flops_per_set")))))
    return out


def table(results: dict) -> Table:
    t = Table(*HEADER, title=escape(f"eval: {results['partition']} ({results['device']})"))
    for row in rows(results):
        t.add_row(*row)
    return t


def models_line(results: dict) -> str:
    """What was evaluated (provenance.models_stamp); the special tokens in backticks, or markdown would
    read `<s>` as a tag."""
    m = results["models"]
    specials = ", ".join(f"{name} " + ("none" if s["token"] is None else f"`{s['token']}` = {s['id']}")
                         for name, s in m["tokenizer"].items())
    return (f"LLM: `{m['llm_id']}` ({m['backend']}, config {m['llm_config_hash']}); distiller: "
            f"{m['distiller_hash']}; LLM tokenizer: {specials}")


def mend_vs_icl_line(results: dict) -> str:
    c = results["mend_vs_icl"]
    return f"MEND vs ICL: agreement {100 * c['agreement']:.1f}%, mean KL(icl || mend) {c['mean_kl']:.4f}"


def bootstrap_lines(results: dict) -> list[str]:
    if "bootstrap" not in results:
        return []
    b = results["bootstrap"]
    return [f"MEND - {key.removeprefix('mend_minus_')}: {100 * c['estimate']:+.1f} points, "
            f"{100 * b['level']:.0f}% CI [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] "
            f"(paired bootstrap over queries, {b['samples']} resamples, seed {b['seed']})"
            for key, c in b.items() if key.startswith("mend_minus_")]


def markdown(results: dict) -> str:
    lines = [f"# mendctl eval: {results['partition']}", "",
             f"device: {results['device']}; limit: {results['limit'] or 'none'} queries per task and seed; "
             f"seeds: {results['seeds']}; K = {results['num_vectors']}", "", models_line(results), "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(results)]
    if "mend_vs_icl" in results:
        lines += ["", mend_vs_icl_line(results)]
    if "llmlingua" in results:
        lines += ["", f"llmlingua: {results['llmlingua']['implementation']}; its distill FLOPs column is the "
                      "compression's scoring cost"]
    lines += [""] + bootstrap_lines(results) if "bootstrap" in results else []
    if any(a["from_cache"] for a in results["aggregate"].values()):
        lines += ["", "(cached): scores and latency read from the baseline cache; the latency is the one measured "
                      "when the entry was computed"]
    methods = list(results["aggregate"])
    lines += ["", "## Per task (mean over seeds, %)", "", "| task | metric | " + " | ".join(methods) + " |",
              "|" + "---|" * (len(methods) + 2)]
    for name, task in results["tasks"].items():
        scores = " | ".join(f"{100 * task['scores'][m]:.1f}" for m in methods)
        lines.append(f"| {name} | {task['metric']} | {scores} |")
    if results["memory_kind"] == "estimated":
        lines += ["", "memory (est.): analytic estimate of the KV cache and activations of the longest query, "
                      "weights excluded (no allocator counter on CPU); see docs/evaluation.md"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for m, a in results["aggregate"].items():
        ax.scatter(a["flops_per_query"], 100 * a["score"], s=40)
        ax.annotate(m, (a["flops_per_query"], 100 * a["score"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log")
    ax.set_xlabel("LLM forward FLOPs per query")
    ax.set_ylabel("quality (%, macro-F1 / accuracy)")
    ax.set_title(f"{results['partition']}: quality vs cost")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def vectors_note(results: dict) -> str:
    sources = [s["source"] for s in results["vectors"]["sources"].values()]
    note = f"mend vectors: {sources.count('file')} file(s) from {results['vectors']['dir']}"
    if "distilled" in sources:
        note += f", {sources.count('distilled')} set(s) distilled on the fly (run `mendctl distill` to save them)"
    return note


def write(results: dict, out: Path, console: Console) -> None:
    """results.json, results.md and quality_vs_cost.png in `out`, and the table on the console."""
    write_json(out / "results.json", results)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(markdown(results))
    console.print(table(results))
    if "mend_vs_icl" in results:
        console.print(mend_vs_icl_line(results))
    for line in bootstrap_lines(results):
        console.print(line)
    if "vectors" in results:
        console.print(vectors_note(results), markup=False)
    plot(results, out / "quality_vs_cost.png")
    console.print(f"results in {out / 'results.json'} and {out / 'results.md'}, plot {out / 'quality_vs_cost.png'}",
                  markup=False)
