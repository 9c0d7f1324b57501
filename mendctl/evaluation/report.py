"""`mendctl eval`'s results shown and written: the table, results.json, results.md and the plot.

Everything here reads the results in their results.json layout (results.py), so a saved
results.json can be shown again the same way without rerunning anything.
"""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from ..core.fileio import atomic_path, write_json

HEADER = ("method", "quality (%)", "FLOPs/query", "ratio to icl", "latency ms/query", "ratio", "memory",
          "one-off FLOPs/set")
# The terminal's headers: short enough that the table fits 80 columns; LEGEND says what they mean.
SHORT = ("method", "qual%", "FLOPs/q", "F/icl", "ms/q", "t/icl", "memory", "once/set")
LEGEND = ("qual%: macro-F1 or accuracy, mean over seeds then tasks. FLOPs/q, ms/q: LLM forward FLOPs and "
          "latency per query; F/icl, t/icl: the same as a ratio to icl's. once/set: one-off FLOPs per "
          "demonstration set (distiller pass + fitting steps; llmlingua's compression).")


def _si(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _memory(n: int) -> str:
    unit, scale = next(((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if n >= s), ("B", 1))
    return f"{n / scale:.1f} {unit}"


def _latency_mark(a: dict) -> str:
    """"*": scores from the cache, latency timed now on a sample; "c": the latency from the cache too."""
    if not a["from_cache"]:
        return ""
    return "*" if a["timed_queries"] else "c"


def rows(results: dict) -> list[tuple[str, ...]]:
    out = []
    for m, a in results["aggregate"].items():
        out.append((m, f"{100 * a['score']:.1f}", _si(a["flops_per_query"]), _ratio(a.get("flops_ratio_to_icl")),
                    f"{a['latency_ms_per_query']:.2f}{_latency_mark(a)}",
                    _ratio(a.get("latency_ratio_to_icl")), _memory(a["memory_bytes"]),
                    _si(a.get("distill_flops_per_set", a.get("compress_flops_per_set")))))
    return out


def title(results: dict) -> str:
    return f"eval: {results['partition']} ({results['device']})" + (" PARTIAL" if results.get("partial") else "")


def table(results: dict) -> Table:
    t = Table(title=title(results), box=None, padding=(0, 1), pad_edge=False, header_style="bold")
    for i, name in enumerate(SHORT):
        t.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows(results):
        t.add_row(*row)
    return t


def vertical(results: dict) -> list[str]:
    """The table as one block per method: for a console too narrow for its columns."""
    lines = [title(results)]
    for row in rows(results):
        lines += [row[0]] + [f"  {name}: {value}" for name, value in zip(SHORT[1:], row[1:])]
    return lines


def notes(results: dict) -> list[str]:
    """What the table's marks mean, the partial-run warning, and how the latencies were measured."""
    out = []
    if results.get("partial"):
        out.append(f"PARTIAL: {results['partial_reason']}; the scores and intervals are not the full test sets'")
    agg = results["aggregate"].values()
    if any(a["from_cache"] and a["timed_queries"] for a in agg):
        timed = ", ".join(f"{m} {a['timed_queries']}" for m, a in results["aggregate"].items()
                          if a["from_cache"] and a["timed_queries"])
        out.append(f"*: scores from the baseline cache; latency (and GPU memory) timed in this run on a sample "
                   f"of queries ({timed})")
    if any(a["from_cache"] and not a["timed_queries"] for a in agg):
        out.append("c: scores and latency from the baseline cache, the latency as measured when the entry was "
                   "computed (eval.retime_queries: 0)")
    if results["memory_kind"] == "estimated":
        out.append("memory: analytic estimate of the KV cache and activations of the longest query, weights "
                   "excluded (no allocator counter on CPU)")
    return out


def models_line(results: dict) -> str:
    """What was evaluated (provenance.models_stamp); the special tokens in backticks, or markdown would
    read `<s>` as a tag."""
    m = results["models"]
    specials = ", ".join(f"{name} " + ("none" if s["token"] is None else f"`{s['token']}` = {s['id']}")
                         for name, s in m["tokenizer"].items())
    return (f"LLM: `{m['llm_id']}` ({m['backend']}, config {m['llm_config_hash']}); distiller: "
            f"{m['distiller_hash']}; LLM tokenizer: {specials}")


def vs_icl_lines(results: dict) -> list[str]:
    return [f"{row} vs icl: agreement {100 * c['agreement']:.1f}%, mean KL(icl || {row}) {c['mean_kl']:.4f}"
            for row, c in results.get("vs_icl", {}).items()]


def bootstrap_lines(results: dict) -> list[str]:
    if "bootstrap" not in results:
        return []
    b = results["bootstrap"]
    level = f"{100 * b['level']:.0f}% CI"
    out = [f"{d['a']} - {d['b']}: {100 * d['estimate']:+.1f} points, "
           + (f"{level} n/a ({d['too_few']})" if "too_few" in d else
              f"{level} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]")
           for d in b["differences"]]
    return out + [f"(bootstrap: {b['resampled']}; {b['samples']} resamples, seed {b['seed']})"] if out else []


def markdown(results: dict) -> str:
    q = results["queries"]
    lines = [f"# mendctl eval: {results['partition']}" + (" (PARTIAL)" if results.get("partial") else ""), "",
             f"device: {results['device']}; limit: {results['limit'] or 'none'} queries per task and seed "
             f"({q['scored']} of {q['available']} scored); seeds: {results['seeds']}; K = {results['num_vectors']}",
             "", models_line(results), "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(results)]
    lines += ["", *notes(results)]
    if "vs_icl" in results:
        lines += ["", *vs_icl_lines(results)]
    if "llmlingua" in results:
        lines += ["", f"llmlingua: {results['llmlingua']['implementation']}; its one-off FLOPs column is the "
                      "compression's scoring cost"]
    lines += [""] + bootstrap_lines(results) if "bootstrap" in results else []
    methods = list(results["aggregate"])
    lines += ["", "## Per task (mean over seeds, %)", "", "| task | metric | " + " | ".join(methods) + " |",
              "|" + "---|" * (len(methods) + 2)]
    for name, task in results["tasks"].items():
        scores = " | ".join(f"{100 * task['scores'][m]:.1f}" for m in methods)
        lines.append(f"| {name} | {task['metric']} | {scores} |")
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


def vectors_notes(results: dict) -> list[str]:
    out = []
    for row, v in results["vectors"].items():
        sources = [s["source"] for s in v["sources"].values()]
        note = f"{row} vectors: {sources.count('file')} file(s) from {v['dir']}"
        if "distilled" in sources:
            note += f", {sources.count('distilled')} set(s) made on the fly (run `mendctl distill` to save them)"
        out.append(note)
    return out


def write(results: dict, out: Path, console: Console) -> None:
    """results.json, results.md and quality_vs_cost.png in `out`, and the table on the console."""
    write_json(out / "results.json", results)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(markdown(results))
    shown = table(results)
    if Measurement.get(console, console.options.update_width(10_000), shown).maximum <= console.width:
        console.print(shown)
    else:
        for line in vertical(results):
            console.print(line, highlight=False)
    for line in [LEGEND, *notes(results), *vs_icl_lines(results), *bootstrap_lines(results),
                 *(vectors_notes(results) if "vectors" in results else [])]:
        console.print(line, highlight=False)
    plot(results, out / "quality_vs_cost.png")
    console.print(f"results in {out / 'results.json'} and {out / 'results.md'}, plot {out / 'quality_vs_cost.png'}")
