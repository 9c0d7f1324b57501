"""The whole pipeline on whatever accelerator this machine has: proves the CUDA path in about a minute.

    .venv/bin/python bench/device_smoke.py [--backend llama] [--mixed-precision bf16]

Runs pretrain, finetune (a few steps each), distill and eval on a tiny recipe through the CLI, then
writes bench/results/device_smoke.json with the device eval ran on, its peak memory (measured by
the CUDA allocator on a GPU, estimated on CPU) and each command's wall time. Training and eval take the
GPU whenever torch sees one; on a CPU-only machine the same steps run on CPU.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mendctl.core.provenance import stamp


def mendctl(*args: str) -> float:
    """Runs one command; its wall time in seconds, model loading included."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mendctl", *args], check=True)
    return round(time.perf_counter() - start, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="llama", choices=["gpt2", "t5", "llama"])
    ap.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    ap.add_argument("--out", default="bench/results/device_smoke.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = f"recipes/tiny/{a.backend}.yaml"
        common = [f"output_dir={tmp}"]
        seconds = {stage: mendctl(stage, recipe, *common, f"{stage}.steps=4", f"{stage}.save_every=2",
                                  f"{stage}.mixed_precision={a.mixed_precision}") for stage in ("pretrain", "finetune")}
        seconds["distill"] = mendctl("distill", recipe, *common)
        seconds["eval"] = mendctl("eval", recipe, *common, "--limit", "4")
        results = json.loads((Path(tmp) / "eval" / "results.json").read_text())
    summary = {"backend": a.backend, "mixed_precision": a.mixed_precision, "cuda_available": torch.cuda.is_available(),
               "eval_device": results["device"], "memory_kind": results["memory_kind"],
               "peak_memory_bytes": {m: v["memory_bytes"] for m, v in results["aggregate"].items()},
               "seconds": seconds | {"total": round(sum(seconds.values()), 2)}, **stamp()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
