"""Plain text for stage 1: local .txt files and folders of them, .jsonl with a "text" field, a
streamed Hugging Face dataset, or BIG-bench passages."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .metaicl import DataError


def _files(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl") and q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: not found")
    if not out:
        raise DataError(f"no .txt or .jsonl files in {', '.join(map(str, paths))}")
    return out


def iter_local(paths: list[Path]) -> Iterator[str]:
    """Documents: each .txt file is one, each .jsonl line's "text" is one."""
    for f in _files(paths):
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.open(encoding="utf-8"), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{f}:{n}: expected a JSON object with a \"text\" field") from None
                yield text
        else:
            yield f.read_text(encoding="utf-8", errors="replace")


def iter_hf(dataset_id: str, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError("pretrain.hf_dataset needs the `datasets` package: pip install datasets") from None
    for row in datasets.load_dataset(dataset_id, split=split, streaming=True):
        yield row["text"]


def chunk_ids(texts: Iterator[str], tokenizer, max_length: int, min_length: int) -> list[list[int]]:
    """Tokenised documents cut into windows of max_length tokens; shorter tails than min_length dropped."""
    chunks = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        chunks += [ids[i:i + max_length] for i in range(0, len(ids), max_length) if len(ids) - i >= min_length]
    return chunks
