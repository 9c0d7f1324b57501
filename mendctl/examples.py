"""Training examples for both stages, drawn deterministically by position.

Example number p of a run is a pure function of (seed, p), so resuming from a checkpoint needs only
the position, and every process of a multi-process run draws its own disjoint positions.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .config import FinetuneSpec, PretrainSpec, TasksSpec, TemplateSpec
from .data.metaicl import DataError, read_examples
from .data.text import iter_hf, iter_local, pieces
from .render import context_ids, render_context, render_query


@dataclass
class Example:
    distiller_text: str  # the demonstrations as the distiller reads them
    ctx: list[int]       # the same demonstrations as the teacher reads them (LLM ids)
    x: list[int]         # query input (LLM ids)
    y: list[int]         # target (LLM ids)


class TextExamples:
    """Stage 1: a document's first `demo_fraction` of tokens are the demonstrations, the rest the query.

    For an encoder-decoder LLM the query is split again: its first half goes to the encoder after
    the demonstrations (or vectors), its second half is the decoder target.
    """

    def __init__(self, spec: PretrainSpec, tokenizer, seed: int, encoder_decoder: bool, documents=None):
        self.spec, self.tokenizer, self.seed, self.encoder_decoder = spec, tokenizer, seed, encoder_decoder
        if spec.hf_dataset:
            self.chunks, self._stream, self._streamed = None, None, 0
        else:
            texts = documents if documents is not None else iter_local(spec.text)
            self.chunks = pieces(texts, tokenizer, spec.max_length)
            if not self.chunks:
                raise DataError("pretrain data has no text")
        self._order: dict[int, list[int]] = {}

    def _chunk(self, position: int) -> list[int]:
        if self.chunks is None:
            return self._next_streamed(position)
        epoch, i = divmod(position, len(self.chunks))
        if epoch not in self._order:
            order = list(range(len(self.chunks)))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._order = {epoch: order}
        return self._ids(self.chunks[self._order[epoch][i]])

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids[: self.spec.max_length]

    def _next_streamed(self, position: int) -> list[int]:
        # A stream cannot be indexed: positions must come in order; a resumed run skips ahead.
        if self._stream is None or position < self._streamed:
            self._stream, self._streamed = iter_hf(self.spec.hf_dataset, self.spec.hf_split), 0
        while True:
            ids = self._ids(next(self._stream))
            if len(ids) >= 8:
                self._streamed += 1
                if self._streamed > position:
                    return ids

    def get(self, position: int) -> Example:
        ids = self._chunk(position)
        cut = max(1, min(len(ids) - 1, int(len(ids) * self.spec.demo_fraction)))
        demo, query = ids[:cut], ids[cut:]
        x, y = ([], query) if not self.encoder_decoder else (query[: len(query) // 2], query[len(query) // 2:])
        if not y:
            x, y = [], query
        return Example(self.tokenizer.decode(demo), demo, x, y)


class TaskExamples:
    """Stage 2: a query from a meta-train task and k demonstrations of the same task, excluding it.

    ONE demonstration list, rendered ONCE, feeds both the teacher and the distiller.
    """

    def __init__(self, spec: FinetuneSpec, tasks: TasksSpec, data_dir: Path, train_tasks: list[str],
                 template: TemplateSpec, tokenizer, seed: int):
        self.template, self.tokenizer, self.seed, self.k = template, tokenizer, seed, tasks.k
        self.tasks = {}
        # Validation tasks are held out: the learning curves score the distiller on tasks it never saw.
        for task in [t for t in train_tasks if t not in tasks.validation]:
            rows = read_examples(data_dir / task / spec.train_file.replace("{task}", task))
            if len(rows) < self.k + 1:
                raise DataError(f"{rows[0]['_where'].rsplit(':', 1)[0]}: {len(rows)} examples, need at least k+1={self.k + 1}")
            self.tasks[task] = rows
        self.names = sorted(self.tasks)
        if not self.names:
            raise DataError("the partition lists no meta-train task")

    def get(self, position: int) -> Example:
        rng = random.Random(f"{self.seed}:{position}")
        rows = self.tasks[rng.choice(self.names)]
        q = rng.randrange(len(rows))
        demos = [rows[i] for i in rng.sample([i for i in range(len(rows)) if i != q], self.k)]
        context = render_context(self.template, demos, self.tokenizer)
        if not context:
            raise DataError(f"template.max_context_tokens={self.template.max_context_tokens} leaves room for no "
                            f"demonstration (query {rows[q]['_where']})")
        query = render_query(self.template, rows[q]["input"], [rows[q]["output"]], self.tokenizer, after_context=True)
        return Example(context, context_ids(self.template, context, self.tokenizer), query.x, query.options[0])


def example_source(stage: str, recipe, tokenizer, encoder_decoder: bool, template: TemplateSpec):
    """The examples a recipe's stage trains on (the trainer and the teacher-cache filler share them)."""
    from .workspace import data_dir, partition_for, passages_file

    spec = getattr(recipe, stage)
    if stage == "pretrain":
        documents = iter_local([passages_file(recipe)]) if spec.bigbench_passages else None
        return TextExamples(spec, tokenizer, recipe.seed, encoder_decoder, documents)
    return TaskExamples(spec, recipe.tasks, data_dir(recipe), list(partition_for(recipe).train), template,
                        tokenizer, recipe.seed)
