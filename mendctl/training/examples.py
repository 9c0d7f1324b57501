"""Training examples for both stages, drawn deterministically by position.

Example number p of a run is a pure function of (seed, p), so resuming from a checkpoint needs only
the position, and every process of a multi-process run draws its own disjoint positions.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..core.bounded import loads_json
from ..core.config import FinetuneSpec, PretrainSpec, TasksSpec, TemplateSpec
from ..core.partitions import family, on_test_side
from ..data.metaicl import DataError, read_examples, task_file
from ..data.text import iter_hf, iter_local, pieces
from ..models.anchors import label_ids
from ..models.render import context_ids, render_context, render_query


@dataclass
class Example:
    distiller_text: str  # the demonstrations as the distiller reads them
    ctx: list[int]       # the same demonstrations as the teacher reads them (LLM ids)
    x: list[int]         # query input (LLM ids)
    y: list[int]         # target (LLM ids)
    labels: list[list[int]] = field(default_factory=list)  # each demonstration's output (LLM ids): label anchors
    options: list[list[int]] = field(default_factory=list)  # the options (LLM ids, at most MAX_OPTIONS): y among them


# finetune.kl_on: options runs the student on every option with gradients; a run reached 12.3 GB on CPU and
# was killed at a step of two 100-option queries. A query with more keeps its target and this many minus one others.
MAX_OPTIONS = 16

# Stand-in label words for finetune.remap_labels: common words, mostly one token each. A few are some
# task's own labels (colours, directions): "red" may become "blue", which only the demonstrations tell.
REMAP_WORDS = (
    "apple", "river", "chair", "window", "garden", "pencil", "cloud", "bottle", "yellow", "mountain", "orange",
    "table", "paper", "horse", "bridge", "music", "winter", "summer", "silver", "forest", "market", "doctor",
    "kitchen", "island", "planet", "rabbit", "violin", "candle", "ticket", "pocket", "engine", "coffee",
    "letter", "stone", "tiger", "camera", "basket", "butter", "castle", "dragon", "guitar", "hammer",
    "jacket", "ladder", "mirror", "needle", "onion", "pepper", "rocket", "saddle", "tomato", "wallet",
    "banana", "carpet", "desert", "falcon", "glass", "honey", "lemon", "cotton", "anchor", "blue", "green",
    "north", "south", "left", "right", "up", "down", "cat", "dog", "sun", "moon", "car", "tree", "book",
)


def meta_train_tasks(spec: FinetuneSpec, data_dir: Path, partition, tasks: TasksSpec) -> list[str]:
    """finetune.train_tasks, less tasks.validation: the partition's meta-train tasks, or every
    classification task (its rows carry two or more options) in data_dir with a train_file and more
    than k examples, except any shipped partition's test tasks and this partition's, the validation
    tasks, and the other tasks of their families unless the partition trains on them (a test task in
    another language, color-hex beside color-rgb, is no new task)."""
    if spec.train_tasks == "partition":
        return [t for t in partition.train if t not in tasks.validation]
    held_out = on_test_side(partition, tasks.validation)
    names = []
    for folder in sorted(p for p in Path(data_dir).iterdir() if p.is_dir() and not held_out(p.name)):
        path = task_file(data_dir, folder.name, spec.train_file)
        if not path.is_file():
            continue
        with path.open("rb") as f:
            first = f.readline()
            try:
                row = loads_json(first.decode("utf-8"), f"{path}:1")
            except UnicodeDecodeError:
                raise DataError(f"{path}:1: not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:1: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:1: expected a JSON object")
            if len(row.get("options") or []) >= 2 and 1 + sum(1 for _ in f) > tasks.k:
                names.append(folder.name)
    return names


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
            self._stream, self._streamed = iter_hf(self.spec.hf_dataset, self.spec.hf_split, self.spec.hf_config), 0
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

    ONE demonstration list, rendered ONCE, feeds both the teacher and the distiller. With
    queries_per_episode Q, positions Q e ... Q e + Q - 1 form episode e: one task, one set of
    demonstrations, one label remapping, and Q distinct queries from outside the set.
    """

    def __init__(self, spec: FinetuneSpec, tasks: TasksSpec, data_dir: Path, train_tasks: list[str],
                 template: TemplateSpec, tokenizer, seed: int):
        self.template, self.tokenizer, self.seed, self.k = template, tokenizer, seed, tasks.k
        self.remap, self.sampling, self.queries = spec.remap_labels, spec.task_sampling, spec.queries_per_episode
        self.tasks = {}
        # train_tasks come from meta_train_tasks, without the validation tasks: the learning curves
        # score the distiller on tasks it never saw.
        need = self.k + self.queries
        for task in train_tasks:
            rows = read_examples(task_file(data_dir, task, spec.train_file))
            if len(rows) < need:
                raise DataError(f"{rows[0]['_where'].rsplit(':', 1)[0]}: {len(rows)} examples, need at least "
                                f"k + queries_per_episode = {need}")
            self.tasks[task] = rows
        self.names = sorted(self.tasks)
        if not self.names:
            raise DataError("the partition lists no meta-train task")
        self.sizes = [len(self.tasks[n]) for n in self.names]
        self.families: dict[str, list[str]] = {}
        for name in self.names:
            self.families.setdefault(family(name), []).append(name)
        self.family_names = sorted(self.families)

    def _task(self, rng: random.Random) -> str:
        if self.sampling == "proportional":
            return rng.choices(self.names, weights=self.sizes)[0]
        if self.sampling == "family":
            return rng.choice(self.families[rng.choice(self.family_names)])
        return rng.choice(self.names)

    def draw(self, episode: int) -> tuple[random.Random, str, int, list[int], bool]:
        """An episode's first draws: its generator (which draws the rest), task, query row, demonstration
        rows and remap coin."""
        rng = random.Random(f"{self.seed}:{episode}")
        name = self._task(rng)
        n = len(self.tasks[name])
        q = rng.randrange(n)
        picked = rng.sample([i for i in range(n) if i != q], self.k)
        # Drawn whatever remap_labels is, so that changing it leaves every other draw as it was.
        return rng, name, q, picked, rng.random() < self.remap

    def get(self, position: int) -> Example:
        episode, j = divmod(position, self.queries)
        rng, name, q, picked, remap = self.draw(episode)
        rows = self.tasks[name]
        demos = [rows[i] for i in picked]
        options = rows[q].get("options") or []
        mapping = {}
        # Only where the demonstrations answer from the query's options: a task whose every question has
        # its own answers would get words that no demonstration ties to anything.
        if remap and 2 <= len(options) <= len(REMAP_WORDS) and all(d["output"] in options for d in demos):
            # One consistent mapping for the whole episode: the target is only predictable from
            # the demonstrations' new labels, never from what the distiller remembers of the task.
            mapping = dict(zip(options, rng.sample(REMAP_WORDS, len(options))))
            demos = [{**d, "output": mapping.get(d["output"], d["output"])} for d in demos]
        if j:  # the episode's other queries, drawn after all of the above: queries_per_episode 1 draws as before
            taken = {q, *picked}
            q = rng.sample([i for i in range(len(rows)) if i not in taken], self.queries - 1)[j - 1]
        target = mapping.get(rows[q]["output"], rows[q]["output"])
        context = render_context(self.template, demos, self.tokenizer)
        if not context:
            raise DataError(f"template.max_context_tokens={self.template.max_context_tokens} leaves room for no "
                            f"demonstration (query {rows[q]['_where']})")
        texts = [mapping.get(o, o) for o in rows[q].get("options") or []]
        texts += [] if target in texts else [target]
        if len(texts) > MAX_OPTIONS:  # from an rng of their own: every other draw stays as it was
            others = random.Random(f"{self.seed}:{episode}:{j}:options").sample(
                [t for t in texts if t != target], MAX_OPTIONS - 1)
            texts = [target, *others]
        query = render_query(self.template, rows[q]["input"], texts, self.tokenizer, after_context=True)
        return Example(context, context_ids(self.template, context, self.tokenizer), query.x,
                       query.options[texts.index(target)], label_ids(self.template, demos, self.tokenizer),
                       query.options)


def example_source(stage: str, recipe, tokenizer, encoder_decoder: bool, template: TemplateSpec):
    """The examples a recipe's stage trains on (the trainer and the teacher-cache filler share them)."""
    from ..data.workspace import data_dir, partition_for, passages_file

    spec = getattr(recipe, stage)
    if stage == "pretrain":
        documents = iter_local([passages_file(recipe)]) if spec.bigbench_passages else None
        return TextExamples(spec, tokenizer, recipe.seed, encoder_decoder, documents)
    root = data_dir(recipe)
    names = meta_train_tasks(spec, root, partition_for(recipe), recipe.tasks)
    return TaskExamples(spec, recipe.tasks, root, names, template, tokenizer, recipe.seed)
