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
            for n, raw in enumerate(f.open("rb"), 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{f}:{n}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise DataError(f"{f}:{n}: expected a JSON object with a \"text\" field holding a string")
                yield text
        else:
            yield f.read_text(encoding="utf-8", errors="replace")


HF_DATA_INSTALL = "pip install 'mendctl[hf-data]'"


def require_datasets():
    """The `datasets` package, imported only where stage 1 reads a dataset: validate and the commands
    that read no stage-1 text neither need it nor pay for its import."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"pretrain.hf_dataset needs the `datasets` package: {HF_DATA_INSTALL}") from None
    return datasets


def iter_hf(dataset_id: str, split: str, config: str | None = None) -> Iterator[str]:
    """The "text" field of a dataset's rows, streamed: a hub id (C4: allenai/c4, configuration en) is
    read as it downloads, never whole; a local folder of data files (or a copy of a hub repository)
    goes through the same call."""
    datasets = require_datasets()
    where = f"pretrain.hf_dataset {dataset_id!r}" + (f" (hf_config {config!r})" if config else "")
    try:
        rows = datasets.load_dataset(dataset_id, config, split=split, streaming=True)
    except FileNotFoundError as e:  # no such hub id or folder, or no data files in it
        raise DataError(f"{where}: {_first_line(e)}") from None
    except ValueError as e:  # an unknown configuration or split
        raise DataError(f"{where}, split {split!r}: {_first_line(e)}") from None
    for n, row in enumerate(rows, 1):
        text = row.get("text")
        if not isinstance(text, str):
            raise DataError(f"{where}: row {n} has no \"text\" field holding a string (fields: {', '.join(row)})")
        yield text


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__


def pieces(texts: Iterator[str], tokenizer, max_length: int) -> list[str]:
    """Texts cut, at whitespace, into pieces of about `max_length` tokens.

    Cutting is done on characters, at the tokenizer's characters-per-token ratio measured on a
    sample, so that a corpus is never tokenised as a whole up front: each piece is tokenised when
    a training step draws it.
    """
    texts = [t for t in texts if t.strip()]
    sample = "".join(texts)[:20000]
    ratio = len(sample) / max(1, len(tokenizer(sample, add_special_tokens=False).input_ids))
    size = max(16, int(max_length * ratio))
    out = []
    for text in texts:
        start = 0
        while start < len(text):
            end = start + size
            if end < len(text):
                space = text.rfind(" ", start + size // 2, end)
                end = space if space > 0 else end
            piece = text[start:end].strip()
            if len(piece) >= size // 4:  # a short tail teaches little and splits badly 80/20
                out.append(piece)
            start = end
    return out
