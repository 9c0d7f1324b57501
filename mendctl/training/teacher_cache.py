"""The teacher's next-token distributions, computed once and reused by every run that draws them.

The LLM is frozen and example p of a stage is a pure function of (seed, p) (examples.py), so the
teacher's distribution at example position p is the same in every run of the same data: a second
run with another lr, distiller or K reads it instead of running the teacher again. For each
position a shard stores, at each loss row, the teacher's top-k log-probabilities at the recipe's
temperature and their token ids, the log of the mass outside them, and the log-prob of the target
token at T=1 (the trainer logs the teacher's CE).

Two guards against stale use: the folder is named by a hash of everything that determines the
teacher (`teacher_key`), and each position carries a hash of the teacher's input ids (ctx, x, y),
checked on every read, so an example that changed for a reason the key missed is recomputed.
Shards are written atomically under a file lock, merging what is on disk, so that concurrent runs
(and a `mendctl teacher` filler) add to them without losing each other's positions.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.fileio import atomic_path, write_json
from ..models.lm import TargetLogits

SHARD = 256  # positions per file
FORMAT = 1   # bump when what a shard holds changes


@dataclass
class TopK:
    """The teacher at N loss rows, in the order of the student's rows."""

    logp: torch.Tensor         # [N, k] log-probs at temperature T, largest first
    ids: torch.Tensor          # [N, k] their token ids
    log_rest: torch.Tensor     # [N] log of the mass outside the top k (-inf when k covers the vocabulary)
    target_logp: torch.Tensor  # [N] log-prob of the target token at T=1

    def to(self, device) -> "TopK":
        return TopK(*(t.to(device) for t in self._fields()))

    def rows(self, mask: torch.Tensor) -> "TopK":
        return TopK(*(t[mask] for t in self._fields()))

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return self.logp, self.ids, self.log_rest, self.target_logp

    @staticmethod
    def cat(parts: list["TopK"]) -> "TopK":
        return TopK(*(torch.cat(ts) for ts in zip(*(p._fields() for p in parts))))


def sparsify(logits: torch.Tensor, targets: torch.Tensor, top_k: int, temperature: float) -> TopK:
    """The top-k of the teacher's distribution at temperature T, and what a loss needs besides."""
    logp = F.log_softmax(logits.float() / temperature, -1)
    top, ids = logp.topk(min(top_k, logp.shape[-1]), -1)
    rest = logp.scatter(1, ids, float("-inf")).logsumexp(-1)
    target = F.log_softmax(logits.float(), -1).gather(1, targets.unsqueeze(1)).squeeze(1)
    # ids as int32: half the disk of int64, and every vocabulary fits.
    return TopK(top, ids.int(), rest, target)


def input_hash(ctx: list[int], x: list[int], y: list[int]) -> str:
    return hashlib.sha256(json.dumps([ctx, x, y]).encode()).hexdigest()[:16]


def teacher_logits(llm, batch: list) -> TargetLogits:
    """The LLM reading each example's raw demonstrations before its query, rows in batch order; the
    examples of one episode (the same demonstrations) share one pass over them."""
    as_t = lambda ids: torch.tensor(ids, dtype=torch.long, device=llm.device)  # noqa: E731
    episodes: dict[tuple, list[int]] = {}
    for i, e in enumerate(batch):
        episodes.setdefault(tuple(e.ctx), []).append(i)
    # Examples alone in their episode run padded together, as one batch.
    groups = [m for m in episodes.values() if len(m) > 1]
    alone = [m[0] for m in episodes.values() if len(m) == 1]
    parts = []
    for members in groups + ([alone] if alone else []):
        xs, ys = [as_t(batch[i].x) for i in members], [as_t(batch[i].y) for i in members]
        if members is alone:
            out = llm.target_logits([llm.embed(as_t(batch[i].ctx)) for i in members], xs, ys)
        else:  # one episode: its demonstrations embedded once, for the shared prefix
            out = llm.shared_target_logits(llm.embed(as_t(batch[members[0]].ctx)), xs, ys)
        parts.append(TargetLogits(out.logits, out.targets, out.is_y, torch.tensor(members, device=llm.device)[out.example]))
    out = TargetLogits(*(torch.cat(ts) for ts in zip(*((p.logits, p.targets, p.is_y, p.example) for p in parts))))
    order = torch.argsort(out.example, stable=True)
    return TargetLogits(out.logits[order], out.targets[order], out.is_y[order], out.example[order])


class TeacherCache:
    """Shards of TopK per example position in `folder`; `hits` and `misses` count lookups."""

    def __init__(self, folder: Path, shard_size: int = SHARD):
        self.folder, self.shard_size = Path(folder), shard_size
        self.hits = self.misses = 0
        self._loaded: dict[int, tuple[tuple, dict[str, str], dict[str, torch.Tensor]]] = {}
        self._pending: dict[int, dict[int, tuple[str, TopK]]] = {}

    def _path(self, shard: int) -> Path:
        return self.folder / f"shard_{shard:07d}.safetensors"

    def _read(self, shard: int) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        path = self._path(shard)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return {}, {}
        version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = self._loaded.get(shard)
        if cached is None or cached[0] != version:  # new, or rewritten by another run since
            with safe_open(path, "pt") as f:
                cached = (version, f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()})
            # Training walks positions in order: the shard before is enough to keep.
            self._loaded = {s: v for s, v in self._loaded.items() if s == shard - 1}
            self._loaded[shard] = cached
        return cached[1], cached[2]

    def get(self, position: int, digest: str) -> TopK | None:
        shard = position // self.shard_size
        pending = self._pending.get(shard, {}).get(position)
        if pending is not None and pending[0] == digest:
            self.hits += 1
            return pending[1]
        meta, tensors = self._read(shard)
        if meta.get(str(position)) != digest:  # absent, or made from other inputs: stale
            self.misses += 1
            return None
        self.hits += 1
        return TopK(*(tensors[f"{position}.{n}"] for n in ("logp", "ids", "log_rest", "target_logp")))

    def put(self, position: int, digest: str, top: TopK) -> None:
        shard = position // self.shard_size
        for other in [s for s in self._pending if s != shard]:
            self._write(other)
        self._pending.setdefault(shard, {})[position] = (digest, top.to("cpu"))

    def flush(self) -> None:
        for shard in list(self._pending):
            self._write(shard)

    def _write(self, shard: int) -> None:
        entries = self._pending.pop(shard)
        path = self._path(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            meta, tensors = self._read(shard)
            meta, tensors = dict(meta), dict(tensors)
            for position, (digest, top) in entries.items():
                meta[str(position)] = digest
                for name, t in zip(("logp", "ids", "log_rest", "target_logp"), top._fields()):
                    tensors[f"{position}.{name}"] = t.contiguous()
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=meta)


class CachedTeacher:
    """The teacher as the trainer uses it: TopK rows for a batch, read from the cache or computed
    and stored. `forwards` counts the LLM forward passes it ran (one per batch with a miss);
    `computed` lists the examples of the last batch that the LLM read (the trainer's tokens/s counts them)."""

    def __init__(self, llm, cache: TeacherCache, top_k: int, temperature: float):
        self.llm, self.cache, self.top_k, self.temperature = llm, cache, top_k, temperature
        self.forwards = 0
        self.computed: list[int] = []

    @torch.no_grad()
    def __call__(self, batch: list, positions: list[int]) -> TopK:
        digests = [input_hash(e.ctx, e.x, e.y) for e in batch]
        found = [self.cache.get(p, d) for p, d in zip(positions, digests)]
        missing = self.computed = [i for i, f in enumerate(found) if f is None]
        if missing:
            self.forwards += 1
            out = teacher_logits(self.llm, [batch[i] for i in missing])
            top = sparsify(out.logits, out.targets, self.top_k, self.temperature)
            for j, i in enumerate(missing):
                found[i] = top.rows(out.example == j)
                self.cache.put(positions[i], digests[i], found[i])
        return TopK.cat([f.to(self.llm.device) for f in found])


# --------------------------------------------------------------------------- the key


def _fingerprint(model: torch.nn.Module) -> str:
    """A cheap hash of the weights: a strided sample of every tensor, enough to tell models apart."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().flatten()[::997].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _files_hash(paths) -> str:
    from ..core.provenance import file_hash
    from ..data.text import _files

    return hashlib.sha256(json.dumps([[str(f), file_hash(f)] for f in _files(paths)]).encode()).hexdigest()[:16]


def teacher_key(recipe, stage: str, models, template) -> dict:
    """Everything the teacher's distribution at a position depends on; not lr, steps, K, the distiller."""
    spec = getattr(recipe, stage)
    llm = models.llm
    key = {"format": FORMAT, "stage": stage, "llm": models.llm_id, "llm_config": models.llm_config_hash,
           "llm_weights": _fingerprint(llm.model), "llm_class": type(llm).__name__, "dtype": recipe.llm.dtype,
           "mixed_precision": spec.mixed_precision, "pad_token_id": llm.pad_token_id,
           "bos_token_id": llm.bos_token_id,
           "temperature": spec.temperature, "top_k": spec.teacher_top_k, "seed": recipe.seed}
    if stage == "pretrain":
        from ..data.workspace import passages_file

        if spec.hf_dataset:
            text = f"hf:{spec.hf_dataset}:{spec.hf_split}" + (f":{spec.hf_config}" if spec.hf_config else "")
        else:
            text = _files_hash(spec.text if spec.text else [passages_file(recipe)])
        key |= {"text": text, "max_length": spec.max_length, "demo_fraction": spec.demo_fraction}
    else:
        from ..data.metaicl import task_file
        from ..core.provenance import file_hash
        from ..data.workspace import data_dir, partition_for

        from .examples import meta_train_tasks

        root = data_dir(recipe)
        tasks = meta_train_tasks(spec, root, partition_for(recipe), recipe.tasks)
        files = {t: file_hash(task_file(root, t, spec.train_file)) for t in sorted(tasks)}
        # The draw of an episode (which task, which labels) changes with these; the input hash would
        # catch it too, but runs that differ in them would then overwrite each other's shards.
        key |= {"template": template.model_dump(mode="json"), "k": recipe.tasks.k, "data": files,
                "remap_labels": spec.remap_labels, "task_sampling": spec.task_sampling}
        if spec.queries_per_episode > 1:  # absent at 1, the draw before the key existed: older caches stay valid
            key["queries_per_episode"] = spec.queries_per_episode
    return key


def open_teacher(recipe, stage: str, models, template) -> CachedTeacher:
    """The cached teacher for a recipe's stage, in cache_dir()/teacher/<hash of its key>/."""
    from ..models.model_sources import cache_dir

    spec = getattr(recipe, stage)
    key = teacher_key(recipe, stage, models, template)
    folder = cache_dir() / "teacher" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if not (folder / "key.json").is_file():
        write_json(folder / "key.json", key)  # for people: what this folder was made from
    return CachedTeacher(models.llm, TeacherCache(folder), spec.teacher_top_k, spec.temperature)
