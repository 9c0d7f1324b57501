"""How MetaICL names its task files, and its settings, which the recipe schema's defaults, the BIG-bench
converter and the file names share: k demonstrations per set, drawn with each of the seeds; a
meta-train task's file holds up to META_TRAIN_SIZE examples shuffled with META_TRAIN_SEED, and those
two numbers are in its name. Reading the files is data/metaicl.py's."""
from __future__ import annotations

DEFAULT_K = 16
DEFAULT_SEEDS: tuple[int, ...] = (100, 13, 21, 42, 87)
META_TRAIN_SIZE = 16384
META_TRAIN_SEED = 100


def split_name(task: str, k: int, seed: int, split: str) -> str:
    return f"{task}_{k}_{seed}_{split}.jsonl"


# finetune.train_file's default: a pattern, "{task}" standing for each task's name.
META_TRAIN_FILE = split_name("{task}", META_TRAIN_SIZE, META_TRAIN_SEED, "train")
