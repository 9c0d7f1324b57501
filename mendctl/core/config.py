"""Recipe schema: one YAML file describes one experiment.

Every section is a pydantic model that forbids unknown keys, so a typo is an error rather than a
silently ignored option. `load_recipe` reports all problems at once, each with its key path and,
where the YAML has it, the line.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic import Strict as PydanticStrict

from .bounded import TooDeep, compose_yaml, load_yaml
from .task_files import DEFAULT_K, DEFAULT_SEEDS, META_TRAIN_FILE

Method = Literal["zero-shot", "icl", "icl-truncated", "mend", "llmlingua"]
METHODS = get_args(Method)
# distiller.anchor: which K LLM token embeddings the vectors start from (mendctl/models/anchors.py)
Anchor = Literal["none", "last", "labels", "label_set", "label_set_filled"]
ANCHORS = get_args(Anchor)


def _a_number(v):
    # YAML reads `true`, `yes` and `on` as booleans; a bool is an int in Python, but never a rate. (Text
    # stays for pydantic to parse: PyYAML reads `1e-5`, without a dot, as a string.)
    if isinstance(v, bool):
        raise ValueError(f"Input should be a number, not {str(v).lower()}")
    return v


# Every count and number of a recipe: no bool for an int (`steps: true` is no 1 step), no text, no 2.5 steps.
Int = Annotated[int, PydanticStrict()]
Float = Annotated[float, BeforeValidator(_a_number)]
Bool = Annotated[bool, PydanticStrict()]  # true or false, not 1 or "yes"
MAX_SEED = 2**32 - 1  # numpy's random seeds stop there


class Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf` or `nan` is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _user_path(v):
    """`~` is the user's home, as in a shell; a path holding control characters is a typo or a trick."""
    if isinstance(v, (str, Path)):
        if any(unicodedata.category(c) in ("Cc", "Cf") for c in str(v)):
            raise ValueError(f"{str(v)!r} holds control or invisible formatting characters")
        return Path(v).expanduser()
    return v


def _existing(path: Path, what: str = "path") -> Path:
    from .shipped import installed_data  # here, not at the top: it keeps the chain of imports short

    path = installed_data(path)
    if not Path(path).exists():
        raise ValueError(f"{what} does not exist: {path}")
    return path


# Relative paths resolve against the working directory, as users run shipped recipes from the repo root;
# one into data/tiny/ that is not there reads the tiny data installed with the package (shipped.py).
ExistingPath = Annotated[Path, BeforeValidator(_user_path), AfterValidator(_existing)]


# Positions of a random_init model (gpt2, llama): what validate holds a random model's lengths to
# without building it. T5's relative positions have no limit, but no toy run comes near this bound.
RANDOM_INIT_POSITIONS = 4096


class RandomInit(Strict):
    """A randomly initialised model with a byte-level tokenizer built in-process (no download)."""

    layers: Int = Field(2, ge=1)
    hidden: Int = Field(64, ge=8)
    heads: Int = Field(2, ge=1)
    # Wider than the usual 0.02: a random LLM initialised that narrowly predicts nearly the same
    # distribution whatever the context, which leaves the distiller nothing to learn.
    init_std: Float = Field(0.2, gt=0, description="std of the random weights")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "RandomInit":
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        return self


Dtype = Literal["float32", "bfloat16", "float16"]


class ModelSpec(Strict):
    """Where a model comes from: a hub id, a local directory, a packaged alias, a GGUF file, or random."""

    source: str | None = None
    gguf_file: str | None = None
    random_init: RandomInit | None = None
    dtype: Dtype = "float32"

    def _sources(self) -> list[str]:
        return [n for n in ("source", "random_init") if getattr(self, n) is not None]

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if len(self._sources()) != 1:
            raise ValueError(f"set exactly one of {self._source_keys()}")
        if self.source is not None and self.gguf_file is None and _is_local_path(self.source):
            if not Path(self.source).expanduser().exists():
                raise ValueError(f"source folder does not exist: {self.source} (a hub id reads `name` or `org/name`)")
        if self.gguf_file is not None:
            if self.source is None:
                raise ValueError("gguf_file needs source: the directory holding it")
            _existing(Path(self.source) / self.gguf_file, "gguf_file")
        return self

    def _source_keys(self) -> str:
        return "source, random_init"


def _is_local_path(source: str) -> bool:
    """A source spelled as a path, not a hub id (`name`, `org/name`) or a packaged alias."""
    return source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1


class LoraSpec(Strict):
    """LoRA adapters (peft) on the distiller body's linear maps; the body's own weights stay frozen."""

    r: Int = Field(16, ge=1, description="rank of each adapter")
    alpha: Float = Field(32, gt=0, description="adapter output scaled by alpha / r")
    dropout: Float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, min_length=1, description="module names; default: the backend's")


class DistillerSpec(ModelSpec):
    init_from_llm_layers: Int | None = Field(None, ge=1)
    placeholder_init: Literal["random", "vocab"] = "random"
    max_length: Int = Field(1024, ge=8, description="distiller input tokens; demonstrations beyond are cut from the left")
    lora: LoraSpec | None = Field(None, description="train adapters instead of the body; shares the LLM's layers")
    freeze_embeddings: Bool = Field(False, description="keep the body's token embeddings as loaded")
    anchor: Anchor = Field(
        "none", description="vectors = these K frozen LLM token embeddings + a correction that starts at zero")
    read_anchors: Bool = Field(
        False, description="anchored: each placeholder's input adds its anchor's embedding (mapped to the body's "
                           "width), so that the correction of a slot knows which token it corrects")
    scale_to_embeddings: Bool = Field(
        False, description="plain distiller: a LayerNorm starting at the LLM embeddings' per-dimension mean and std")
    max_correction: Float | None = Field(
        None, gt=0, description="anchored: each slot's correction is at most this fraction of its anchor's norm "
                                "(a soft bound, the identity near zero); none: unbounded")

    @model_validator(mode="after")
    def _scale_is_for_plain(self) -> "DistillerSpec":
        if self.scale_to_embeddings and self.anchor != "none":
            raise ValueError("scale_to_embeddings is for distiller.anchor: none; anchored vectors already have "
                             "the embeddings' scale")
        if self.read_anchors and self.anchor == "none":
            raise ValueError("read_anchors needs anchors: set distiller.anchor")
        if self.max_correction is not None and self.anchor == "none":
            raise ValueError("max_correction bounds the correction of anchors: set distiller.anchor")
        return self

    def _sources(self) -> list[str]:
        return super()._sources() + (["init_from_llm_layers"] if self.init_from_llm_layers else [])

    def _source_keys(self) -> str:
        return "source, random_init, init_from_llm_layers"


class TemplateSpec(Strict):
    """How a demonstration is rendered: input + output, demonstrations joined by separator.

    The query is rendered as `input`, its options as `output`; the same string is fed to the
    teacher and to the distiller.
    """

    input: str = "{input}"
    output: str = " {output}"
    separator: str = " "
    max_example_tokens: Int = Field(256, ge=1, description="LLM tokens per demonstration input")
    max_context_tokens: Int = Field(1024, ge=1, description="LLM tokens for all demonstrations")

    @field_validator("input")
    @classmethod
    def _has_input(cls, v: str) -> str:
        if "{input}" not in v:
            raise ValueError("must contain {input}")
        return v

    @field_validator("output")
    @classmethod
    def _has_output(cls, v: str) -> str:
        if "{output}" not in v:
            raise ValueError("must contain {output}")
        return v


class TasksSpec(Strict):
    """Tasks in the MetaICL layout: data_dir/{task}/{task}_{k}_{seed}_{split}.jsonl."""

    data_dir: ExistingPath | None = None
    bigbench: Literal["fetch"] | ExistingPath | None = Field(
        None, description="convert BIG-bench into output_dir/data first: a task directory, the sdist, or 'fetch'")
    bigbench_options: Literal["fixed", "per_example"] = Field(
        "fixed", description="fixed: keep a task's examples whose options are its first example's; per_example: "
        "keep every multiple-choice example with its own options (converted into output_dir/data-per-example-options)")
    partition: str
    k: Int = Field(DEFAULT_K, ge=1)
    seeds: list[Int] = Field(default_factory=lambda: list(DEFAULT_SEEDS), min_length=1)
    validation: list[str] = Field(default_factory=list,
                                  description="meta-train tasks held out of stage 2 for the learning curves")

    @model_validator(mode="after")
    def _one_source(self) -> "TasksSpec":
        if (self.data_dir is None) == (self.bigbench is None):
            raise ValueError("set exactly one of data_dir, bigbench")
        if self.bigbench is None and self.bigbench_options != "fixed":
            raise ValueError("bigbench_options chooses how tasks.bigbench is converted; tasks.data_dir is read as it is")
        return self

    @model_validator(mode="after")
    def _validation_once(self) -> "TasksSpec":
        if len(set(self.validation)) != len(self.validation):
            raise ValueError("validation lists a task more than once")
        return self

    @field_validator("seeds")
    @classmethod
    def _seeds_once(cls, v: list[int]) -> list[int]:
        # Two equal seeds are one demonstration set counted twice in every mean.
        if twice := sorted({s for s in v if v.count(s) > 1}):
            raise ValueError(f"lists a seed more than once: {twice}")
        if out := [s for s in v if not 0 <= s <= MAX_SEED]:
            raise ValueError(f"seeds are from 0 to {MAX_SEED}: {out}")
        return v

    def check_validation_in(self, train_tasks: str) -> None:
        """The validation tasks against finetune.train_tasks: with `partition`, from its train list
        (leaving one to train on); with `all`, any task `all` may draw from (never a test task of this
        or a shipped partition, nor of a test task's family)."""
        if not self.validation:
            return
        from .partitions import load_partition, on_test_side

        partition = load_partition(self.partition)
        if train_tasks == "all":
            held_out = on_test_side(partition)  # reads every shipped partition: once, not once per task
            if test := [t for t in self.validation if held_out(t)]:
                raise ValueError(f"tasks.validation must come from the meta-train side; these are test tasks of "
                                 f"this or a shipped partition, or of a test task's family: {test}")
            return
        if unknown := [t for t in self.validation if t not in partition.train]:
            raise ValueError(f"tasks.validation must be meta-train tasks of the partition (or set "
                             f"finetune.train_tasks: all); not in its train list: {unknown}")
        if set(partition.train) <= set(self.validation):
            raise ValueError("tasks.validation holds out every meta-train task: none would be left to train on")

    @field_validator("partition")
    @classmethod
    def _partition_exists(cls, v: str) -> str:
        from .partitions import load_partition
        from .shipped import installed_data

        if (found := installed_data(v)) != Path(v):  # a data/tiny/ file read from the installed copy
            v = str(found)
        load_partition(v)  # a user's file is parsed here too: its task names become paths
        return v


class TrainSpec(Strict):
    steps: Int = Field(ge=1)
    batch_size: Int = Field(8, ge=1, description="examples per process per optimiser step, before accumulation")
    grad_accum: Int = Field(1, ge=1)
    lr: Float = Field(gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    warmup_steps: Int = Field(0, ge=0)
    lr_schedule: Literal["linear", "cosine"] = Field(
        "linear", description="the decay after warm-up, to 0 at the last step: linear or half a cosine")
    max_grad_norm: Float | None = Field(1.0, gt=0)
    temperature: Float = Field(1.0, gt=0)
    teacher_cache: Bool = Field(True, description="reuse the teacher's top-k distributions across runs (cache_dir()/teacher)")
    teacher_top_k: Int = Field(64, ge=1, description="teacher tokens kept per position when teacher_cache is on")
    save_every: Int = Field(500, ge=1)
    keep_last: Int = Field(2, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    trackers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    eval_every: Int | None = Field(None, ge=1, description="steps between validation scores (tasks.validation)")
    eval_queries: Int = Field(20, ge=1, description="validation queries per task and demonstration set")
    eval_sets: Int = Field(1, ge=1, description="demonstration sets per validation task: those of the first N of "
                           "tasks.seeds (one set's vectors can rank distillers unlike another's)")
    keep_best: Bool = Field(False, description="also write best.safetensors: the distiller at the validation step "
                            "with the lowest val_kl (needs eval_every)")
    ema: Float | None = Field(None, gt=0, lt=1, description="decay of a moving average of the trained weights: "
                              "the curve scores it, best.safetensors and the final distiller hold it")


class PretrainSpec(TrainSpec):
    lr: Float = Field(5e-5, gt=0)
    text: list[ExistingPath] | None = Field(None, min_length=1, description=".txt files, folders of them, or .jsonl with a text field")
    hf_dataset: str | None = Field(None, description="a Hugging Face dataset id, streamed (needs a network), or a "
                                   "local dataset folder read the same way; needs mendctl[hf-data]")
    hf_config: str | None = Field(None, description="the dataset's configuration (C4: en); none: its default")
    hf_split: str = "train"
    bigbench_passages: Int | None = Field(None, ge=1, description="this many passages of BIG-bench tasks in no test list")
    max_length: Int = Field(1024, ge=8)
    demo_fraction: Float = Field(0.8, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_source(self) -> "PretrainSpec":
        chosen = [self.text is not None, self.hf_dataset is not None, self.bigbench_passages is not None]
        if sum(chosen) != 1:
            raise ValueError("set exactly one of text, hf_dataset, bigbench_passages")
        if self.hf_config is not None and self.hf_dataset is None:
            raise ValueError("hf_config names a configuration of hf_dataset: set hf_dataset")
        if self.hf_dataset is not None and _is_local_path(self.hf_dataset):
            _existing(Path(self.hf_dataset).expanduser(), "hf_dataset folder")
        return self


class FinetuneSpec(TrainSpec):
    lr: Float = Field(1e-5, gt=0)
    train_file: str = Field(META_TRAIN_FILE, description="meta-train file of each task, under data_dir/{task}/")
    kl_weight: Float = Field(1.0, ge=0)
    ce_weight: Float = Field(1.0, ge=0, description="weight of the student's target-token CE (0 = KL only)")
    kl_on: Literal["query", "output", "options"] = Field(
        "query", description="what the KL compares: the next-token distributions at every query token (input and "
        "output, as the method) or at the output's tokens alone, or the distribution over the example's options "
        "that mendctl eval scores, where its answer is decided")
    init_from: ExistingPath | None = Field(None, description="stage-1 output; default output_dir/pretrain when present")
    remap_labels: Float = Field(0.0, ge=0, le=1, description="probability that an episode's option strings are "
                                "replaced by random words, in the demonstrations and the target alike")
    train_tasks: Literal["partition", "all"] = Field(
        "partition", description="all: every classification task in data_dir with a train_file, except the test "
        "and validation tasks and their families")
    task_sampling: Literal["uniform", "proportional", "family"] = Field(
        "uniform", description="how an episode's task is drawn: uniformly, in proportion to its examples, or "
        "uniformly over families (the name before '-'), then over the family's tasks")
    queries_per_episode: Int = Field(1, ge=1, description="queries drawn with each set of demonstrations: the "
                                     "distiller runs once per set, its vectors serve them all; divides batch_size")

    @field_validator("train_file")
    @classmethod
    def _has_task(cls, v: str) -> str:
        if "{task}" not in v:
            raise ValueError("must contain {task}")
        return v

    @model_validator(mode="after")
    def _whole_episodes(self) -> "FinetuneSpec":
        # A batch that split an episode would run the distiller on its demonstrations twice.
        if self.batch_size % self.queries_per_episode:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of queries_per_episode "
                             f"({self.queries_per_episode})")
        return self


class DistillVariant(Strict):
    """Another set of vectors for the same demonstrations: the distill section with these keys changed."""

    refine_steps: Int | None = Field(None, ge=0)
    refine_lr: Float | None = Field(None, gt=0)
    refine_from: Literal["distiller", "anchors"] | None = None
    refine_on: Literal["tokens", "options"] | None = None
    refine_ce_weight: Float | None = Field(None, ge=0)

    def keys(self) -> dict:
        return self.model_dump(exclude_none=True)


class DistillSpec(Strict):
    batch_size: Int = Field(8, ge=1)
    checkpoint: ExistingPath | None = Field(None, description="distiller to use; default output_dir/finetune, else output_dir/pretrain")
    refine_steps: Int = Field(0, ge=0, description="Adam steps on each set's vectors after the distiller, on the KL to "
                              "ICL over leave-one-out episodes of its own demonstrations (0 = none)")
    refine_lr: Float = Field(3e-3, gt=0, description="learning rate of those steps")
    refine_from: Literal["distiller", "anchors"] = Field(
        "distiller", description="what the steps start from: the distiller's vectors, or the anchors alone (the "
        "LLM's embeddings of distiller.anchor's tokens; no distiller is run)")
    refine_on: Literal["tokens", "options"] = Field(
        "tokens", description="what the steps' KL compares: the next-token distributions at every query token, or "
        "the distributions over each demonstration's options (as finetune.kl_on: options)")
    refine_ce_weight: Float = Field(
        0.0, ge=0, description="weight of the vectors' mean token loss of each demonstration's own label beside "
        "that KL (as finetune.ce_weight; needs refine_on: options): ICL's errors on its demonstrations are not copied")
    variants: list[DistillVariant] = Field(
        default_factory=list, description="more vectors of the same sets, each the distill section with these "
        "refine_* keys changed, in its own folder (mendctl/variants.py); eval scores each as its own row")


class EvalSpec(Strict):
    methods: list[Method] = Field(
        default_factory=lambda: ["zero-shot", "icl", "mend"], min_length=1)
    batch_size: Int = Field(8, ge=1, description="distillation batch when vectors are made on the fly")
    cache: Bool = Field(True, description="reuse zero-shot / icl / icl-truncated scores from the cache")
    bootstrap_samples: Int = Field(1000, ge=0, description="paired bootstrap resamples for the CIs; 0 = none")
    bootstrap_seed: Int = Field(0, ge=0, le=MAX_SEED)
    retime_queries: Int = Field(8, ge=0, description="queries of each set on which a method scored from the cache is "
                                "timed again in this run, so that its latency stands beside the others' (0 = keep "
                                "the cached latency)")


class Recipe(Strict):
    backend: str
    output_dir: Path
    seed: Int = Field(0, ge=0, le=MAX_SEED)
    num_vectors: Int = Field(ge=1, le=4096, description="K, the number of distilled vectors")
    llm: ModelSpec
    distiller: DistillerSpec
    template: TemplateSpec | None = Field(None, description="default: the backend's")
    tasks: TasksSpec | None = None
    pretrain: PretrainSpec | None = None
    finetune: FinetuneSpec | None = None
    distill: DistillSpec = Field(default_factory=DistillSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @field_validator("output_dir", mode="before")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, str) and not v.strip():
            raise ValueError("must not be empty (it would mean the working directory)")
        return _user_path(v)

    @model_validator(mode="after")
    def _refining_settings_fit(self) -> "Recipe":
        seen = {}
        variants = [(f"distill.variants[{i}]", self.distill.model_copy(update=v.keys()))
                    for i, v in enumerate(self.distill.variants)]
        for where, spec in [("distill", self.distill), *variants]:
            if spec.refine_from == "anchors" and self.distiller.anchor == "none":
                raise ValueError(f"{where}.refine_from: anchors needs anchors: set distiller.anchor")
            if spec.refine_on != "tokens" and not spec.refine_steps:
                raise ValueError(f"{where}.refine_on: options needs {where}.refine_steps above 0")
            if spec.refine_ce_weight and spec.refine_on != "options":
                raise ValueError(f"{where}.refine_ce_weight needs {where}.refine_on: options")
            same = tuple(getattr(spec, k) for k in DistillVariant.model_fields)
            if same in seen:
                raise ValueError(f"{where} makes the same vectors as {seen[same]}")
            seen[same] = where
        return self

    @model_validator(mode="after")
    def _validation_tasks_in_the_training_pool(self) -> "Recipe":
        if self.tasks is not None:
            self.tasks.check_validation_in(self.finetune.train_tasks if self.finetune else "partition")
        return self

    @model_validator(mode="after")
    def _curves_need_validation_tasks(self) -> "Recipe":
        for stage in ("pretrain", "finetune"):
            spec = getattr(self, stage)
            if spec is not None and spec.eval_every and (self.tasks is None or not self.tasks.validation):
                raise ValueError(f"{stage}.eval_every needs validation tasks: set tasks.validation")
            if spec is not None and spec.keep_best and not spec.eval_every:
                raise ValueError(f"{stage}.keep_best chooses on the validation curve: set {stage}.eval_every")
            if spec is not None and self.tasks is not None and spec.eval_sets > len(self.tasks.seeds):
                raise ValueError(f"{stage}.eval_sets={spec.eval_sets}: tasks.seeds names {len(self.tasks.seeds)} "
                                 "demonstration sets a task")
        return self

    @field_validator("backend")
    @classmethod
    def _registered(cls, v: str) -> str:
        from .registry import resolve_name

        return resolve_name(v)

    @model_validator(mode="after")
    def _shared_layers_keep_the_llm_dtype(self) -> "Recipe":
        # Shared tensors cannot have two dtypes: converting the body would convert the LLM.
        d = self.distiller
        if d.lora is not None and d.init_from_llm_layers and d.dtype != self.llm.dtype:
            raise ValueError(f"distiller.lora with init_from_llm_layers shares the LLM's layers: distiller.dtype "
                             f"({d.dtype}) must equal llm.dtype ({self.llm.dtype})")
        return self

    def stage_dir(self, stage: str) -> Path:
        return self.output_dir / stage


# --------------------------------------------------------------------------- loading


@dataclass
class RecipeError(Exception):
    """All problems of one recipe, each as (location, key path, message)."""

    source: str
    problems: list[tuple[str, str, str]]

    def __str__(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} error(s)"]
        lines += [f"  {loc}: {key}: {msg}" if key else f"  {loc}: {msg}" for loc, key, msg in self.problems]
        return "\n".join(lines)


# What distilling a user's own demonstrations and answering queries never read: without them a
# recipe needs no task data, partition or training text (`load_recipe(..., unused=...)`).
TRAINING_SECTIONS = ("tasks", "pretrain", "finetune")

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; megabytes of it are a mistake (and slow to parse)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(p.strip() for p in path):
        raise ValueError(f"override {text!r} names no key" if not key.strip() else f"override {text!r}: empty key part")
    try:
        # YAML parsing gives numbers, booleans, lists and null the way they read in a recipe.
        shown = text if len(text) <= 60 else text[:57] + "..."
        value = load_yaml(raw, f"override {shown!r}") if raw != "" else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {text!r}: invalid YAML value ({getattr(e, 'problem', e)})") from None
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return data


def _duplicate_keys(node: yaml.Node | None, source: str) -> list[tuple[str, str, str]]:
    """Keys given twice in one mapping: YAML lets the last silently win."""
    problems = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            line = key.start_mark.line + 1
            if isinstance(key, yaml.ScalarNode) and key.value in seen:
                problems.append((f"{source}:{line}", key.value,
                                 f"duplicate key (first at line {seen[key.value]}, again at line {line})"))
            elif isinstance(key, yaml.ScalarNode):
                seen[key.value] = line
            problems += _duplicate_keys(value, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            problems += _duplicate_keys(item, source)
    return problems


def _line_of(node: yaml.Node | None, path: tuple) -> int | None:
    """Line (1-based) of the deepest YAML node on `path` that exists."""
    line = None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(part)]
            if not match:
                break
            line = match[0][0].start_mark.line + 1
            node = match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _format_key(loc: tuple) -> str:
    # pydantic puts validator names like "function-after[...]" in loc for model validators: drop them.
    parts = [str(p) for p in loc if not str(p).startswith(("function-", "literal[", "lax-or-strict"))]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


def _within(key: str, prefix: str) -> bool:
    """`key` is `prefix` or lies below it (llm.random_init.heads lies below llm.random_init)."""
    return key == prefix or key.startswith((prefix + ".", prefix + "["))


def validate_data(data: Any, source: str, root: yaml.Node | None = None, overridden: set[str] = frozenset()) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(source, [(source, "", "a recipe must be a mapping of keys to values")])
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = _format_key(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if any(_within(key, o) or _within(o, key) for o in overridden):
                loc = "command line"
            else:
                line = _line_of(root, err["loc"])
                loc = f"{source}:{line}" if line else source
            problems.append((loc, key, msg))
        raise RecipeError(source, problems) from None


def load_recipe(path: str | Path, overrides: list[str] = (), unused: tuple[str, ...] = ()) -> Recipe:
    """The recipe at `path` with `overrides` applied; the top-level sections in `unused` (ones the
    caller never reads, say tasks and training) are left out, so their paths need not exist."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), [(str(path), "", "recipe file not found")])
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(str(path), [(str(path), "", f"{path.stat().st_size} bytes: a recipe is at most "
                                                      f"{MAX_RECIPE_BYTES} bytes")])
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as e:
        raise RecipeError(str(path), [(str(path), "", f"cannot read: {e.strerror}")]) from None
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecipeError(str(path), [(f"{path}:{line}", "", "not UTF-8 text")]) from None
    try:
        root = compose_yaml(text, str(path))
        data = yaml.safe_load(text) or {}
    except TooDeep as e:  # its message starts with the file (and line) at fault
        loc, _, msg = str(e).removeprefix(str(path)).partition(": ")
        raise RecipeError(str(path), [(f"{path}{loc}", "", msg)]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(str(path), [(loc, "", f"invalid YAML: {getattr(e, 'problem', e)}")]) from None
    duplicates = _duplicate_keys(root, str(path))
    if duplicates:
        raise RecipeError(str(path), duplicates)
    if not isinstance(data, dict):
        raise RecipeError(str(path), [(str(path), "", "a recipe must be a mapping of keys to values")])
    try:
        data = apply_overrides(data, list(overrides))
    except ValueError as e:
        raise RecipeError(str(path), [("command line", "", str(e))]) from None
    overridden = {o.split("=", 1)[0].strip() for o in overrides}
    data = {k: v for k, v in data.items() if k not in unused}
    return validate_data(data, str(path), root, overridden)


def resolved_dict(recipe: Recipe) -> dict:
    """The recipe as plain JSON-able data, defaults filled in: what outputs are stamped with."""
    return recipe.model_dump(mode="json")
