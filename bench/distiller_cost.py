"""What a distiller costs to train and to ship: full copy vs frozen embeddings vs LoRA on shared layers.

    PYTHONPATH=. .venv/bin/python bench/distiller_cost.py [--steps 6] [--out-root runs/distiller-cost]
        [-o tasks.bigbench=null -o tasks.data_dir=/path/to/bb]

Runs stage 2 (`finetune`) of the demo recipe for a few steps once per variant, each in a fresh
process so that its peak RSS is its own, and writes bench/results/distiller_cost.json: trainable
parameters, the saved distiller.safetensors and last checkpoint in MB, seconds per step (the first
step, which pays one-off allocations, left out), RSS after building the models and at its peak, and
each number as a ratio to the full copy.
"""
from demo_setting import AS_MEASURED  # bench/ is on sys.path when a bench script runs
import argparse
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "full_copy": [],
    "freeze_embeddings": ["distiller.freeze_embeddings=true"],
    "lora_r16_shared": ["distiller.lora={r: 16, alpha: 32}"],
}
MB = 1e6


def rss_mb() -> float:
    import psutil  # installed with accelerate

    return psutil.Process().memory_info().rss / MB


def child(recipe_path: str, overrides: list[str], steps: int) -> dict:
    """One training run in this process; what it measured."""
    from rich.console import Console

    import mendctl.models.backend
    from mendctl.models.adapters import trainable_state
    from mendctl.core.config import load_recipe
    from mendctl.data.prepare import prepare
    from mendctl.commands.train import train

    seen = {}
    real_build = mendctl.models.backend.Backend.build

    def build(self, recipe):
        models = real_build(self, recipe)
        seen["models"], seen["rss_after_build_mb"] = models, rss_mb()
        return models

    mendctl.models.backend.Backend.build = build
    recipe = load_recipe(recipe_path, [*overrides, f"finetune.steps={steps}", f"finetune.save_every={steps}"])
    shutil.rmtree(recipe.output_dir, ignore_errors=True)
    prepare(recipe, "finetune")
    path = train(recipe, "finetune", console=Console(quiet=True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux: KiB
    elapsed = [json.loads(line)["elapsed_s"] for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    ckpt = path.parent / "checkpoints" / f"step_{steps:07d}"
    distiller = seen["models"].distiller
    return {"trainable_params": sum(p.numel() for p in trainable_state(distiller).values()),
            "distiller_params": sum(p.numel() for p in distiller.parameters()),
            "distiller_file_mb": path.stat().st_size / MB,
            "checkpoint_mb": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / MB,
            "seconds_per_step": (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1),
            "rss_after_build_mb": seen["rss_after_build_mb"], "peak_rss_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/llama/smollm2-demo.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out-root", default="runs/distiller-cost", help="output_dir of each variant's run, by name")
    ap.add_argument("-o", "--override", action="append", default=[], help="recipe override, key=value")
    ap.add_argument("--out", default="bench/results/distiller_cost.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        overrides = [*AS_MEASURED, *a.override, *VARIANTS[a.child], f"output_dir={Path(a.out_root) / a.child}"]
        print(json.dumps(child(a.recipe, overrides, a.steps)))
        return
    from mendctl.core.provenance import stamp

    results = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--child", name, "--recipe", a.recipe, "--steps", str(a.steps),
               "--out-root", a.out_root, *[f"--override={o}" for o in a.override]]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    base = results["full_copy"]
    for r in results.values():
        r["ratio_to_full_copy"] = {k: r[k] / base[k] for k in ("trainable_params", "distiller_file_mb", "checkpoint_mb",
                                                                "seconds_per_step", "peak_rss_mb")}
    out = {"recipe": a.recipe, "overrides": a.override, "stage": "finetune", "steps": a.steps,
           "variants": results, **stamp()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
