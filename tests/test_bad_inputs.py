"""Bad inputs and faults across every command: each one exits with the rule's code (2: the user can
fix it in their input; 1: the run failed on its own) and a message with its key phrase, without a
traceback, and writes nothing outside output_dir.

Each case builds its inputs in tmp_path and returns the command line; `out` is its output_dir.
Cases fail early (validation, or the first thing a command reads) to keep the table fast.
"""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import mendctl.training.checkpoint
import mendctl.commands.train
from mendctl.cli import cli
from mendctl.core.lock import output_lock

ROOT = Path(__file__).resolve().parents[1]
GPT2 = "recipes/tiny/gpt2.yaml"
FAST = ["pretrain.steps=1", "finetune.steps=1", "pretrain.batch_size=2", "finetune.batch_size=2",
        "pretrain.max_length=32", "tasks.seeds=[100]"]


def recipe(tmp: Path, text: str | bytes, name: str = "r.yaml") -> str:
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def partition(tmp: Path, train: list, test: list) -> str:
    path = tmp / "p.json"
    path.write_text(json.dumps({"train": train, "test": test}))
    return str(path)


def tasks_copy(tmp: Path) -> Path:
    data = tmp / "data"
    shutil.copytree(ROOT / "data" / "tiny" / "tasks", data)
    return data


def spoil_line(data: Path, task: str, file: str, line: int, text: bytes) -> Path:
    path = data / task / file
    lines = path.read_bytes().splitlines()
    lines[line - 1] = text
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


BIDI_NAME = "tiny_\u202ecolor"  # a right-to-left override: it reads "tiny_roloc"
ZERO_WIDTH_NAME = "tiny\u200bcolor"
NOT_UTF8_PARTITION = b'{"train": ["a\xff"], "test": ["b"]}'


def positions_dir(tmp: Path, n_positions: int) -> str:
    """A local model folder with only a config.json: what validate reads without loading weights."""
    d = tmp / "gpt2-small-positions"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": n_positions, "n_embd": 32,
                                               "n_layer": 1, "n_head": 2, "vocab_size": 300}))
    return str(d)


def text_file(tmp: Path, content: bytes) -> str:
    """An override pointing stage 1 at one .jsonl file holding `content`."""
    return f"pretrain.text=[{recipe(tmp, content, 'docs.jsonl')}]"


def text_dataset(tmp: Path) -> str:
    """A local dataset folder for pretrain.hf_dataset: one JSON-lines file of a train split."""
    (tmp / "ds").mkdir()
    (tmp / "ds" / "train.jsonl").write_text(json.dumps({"text": "a document " * 20}) + "\n")
    return str(tmp / "ds")


def damaged_config(tmp: Path) -> str:
    d = tmp / "damaged-model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gpt2", "n_positions": ')
    return str(d)


def saved_model(tmp: Path, truncate: bool = False) -> str:
    """A tiny GPT-2 saved as a local model folder, its weights optionally cut short."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mendctl.models.tokenizer import byte_tokenizer

    d = tmp / "damaged-llm"
    tok = byte_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=16, n_layer=1, n_head=2)).save_pretrained(d)
    tok.save_pretrained(d)
    if truncate:
        weights = d / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    return str(d)


def base(tmp: Path, out: Path, *overrides: str) -> list[str]:
    return [GPT2, f"output_dir={out}", *FAST, *overrides]


# --------------------------------------------------------------------------- the table
# (id, setup(tmp, out) -> argv, exit code, key phrase of the message)

CASES = [
    # recipe files
    ("recipe-missing", lambda t, o: ["validate", str(t / "nope.yaml")], 2, "recipe file not found"),
    ("recipe-is-a-folder", lambda t, o: ["finetune", str(t)], 2, "is a directory"),
    ("recipe-not-utf8", lambda t, o: ["validate", recipe(t, b"backend: gpt2\nseed: \xff\xfe\n")], 2,
     "r.yaml:2: not UTF-8 text"),
    ("recipe-too-large", lambda t, o: ["validate", recipe(t, "# " + "x" * (2 << 20) + "\n")], 2,
     "a recipe is at most"),
    ("recipe-duplicate-key", lambda t, o: ["validate", recipe(t, (ROOT / GPT2).read_text() + "seed: 3\n")], 2,
     "duplicate key (first at line 8, again at line"),
    ("recipe-broken-yaml", lambda t, o: ["validate", recipe(t, "backend: [gpt2\n")], 2, "invalid YAML"),
    ("recipe-top-level-list", lambda t, o: ["finetune", recipe(t, "- 1\n- 2\n"), "seed=1"], 2,
     "a recipe must be a mapping"),
    ("recipe-unknown-key", lambda t, o: ["finetune", *base(t, o, "finetune.lrr=1")], 2,
     "finetune.lrr: Extra inputs are not permitted"),
    ("recipe-unknown-backend", lambda t, o: ["finetune", *base(t, o, "backend=gtp2")], 2, "Did you mean 'gpt2'"),
    # overrides
    ("override-broken-yaml", lambda t, o: ["finetune", *base(t, o, "tasks.seeds=[1,")], 2,
     "command line: override 'tasks.seeds=[1,': invalid YAML value"),
    ("override-no-key", lambda t, o: ["finetune", *base(t, o, "=1")], 2, "override '=1' names no key"),
    ("override-no-equals", lambda t, o: ["finetune", *base(t, o, "seed")], 2, "is not key=value"),
    ("override-nested-into-scalar", lambda t, o: ["finetune", *base(t, o, "seed.x=1")], 2,
     "command line: seed: Input should be a valid integer"),
    ("override-nested-model-check", lambda t, o: ["finetune", *base(t, o, "llm.random_init.heads=3")], 2,
     "command line: llm.random_init: hidden (64) must be divisible by heads (3)"),
    ("seed-negative", lambda t, o: ["finetune", *base(t, o, "seed=-1")], 2, "seed: Input should be greater than"),
    ("output-dir-empty", lambda t, o: ["finetune", GPT2, "output_dir="], 2, "output_dir: must not be empty"),
    ("lr-infinite", lambda t, o: ["finetune", *base(t, o, "finetune.lr=.inf")], 2,
     "finetune.lr: Input should be a finite number"),
    ("lr-nan", lambda t, o: ["pretrain", *base(t, o, "pretrain.lr=.nan")], 2, "Input should be a finite number"),
    ("num-vectors-absurd", lambda t, o: ["distill", *base(t, o, "num_vectors=1000000000")], 2,
     "num_vectors: Input should be less than or equal to 4096"),
    ("num-vectors-zero", lambda t, o: ["eval", *base(t, o, "num_vectors=0")], 2, "num_vectors: Input should be greater"),
    ("llm-source-missing-folder", lambda t, o: ["validate", recipe(t, (ROOT / GPT2).read_text().replace(
        "  random_init: {layers: 2, hidden: 64, heads: 2}", f"  source: {t}/no-such-model", 1))], 2,
     "source folder does not exist"),
    # lengths against the models' positions, from a local config.json
    ("distiller-max-length-over-positions", lambda t, o: ["finetune", *base(
        t, o, "distiller.random_init=null", f"distiller.source={positions_dir(t, 256)}", "distiller.max_length=256")],
     2, "distiller.max_length: 256 + 4 placeholders exceeds the distiller's 256 positions"),
    ("num-vectors-over-positions", lambda t, o: ["finetune", *base(
        t, o, "distiller.random_init=null", f"distiller.source={positions_dir(t, 8)}", "distiller.max_length=8",
        "num_vectors=8")], 2, "8 placeholders leave no room for demonstrations"),
    ("llm-context-over-positions", lambda t, o: ["eval", *base(
        t, o, "llm.random_init=null", f"llm.source={positions_dir(t, 256)}")], 2,
     "leave no room for an option in the LLM's 256 positions"),
    ("distill-variant-same-as-section", lambda t, o: ["distill", *base(t, o, "distill.variants=[{refine_steps: 0}]")],
     2, "distill.variants[0] makes the same vectors as distill"),
    ("distill-variant-unknown-key", lambda t, o: ["distill", *base(t, o, "distill.variants=[{checkpoint: x}]")],
     2, "distill.variants[0].checkpoint: Extra inputs are not permitted"),
    ("distill-variant-options-without-steps", lambda t, o: ["distill", *base(
        t, o, "distill.variants=[{refine_on: options}]")], 2,
     "distill.variants[0].refine_on: options needs distill.variants[0].refine_steps above 0"),
    ("eval-retime-negative", lambda t, o: ["eval", *base(t, o, "eval.retime_queries=-1")], 2, "eval.retime_queries"),
    ("llm-config-damaged", lambda t, o: ["validate", recipe(t, (ROOT / GPT2).read_text().replace(
        "  random_init: {layers: 2, hidden: 64, heads: 2}", f"  source: {damaged_config(t)}", 1))], 2,
     "llm.source: cannot read"),
    ("llm-weights-truncated", lambda t, o: ["eval", *base(
        t, o, "llm.random_init=null", f"llm.source={saved_model(t, truncate=True)}", "eval.methods=[zero-shot]")], 2,
     "damaged-llm: damaged weights"),
    # partitions and task data
    ("partition-traversal", lambda t, o: ["distill", *base(
        t, o, f"tasks.partition={partition(t, ['tiny_color'], ['../../escape'])}")], 2,
     "'../../escape' is not a valid task name"),
    ("partition-absolute-task", lambda t, o: ["eval", *base(
        t, o, f"tasks.partition={partition(t, ['tiny_color'], [str(t / 'abs')])}")], 2, "is not a valid task name"),
    ("partition-hidden-task", lambda t, o: ["finetune", *base(
        t, o, f"tasks.partition={partition(t, ['..'], ['tiny_color'])}")], 2, "'..' is not a valid task name"),
    ("partition-not-json", lambda t, o: ["validate", recipe(t, (ROOT / GPT2).read_text().replace(
        "data/tiny/partition.json", recipe(t, "{train", "p.json")))], 2, "not valid JSON"),
    ("partition-missing", lambda t, o: ["finetune", *base(t, o, f"tasks.partition={t}/none.json")], 2,
     "none.json does not exist"),
    ("data-dir-missing", lambda t, o: ["finetune", *base(t, o, f"tasks.data_dir={t}/nothing")], 2,
     "tasks.data_dir: path does not exist"),
    ("task-file-not-utf8", lambda t, o: ["finetune", *base(t, o, f"tasks.data_dir={tasks_copy(t)}")], 2,
     "tiny_color_16384_100_train.jsonl:3: not UTF-8 text"),
    ("task-input-not-string", lambda t, o: ["finetune", *base(t, o, f"tasks.data_dir={tasks_copy(t)}")], 2,
     "tiny_color_16384_100_train.jsonl:3: input must be a string, not list"),
    ("task-malformed-json", lambda t, o: ["eval", *base(t, o, f"tasks.data_dir={tasks_copy(t)}")], 2,
     "tiny_sentiment_4_100_train.jsonl:2: malformed JSON"),
    ("task-options-not-list", lambda t, o: ["eval", *base(t, o, f"tasks.data_dir={tasks_copy(t)}")], 2,
     "options must be a list of strings"),
    ("task-file-missing", lambda t, o: ["finetune", *base(
        t, o, f"tasks.partition={partition(t, ['tiny_color', 'ghost'], ['tiny_compare'])}")], 2,
     "ghost_16384_100_train.jsonl: file not found"),
    ("pretrain-text-not-utf8", lambda t, o: ["pretrain", *base(t, o, text_file(t, b'{"text": "ok"}\n\xff\n'))], 2,
     "docs.jsonl:2: not UTF-8 text"),
    ("pretrain-text-not-string", lambda t, o: ["pretrain", *base(t, o, text_file(t, b'{"text": 3}\n'))], 2,
     'docs.jsonl:1: expected a JSON object with a "text" field holding a string'),
    ("hf-dataset-folder-missing", lambda t, o: ["pretrain", *base(
        t, o, "pretrain.text=null", f"pretrain.hf_dataset={t}/none")], 2, "hf_dataset folder does not exist"),
    ("hf-dataset-split-unknown", lambda t, o: ["pretrain", *base(
        t, o, "pretrain.text=null", f"pretrain.hf_dataset={text_dataset(t)}", "pretrain.hf_split=nosuch")], 2,
     "split 'nosuch': Bad split: nosuch"),
    ("data-metaicl-dir-missing", lambda t, o: ["data", "metaicl", str(t / "none")], 2, "none: not a folder"),
    ("data-metaicl-partition-unknown", lambda t, o: ["data", "metaicl", str(t), "--partition", "qa_to_q"], 2,
     "Did you mean 'qa_to_qa'"),
    ("data-metaicl-incomplete", lambda t, o: ["data", "metaicl", str(t), "--partition", "qa_to_qa"], 2,
     "meta-test tasks missing (22)"),
    # output folders
    ("output-dir-is-a-file", lambda t, o: ["finetune", *base(t, o.parent / "file", )], 2,
     "exists and is not a folder"),
    ("output-dir-under-a-file", lambda t, o: ["distill", *base(t, o.parent / "file" / "sub")], 2,
     "exists and is not a folder"),
    ("data-out-is-a-file", lambda t, o: ["data", "bigbench", str(ROOT / "data"), str(o.parent / "file")], 2,
     "exists and is not a folder"),
    ("data-src-missing", lambda t, o: ["data", "bigbench", str(t / "none"), str(o)], 2, "SRC does not exist"),
    ("data-usage", lambda t, o: ["data", "bigbench", str(o)], 2, "give SRC and OUT"),
    # checkpoints the user points to
    ("distiller-checkpoint-missing", lambda t, o: ["distill", *base(t, o, f"distill.checkpoint={t}/none")], 2,
     "distill.checkpoint: path does not exist"),
    ("distiller-checkpoint-garbage", lambda t, o: ["distill", *base(
        t, o, f"distill.checkpoint={recipe(t, b'not safetensors at all', 'w.safetensors')}")], 2,
     "not a readable safetensors file"),
    ("distiller-checkpoint-other-recipe", lambda t, o: ["distill", *base(
        t, o, f"distill.checkpoint={other_recipe_weights(t)}")], 2, "does not fit this recipe's distiller"),
    ("no-trained-distiller", lambda t, o: ["distill", *base(t, o)], 2, "no trained distiller"),
    ("resume-without-checkpoint", lambda t, o: ["pretrain", *base(t, o), "--resume"], 2, "--resume: no checkpoint"),
    ("resume-and-restart", lambda t, o: ["pretrain", *base(t, o), "--resume", "--restart"], 2, "exclude each other"),
    ("no-pretrain-section", lambda t, o: ["pretrain", *base(t, o, "pretrain=null")], 2,
     "the recipe has no `pretrain` section"),
    ("eval-limit-zero", lambda t, o: ["eval", *base(t, o), "--limit", "0"], 2, "Invalid value for '--limit'"),
    # bounded parsing: each refused at once (the table's time limit below holds them to it)
    ("recipe-alias-bomb", lambda t, o: ["validate", recipe(t, alias_bomb())], 2, "its aliases expand to more than"),
    ("recipe-nested-deep", lambda t, o: ["validate", recipe(t, "seed: " + "[" * 20000 + "\n")], 2,
     "nested 20000 levels deep"),
    ("recipe-self-alias", lambda t, o: ["validate", recipe(t, "seed: &a [*a]\n")], 2, "refers to a node that holds it"),
    ("override-nested-deep", lambda t, o: ["finetune", *base(t, o, "seed=" + "[" * 20000)], 2,
     "nested 20000 levels deep"),
    ("partition-nested-deep", lambda t, o: ["finetune", *base(t, o, f"tasks.partition={recipe(t, '[' * 20000, 'p.json')}")],
     2, "p.json: nested 20000 levels deep"),
    ("task-line-nested-deep", lambda t, o: ["eval", *base(t, o, f"tasks.data_dir={tasks_copy(t)}")], 2,
     "tiny_sentiment_4_100_train.jsonl:2: nested 20000 levels deep"),
    # strict types and ranges
    ("steps-bool", lambda t, o: ["finetune", *base(t, o, "finetune.steps=true")], 2,
     "finetune.steps: Input should be a valid integer"),
    ("lr-bool", lambda t, o: ["finetune", *base(t, o, "finetune.lr=yes")], 2,
     "finetune.lr: Input should be a number, not true"),
    ("flag-number", lambda t, o: ["finetune", *base(t, o, "finetune.keep_best=1")], 2,
     "finetune.keep_best: Input should be a valid boolean"),
    ("steps-text", lambda t, o: ["finetune", *base(t, o, "finetune.steps='3'")], 2,
     "finetune.steps: Input should be a valid integer"),
    ("seeds-duplicate", lambda t, o: ["eval", *base(t, o, "tasks.seeds=[100,100]")], 2,
     "command line: tasks.seeds: lists a seed more than once: [100]"),
    ("seed-beyond-numpy", lambda t, o: ["finetune", *base(t, o, "seed=4294967296")], 2,
     "seed: Input should be less than or equal to 4294967295"),
    ("bootstrap-seed-negative", lambda t, o: ["eval", *base(t, o, "eval.bootstrap_seed=-5")], 2,
     "eval.bootstrap_seed: Input should be greater than or equal to 0"),
    ("pretrain-text-empty", lambda t, o: ["pretrain", *base(t, o, "pretrain.text=[]")], 2,
     "pretrain.text: List should have at least 1 item"),
    ("task-name-bidi", lambda t, o: ["distill", *base(
        t, o, f"tasks.partition={partition(t, ['tiny_color'], [BIDI_NAME])}")], 2, "is not a valid task name"),
    ("task-name-zero-width", lambda t, o: ["eval", *base(
        t, o, f"tasks.partition={partition(t, ['tiny_color'], [ZERO_WIDTH_NAME])}")], 2, "is not a valid task name"),
    ("output-dir-bidi", lambda t, o: ["finetune", *base(t, o.parent / BIDI_NAME)], 2,
     "holds control or invisible formatting characters"),
    ("partition-not-utf8", lambda t, o: ["finetune", *base(
        t, o, f"tasks.partition={recipe(t, NOT_UTF8_PARTITION, 'p.json')}")], 2, "p.json:1: not UTF-8 text"),
    ("demonstrations-fewer-than-k", lambda t, o: ["eval", *base(
        t, o, f"tasks.data_dir={short_demos(t)}", "eval.methods=[zero-shot]")], 2,
     "tiny_sentiment_4_100_train.jsonl: 2 demonstrations, but tasks.k is 4"),
    # user text is never markup, nor an emoji
    ("override-markup", lambda t, o: ["finetune", *base(t, o, "seed=[/x]]")], 2,
     "command line: override 'seed=[/x]]': invalid YAML value"),
    ("label-markup", lambda t, o: ["eval", *base(t, o, f"tasks.data_dir={tasks_copy(t)}")], 2,
     "the output '[/b]' is not among the options"),
    ("path-markup", lambda t, o: ["finetune", *base(t, Path(recipe(t, "a file", "[red]file")) / "sub")], 2,
     "[red]file exists and is not a folder"),
    ("path-emoji", lambda t, o: ["validate", recipe(t, "seed: true\n", "random-init:llama:seed=0.yaml")], 2,
     "random-init:llama:seed=0.yaml"),
    # files that are not what they should be
    ("bigbench-not-bigbench", lambda t, o: ["data", "bigbench", str(ROOT / "recipes"), str(o)], 2,
     "no BIG-bench task in it"),
    ("bigbench-task-not-json", lambda t, o: ["data", "bigbench", bigbench_dir(t, b"{not json"), str(o)], 2,
     "task.json: malformed JSON"),
    ("bigbench-task-not-object", lambda t, o: ["data", "bigbench", bigbench_dir(t, b'{"examples": 3}'), str(o)], 2,
     "not a BIG-bench task"),
    ("export-dest-exists", lambda t, o: ["export", GPT2, str(t), str(t / "file")], 2, "exists: pass --force"),
    ("vectors-all-nan", lambda t, o: ["eval", *base(t, o, "eval.methods=[mend]")], 2,
     "100.safetensors: 256 of its 256 values are not finite"),
    ("vectors-other-k", lambda t, o: ["eval", *base(t, o, "eval.methods=[mend]")], 2,
     "100.safetensors: holds 8 vectors, the recipe has num_vectors=4"),
    ("vectors-one", lambda t, o: ["eval", *base(t, o, "eval.methods=[mend]")], 2,
     "100.safetensors: holds 1 vectors, the recipe has num_vectors=4"),
    ("vectors-3d", lambda t, o: ["eval", *base(t, o, "eval.methods=[mend]")], 2,
     "100.safetensors: the vectors tensor has shape [1, 4, 64], not [K, hidden]"),
    ("vectors-integer", lambda t, o: ["eval", *base(t, o, "eval.methods=[mend]")], 2,
     "100.safetensors: the vectors are int64"),
    # a user's own demonstrations and queries (distill --demos, predict)
    ("demos-missing", lambda t, o: own(t, o, "distill", "--demos", t / "none.jsonl"), 2, "none.jsonl: file not found"),
    ("demos-malformed", lambda t, o: own(t, o, "distill", "--demos", jsonl(t, "d", DEMO, '{"input": "x", "out')), 2,
     "d.jsonl:2: malformed JSON"),
    ("demos-missing-output", lambda t, o: own(t, o, "distill", "--demos", jsonl(t, "d", DEMO, '{"input": "x"}')), 2,
     "d.jsonl:2: missing field output"),
    ("demos-output-not-an-option", lambda t, o: own(t, o, "distill", "--demos", jsonl(
        t, "d", '{"input": "x", "output": "c", "options": ["a", "b"]}')), 2, "d.jsonl:1: the output 'c' is not among"),
    ("demos-empty", lambda t, o: own(t, o, "distill", "--demos", jsonl(t, "d")), 2, "d.jsonl: no demonstrations"),
    ("demos-without-out", lambda t, o: ["distill", GPT2, f"output_dir={o}", "--demos", jsonl(t, "d", DEMO)], 2,
     "--demos needs --out"),
    ("out-without-demos", lambda t, o: ["distill", GPT2, f"output_dir={o}", "--out", str(t / "v.safetensors")], 2,
     "--out, --name and --untrained go with --demos"),
    ("demos-no-trained-distiller", lambda t, o: ["distill", GPT2, f"output_dir={o}", "--demos", jsonl(t, "d", DEMO),
                                                 "--out", str(t / "v.safetensors")], 2, "no trained distiller under"),
    ("demos-bad-name", lambda t, o: own(t, o, "distill", "--demos", jsonl(t, "d", DEMO), "--name", "../up"), 2,
     "--name: '../up' is not a valid task name"),
    ("demos-out-exists", lambda t, o: own(t, o, "distill", "--demos", jsonl(t, "d", DEMO), target=t / "file"), 2,
     "file exists: pass --force to overwrite it"),
    ("demos-out-is-a-folder", lambda t, o: own(t, o, "distill", "--demos", jsonl(t, "d", DEMO), target=t), 2,
     "--out names a folder"),
    ("queries-missing", lambda t, o: own(t, o, "predict", "--method", "zero-shot", "--queries", t / "q.jsonl"), 2,
     "q.jsonl: file not found"),
    ("queries-malformed", lambda t, o: own(t, o, "predict", "--method", "zero-shot", "--queries", jsonl(
        t, "q", '{"input": "a"}', '{"input": "b"}', "[1, 2")), 2, "q.jsonl:3: malformed JSON"),
    ("queries-missing-input", lambda t, o: own(t, o, "predict", "--method", "zero-shot", "--queries", jsonl(
        t, "q", '{"text": "a"}')), 2, "q.jsonl:1: missing field input"),
    ("queries-options-not-a-list", lambda t, o: own(t, o, "predict", "--method", "zero-shot", "--queries", jsonl(
        t, "q", '{"input": "a", "options": "yes"}')), 2, "q.jsonl:1: options must be a non-empty list of strings"),
    ("queries-empty", lambda t, o: own(t, o, "predict", "--method", "zero-shot", "--queries", jsonl(t, "q", "")), 2,
     "q.jsonl: no queries"),
    ("predict-icl-without-demos", lambda t, o: own(t, o, "predict", "--method", "icl", "--queries", jsonl(
        t, "q", QUERY)), 2, "--method icl needs --demos"),
    ("predict-mend-without-vectors", lambda t, o: own(t, o, "predict", "--queries", jsonl(t, "q", QUERY)), 2,
     "--method mend needs --vectors"),
    ("predict-unknown-method", lambda t, o: own(t, o, "predict", "--method", "few-shot", "--queries", jsonl(
        t, "q", QUERY)), 2, "Invalid value for '--method'"),
    ("predict-vectors-other-llm", lambda t, o: own(t, o, "predict", "--vectors", foreign_vectors(t), "--queries", jsonl(
        t, "q", QUERY)), 2, "was distilled for LLM random-init:llama:seed=0"),
    ("predict-vectors-garbage", lambda t, o: own(t, o, "predict", "--vectors", recipe(t, b"junk", "v.safetensors"),
                                                 "--queries", jsonl(t, "q", QUERY)), 2, "not a readable safetensors file"),
    ("predict-out-exists", lambda t, o: own(t, o, "predict", "--method", "zero-shot", "--queries", jsonl(t, "q", QUERY),
                                            target=t / "file"), 2, "file exists: pass --force"),
    ("predict-batch-size-zero", lambda t, o: own(t, o, "predict", "--method", "zero-shot", "--queries", jsonl(
        t, "q", QUERY), "--batch-size", "0"), 2, "Invalid value for '--batch-size'"),
]

DEMO = '{"input": "good", "output": "yes", "options": ["yes", "no"]}'
QUERY = '{"id": 1, "input": "fine", "options": ["yes", "no"]}'


def jsonl(tmp: Path, stem: str, *lines: str) -> str:
    return recipe(tmp, "".join(line + "\n" for line in lines), f"{stem}.jsonl")


def own(tmp: Path, out: Path, command: str, *args, target: Path | None = None) -> list[str]:
    """`command` on the tiny recipe with the user's own files, --out beside them (or `target`)."""
    target = target or tmp / ("v.safetensors" if command == "distill" else "answers.jsonl")
    extra = ["--untrained"] if command == "distill" else []
    return [command, GPT2, f"output_dir={out}", *map(str, args), *extra, "--out", str(target)]


def foreign_vectors(tmp: Path) -> str:
    """A vectors file as the tiny llama recipe would write it: another LLM than gpt2's."""
    from mendctl.core.vectors import save_vectors

    path = tmp / "llama.safetensors"
    save_vectors(path, torch.zeros(4, 64), {
        "backend": "llama", "llm_id": "random-init:llama:seed=0", "llm_config_hash": "0123456789abcdef",
        "distiller_hash": "untrained", "task": "mine", "num_demos": 1, "demos_hash": "0", "template": {},
        "anchor": "none"})
    return str(path)


def alias_bomb() -> str:
    """1.5 KB of YAML whose aliases expand to 9^9 values."""
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


def short_demos(tmp: Path) -> Path:
    data = tasks_copy(tmp)
    path = data / "tiny_sentiment" / "tiny_sentiment_4_100_train.jsonl"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:2]))
    return data


def bigbench_dir(tmp: Path, task_json: bytes) -> str:
    d = tmp / "bb" / "some_task"
    d.mkdir(parents=True)
    (d / "task.json").write_bytes(task_json)
    return str(tmp / "bb")


VECTORS = {  # cases whose output_dir holds a planted vectors file for tiny_sentiment, seed 100
    "vectors-all-nan": torch.full((4, 64), float("nan")),
    "vectors-other-k": torch.zeros(8, 64),
    "vectors-one": torch.zeros(1, 64),
    "vectors-3d": torch.zeros(1, 4, 64),
    "vectors-integer": torch.zeros(4, 64, dtype=torch.int64),
}


def plant_vectors(out: Path, tensor: torch.Tensor) -> None:
    from mendctl.core.vectors import FORMAT_VERSION, REQUIRED

    path = out / "vectors" / "tiny_sentiment" / "100.safetensors"
    path.parent.mkdir(parents=True)
    meta = {k: "x" for k in REQUIRED} | {"format_version": FORMAT_VERSION, "num_vectors": str(tensor.shape[0]),
                                         "dtype": str(tensor.dtype).removeprefix("torch."), "template": "{}"}
    save_file({"vectors": tensor}, str(path), meta)


def other_recipe_weights(tmp: Path) -> str:
    path = tmp / "other.safetensors"
    save_file({"placeholders": torch.zeros(3, 7)}, str(path))
    return str(path)


SPOIL = {  # cases whose task data is damaged after tasks_copy
    "task-line-nested-deep": ("tiny_sentiment", "tiny_sentiment_4_100_train.jsonl", b"[" * 20000),
    "label-markup": ("tiny_sentiment", "tiny_sentiment_4_100_train.jsonl",
                     b'{"input": "x", "output": "[/b]", "options": ["a", "b"]}'),
    "task-file-not-utf8": ("tiny_color", "tiny_color_16384_100_train.jsonl", b'{"input": "\xff", "output": "x"}'),
    "task-input-not-string": ("tiny_color", "tiny_color_16384_100_train.jsonl", b'{"input": ["a"], "output": "x"}'),
    "task-malformed-json": ("tiny_sentiment", "tiny_sentiment_4_100_train.jsonl", b'{"input": "x", "output": '),
    "task-options-not-list": ("tiny_sentiment", "tiny_sentiment_4_100_train.jsonl",
                              b'{"input": "x", "output": "a", "options": "a"}'),
}


def snapshot(tmp: Path, out: Path) -> dict[str, float]:
    """Every file outside `out` under tmp, and the repository's top level, with mtimes."""
    files = {str(p): p.stat().st_mtime for p in tmp.rglob("*") if out not in p.parents and p != out}
    files.update({f"repo:{p.name}": 0.0 for p in ROOT.iterdir()})
    return files


def served_folder(tmp: Path, name: str = "", content: bytes = b"") -> str:
    """A folder for `mendctl serve --vectors`, holding one file `name` (or nothing)."""
    folder = tmp / "served"
    folder.mkdir(exist_ok=True)
    if name:
        (folder / name).write_bytes(content)
    return str(folder)


_HELD: list = []  # sockets kept listening while a case runs


def taken_port() -> str:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    _HELD.append(s)
    return str(s.getsockname()[1])


def serve(t: Path, o: Path, folder: str, *args: str) -> list[str]:
    return ["serve", GPT2, f"output_dir={o}", "--vectors", folder, *args]


def lm_eval(t: Path, o: Path, vectors: str, *args: str) -> list[str]:
    return ["lm-eval", GPT2, f"output_dir={o}", "--vectors", vectors, *args]


SERVE_CASES = [
    ("serve-folder-missing", lambda t, o: serve(t, o, str(t / "none")), 2, "none: no such folder"),
    ("serve-folder-empty", lambda t, o: serve(t, o, served_folder(t)), 2,
     "no vectors (.safetensors) or demonstrations (.jsonl) to serve"),
    ("serve-vectors-garbage", lambda t, o: serve(t, o, served_folder(t, "v.safetensors", b"junk")), 2,
     "not a readable safetensors file"),
    ("serve-demos-malformed", lambda t, o: serve(t, o, served_folder(t, "d.jsonl", b'{"input": "x", "out\n')), 2,
     "d.jsonl:1: malformed JSON"),
    ("serve-port-taken", lambda t, o: serve(t, o, served_folder(t), "--port", taken_port()), 2, "cannot listen there"),
    ("serve-port-out-of-range", lambda t, o: serve(t, o, served_folder(t), "--port", "70000"), 2,
     "Invalid value for '--port'"),
    ("serve-max-batch-zero", lambda t, o: serve(t, o, served_folder(t), "--max-batch", "0"), 2,
     "Invalid value for '--max-batch'"),
    ("serve-bad-override", lambda t, o: serve(t, o, served_folder(t), "seed=-1"), 2, "seed: Input should be greater"),
]
LM_EVAL_CASES = [
    ("lm-eval-vectors-missing", lambda t, o: lm_eval(t, o, str(t / "v.safetensors"), "--tasks", "x"), 2,
     "v.safetensors: no such file"),
    ("lm-eval-vectors-garbage", lambda t, o: lm_eval(t, o, recipe(t, b"junk", "v.safetensors"), "--tasks", "x"), 2,
     "not a readable safetensors file"),
    ("lm-eval-model-given", lambda t, o: lm_eval(t, o, other_recipe_weights(t), "--model", "hf"), 2,
     "--model: the model is mend here"),
    ("lm-eval-unknown-argument", lambda t, o: lm_eval(t, o, other_recipe_weights(t), "--bogus"), 2,
     "lm-eval: unrecognized arguments: --bogus"),
    ("lm-eval-bad-override", lambda t, o: ["lm-eval", GPT2, f"output_dir={o}", "seed=-1", "--vectors", "v"], 2,
     "seed: Input should be greater"),
]
if all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")):
    CASES += SERVE_CASES
if importlib.util.find_spec("lm_eval"):
    CASES += LM_EVAL_CASES


@pytest.mark.parametrize("name, setup, code, phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, setup, code, phrase, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "file").write_text("a file where a folder is expected\n")
    argv = setup(tmp_path, out)
    if name in SPOIL:
        task, file, text = SPOIL[name]
        line = 3 if "16384" in file else 2
        spoil_line(tmp_path / "data", task, file, line, text)
    if name in VECTORS:
        plant_vectors(out, VECTORS[name])
    before = snapshot(tmp_path, out)
    start = time.process_time()
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == code, result.output
    assert phrase in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and "Aborted!" not in result.output
    assert snapshot(tmp_path, out) == before, "something was written outside output_dir"
    if name.startswith(("recipe-alias", "recipe-nested", "recipe-self", "override-nested")):
        assert time.process_time() - start < 2, "bounded parsing took too long"


# --------------------------------------------------------------------------- faults of a run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A stage-1 run of 2 steps with a checkpoint at each: what the resume cases damage (copies of it)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    result = CliRunner().invoke(cli, ["pretrain", *base(out.parent, out, "pretrain.steps=2", "pretrain.save_every=1")])
    assert result.exit_code == 0, result.output
    return out


def _resume(trained: Path, tmp_path: Path, damage, *extra: str):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    damage(out / "pretrain")
    return out, CliRunner().invoke(cli, ["pretrain", *base(tmp_path, out, "pretrain.save_every=1", *extra), "--resume"])


def _truncate(path: Path, size: int = 64) -> None:
    path.write_bytes(path.read_bytes()[:size])


RESUME_CASES = [
    ("rng-state-damaged", lambda d: _truncate(d / "checkpoints/step_0000002/random_states_0.pkl"), ["pretrain.steps=3"],
     2, "random_states_0.pkl is damaged"),
    ("optimizer-missing", lambda d: (d / "checkpoints/step_0000002/optimizer.bin").unlink(), ["pretrain.steps=3"],
     2, "optimizer.bin is missing"),
    ("weights-truncated", lambda d: _truncate(d / "checkpoints/step_0000002/model.safetensors"), ["pretrain.steps=3"],
     2, "model.safetensors is damaged"),
    ("trainer-state-damaged", lambda d: (d / "checkpoints/step_0000002/trainer_state.json").write_text('{"step": 2'),
     ["pretrain.steps=3"], 2, "trainer_state.json is damaged"),
    ("fewer-steps-than-done", lambda d: None, ["pretrain.steps=1"], 2, "is at step 2, beyond pretrain.steps=1"),
    ("metrics-damaged-inside", lambda d: (d / "metrics.jsonl").write_text('{"step": 1\n{"step": 2}\n'),
     ["pretrain.steps=3"], 2, "metrics.jsonl:1: not a metrics record"),
    ("step-negative", lambda d: _state(d, {"step": -2}), ["pretrain.steps=3"], 2,
     "trainer_state.json is damaged: step is -2, not a count of 0 or more"),
    ("step-bool", lambda d: _state(d, {"step": True}), ["pretrain.steps=3"], 2, "step is True, not a count"),
    ("step-not-the-folders", lambda d: _state(d, {"step": 1}), ["pretrain.steps=3"], 2,
     "is damaged: step 1 in the folder of step 2"),
    ("state-deeply-nested", lambda d: _state(d, "[" * 20000), ["pretrain.steps=3"], 2, "nested 20000 levels deep"),
    ("optimizer-not-a-state", lambda d: torch.save({"x": 1}, d / "checkpoints/step_0000002/optimizer.bin"),
     ["pretrain.steps=3"], 2, "optimizer.bin is damaged (ValueError: not an optimizer state)"),
    ("recipe-changed-lr", lambda d: None, ["pretrain.steps=3", "pretrain.lr=0.5"], 2,
     "the recipe differs from the one"),
    ("recipe-changed-k", lambda d: None, ["pretrain.steps=3", "num_vectors=8"], 2, "num_vectors: 4 -> 8"),
]


def _state(stage: Path, state) -> None:
    path = stage / "checkpoints/step_0000002/trainer_state.json"
    path.write_text(state if isinstance(state, str) else json.dumps(state))


def test_resume_names_every_changed_key_and_allows_the_listed_ones(trained, tmp_path):
    from mendctl.training.resume import MAY_CHANGE_ON_RESUME, recipe_changes

    out, result = _resume(trained, tmp_path, lambda d: None, "pretrain.steps=3", "pretrain.lr=0.5", "seed=3",
                          "pretrain.keep_last=5", "pretrain.trackers=[tensorboard]", "eval.bootstrap_samples=7")
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "pretrain.lr: 0.001 -> 0.5; seed: 0 -> 3. Only pretrain.steps" in text
    assert "keep_last:" not in text and "trackers:" not in text and "eval." not in text
    assert set(MAY_CHANGE_ON_RESUME) == {"steps", "save_every", "keep_last", "eval_every", "trackers"}
    assert recipe_changes({"finetune": {"lr": 1}}, {"finetune": {"lr": 2}}, "pretrain") == []


@pytest.mark.parametrize("name, damage, extra, code, phrase", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_refuses_what_it_cannot_restore(name, damage, extra, code, phrase, trained, tmp_path):
    out, result = _resume(trained, tmp_path, damage, *extra)
    assert result.exit_code == code, result.output
    assert phrase in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_resume_drops_a_partial_last_metrics_line(trained, tmp_path):
    out, result = _resume(trained, tmp_path, lambda d: open(d / "metrics.jsonl", "a").write('{"step": 3, "lo'),
                          "pretrain.steps=3")
    assert result.exit_code == 0, result.output
    assert "dropped a partial last line" in " ".join(result.output.split())
    assert [json.loads(line)["step"] for line in (out / "pretrain/metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_new_run_over_earlier_checkpoints_is_refused(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    result = CliRunner().invoke(cli, ["pretrain", *base(tmp_path, out)])
    assert result.exit_code == 2 and "continue it with --resume" in result.output


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    with output_lock(out, "mendctl finetune other.yaml"):
        for command in ("pretrain", "finetune", "distill", "eval"):
            result = CliRunner().invoke(cli, [command, *base(tmp_path, out)])
            text = " ".join(result.output.split())
            assert result.exit_code == 2, result.output
            assert f"in use by another mendctl run (pid {os.getpid()} on" in text
            assert "`mendctl finetune other.yaml`, started" in text
        result = CliRunner().invoke(cli, ["data", "bigbench", str(ROOT / "data"), str(out)])
        assert result.exit_code == 2 and "in use by another mendctl run" in result.output
    assert not (out / ".mendctl.core.lock.json").exists()


def test_a_full_disk_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    def full(self, path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "model.safetensors"))

    monkeypatch.setattr("accelerate.Accelerator.save_state", full)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["pretrain", *base(tmp_path, out, "pretrain.save_every=1")])
    assert result.exit_code == 2, result.output
    assert "No space left on device" in result.output and "Traceback" not in result.output
    assert list((out / "pretrain" / "checkpoints").iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_output_dir_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        result = CliRunner().invoke(cli, ["finetune", *base(tmp_path, out)])
    finally:
        out.chmod(0o700)
    assert result.exit_code == 2 and "is not writable" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is available on a GPU")
def test_fp16_on_a_cpu_is_refused(tmp_path):
    result = CliRunner().invoke(cli, ["finetune", *base(tmp_path, tmp_path / "out", "finetune.mixed_precision=fp16")])
    assert result.exit_code == 2 and "fp16 needs a GPU" in result.output


def test_a_failure_of_the_run_itself_exits_1_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    user = CliRunner().invoke(cli, ["--debug", "pretrain", *base(tmp_path, tmp_path / "o2"), "--resume"])
    assert user.exit_code == 2 and "Traceback" in user.output and "--resume: no checkpoint" in user.output
    monkeypatch.setattr(mendctl.commands.train, "train", boom)
    args = ["finetune", *base(tmp_path, tmp_path / "out")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "the run failed: RuntimeError: boom" in result.output
    assert "--debug" in result.output and "Traceback" not in result.output
    debug = CliRunner().invoke(cli, ["--debug", *args])
    assert debug.exit_code == 1 and isinstance(debug.exception, RuntimeError)


def test_divergence_is_a_failure_of_the_run(tmp_path, monkeypatch):
    def diverge(*args, **kwargs):
        raise mendctl.commands.train.TrainingDiverged("finetune: the loss became nan at step 1")

    monkeypatch.setattr(mendctl.commands.train, "train", diverge)
    result = CliRunner().invoke(cli, ["finetune", *base(tmp_path, tmp_path / "out")])
    assert result.exit_code == 1 and "the loss became nan" in result.output


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (str(self.marker), "w"))


def test_a_pickle_payload_in_a_checkpoint_is_never_run(trained, tmp_path):
    import pickle

    marker = tmp_path / "payload-ran"

    def plant(d: Path):
        (d / "checkpoints/step_0000002/random_states_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))

    out, result = _resume(trained, tmp_path, plant, "pretrain.steps=3")
    assert result.exit_code == 2 and "random_states_0.pkl is damaged" in " ".join(result.output.split())
    assert not marker.exists()


def test_an_atomic_write_cut_short_leaves_no_file(tmp_path):
    from mendctl.core.fileio import atomic_path

    target = tmp_path / "vectors" / "x.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(target.parent.iterdir()) == []


# --------------------------------------------------------------------------- links: nothing is written through one

LINKED = [  # (where in output_dir a link is planted, command)
    (".mendctl.lock.json", "finetune"),
    (".mendctl.lock", "pretrain"),
    ("finetune/metrics.jsonl", "finetune"),
    ("pretrain", "pretrain"),
    ("vectors/tiny_sentiment/100.safetensors", "distill"),
    ("eval/results.json", "eval"),
]


@pytest.mark.parametrize("where, command", LINKED, ids=[w for w, _ in LINKED])
def test_a_link_in_the_output_folder_is_refused_and_its_target_untouched(where, command, tmp_path):
    out = tmp_path / "out"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = out / where
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)
    result = CliRunner().invoke(cli, [command, *base(tmp_path, out)])
    assert result.exit_code == 2, result.output
    assert f"{link} is a symbolic link" in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert victim.read_text() == "precious\n" and link.is_symlink()


def test_writers_replace_no_link_and_append_through_none(tmp_path):
    from mendctl.core.fileio import LinkRefused, open_append, write_json

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for name in ("a.json", "b.jsonl"):
        (tmp_path / name).symlink_to(victim)
    with pytest.raises(LinkRefused, match="a.json is a symbolic link"):
        write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(LinkRefused, match="b.jsonl is a symbolic link"):
        open_append(tmp_path / "b.jsonl")
    assert victim.read_text() == "precious\n"


def test_export_and_cp_refuse_a_link_at_dest_even_with_force(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    dest = tmp_path / "dest.yaml"
    dest.symlink_to(victim)
    result = CliRunner().invoke(cli, ["cp", "smollm2-demo", str(dest), "--force"])
    assert result.exit_code == 2 and "is a symbolic link" in result.output, result.output
    assert victim.read_text() == "precious\n"


def test_a_folder_where_a_file_goes_is_named(tmp_path):
    from mendctl.core.fileio import write_json

    (tmp_path / "results.json").mkdir()
    with pytest.raises(IsADirectoryError, match="a folder is in the place of this file"):
        write_json(tmp_path / "results.json", {})


# --------------------------------------------------------------------------- a full disk

def test_a_full_disk_is_refused_before_writing_naming_the_folder_and_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr("mendctl.core.fileio.free_bytes", lambda folder: 10)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["finetune", *base(tmp_path, out)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert f"{out}: No space left on device (" in text and "bytes needed, 10 free)" in text
    assert "Traceback" not in result.output


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 40064 vs 39952"),
    RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
    Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
], ids=["torch-zip", "torch-write", "safetensors"])
def test_a_library_s_own_words_for_a_full_disk_exit_2(error, tmp_path, monkeypatch):
    def full(self, path, **kwargs):
        raise error

    monkeypatch.setattr("accelerate.Accelerator.save_state", full)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["pretrain", *base(tmp_path, out, "pretrain.save_every=1")])
    assert result.exit_code == 2, result.output
    assert f"{out / 'pretrain' / 'checkpoints'}: No space left on device" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_an_enospc_of_any_writer_names_its_folder(tmp_path):
    from mendctl.core.fileio import DiskFull, atomic_path

    with pytest.raises(DiskFull, match=f"{tmp_path / 'eval'}: No space left on device"):
        with atomic_path(tmp_path / "eval" / "results.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list((tmp_path / "eval").iterdir()) == []


# --------------------------------------------------------------------------- Ctrl-C: 130 at any point

@pytest.mark.parametrize("where", ["mendctl.cli.load_recipe", "mendctl.data.prepare.prepare", "mendctl.commands.eval.run_eval"])
def test_ctrl_c_at_any_point_exits_130_with_advice_the_command_takes(where, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, interrupt)
    result = CliRunner().invoke(cli, ["eval", *base(tmp_path, tmp_path / "out")])
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "--resume" not in result.output
    assert "Traceback" not in result.output and "Aborted!" not in result.output


def test_click_s_abort_exits_130(monkeypatch, tmp_path):
    import click

    def abort(*args, **kwargs):
        raise click.Abort

    monkeypatch.setattr("mendctl.cli.load_recipe", abort)
    result = CliRunner().invoke(cli, ["finetune", *base(tmp_path, tmp_path / "out")])
    assert result.exit_code == 130 and "continue with --resume" in result.output
    assert "Aborted!" not in result.output


# --------------------------------------------------------------------------- distiller files

@pytest.mark.parametrize("recipe_meta, phrase", [
    ("{not json", "the recipe in its metadata is not JSON"),
    ("[1, 2]", "the recipe in its metadata is damaged (a list, not a mapping)"),
    ('{"distiller": "x"}', "distiller is a str, not a mapping"),
    ("[" * 20000, "nested 20000 levels deep"),
], ids=["not-json", "a-list", "distiller-a-string", "nested-deep"])
def test_a_distiller_whose_metadata_is_damaged_is_named(recipe_meta, phrase, trained, tmp_path):
    from safetensors.torch import load_file

    weights = tmp_path / "d.safetensors"
    save_file(load_file(trained / "pretrain" / "distiller.safetensors"), str(weights), {"recipe": recipe_meta})
    result = CliRunner().invoke(cli, ["distill", *base(tmp_path, tmp_path / "out", f"distill.checkpoint={weights}")])
    assert result.exit_code == 2, result.output
    assert phrase in " ".join(result.output.split()) and "Traceback" not in result.output


def test_distiller_and_vectors_files_are_byte_reproducible(tmp_path):
    from mendctl.core.fileio import save_safetensors

    tensors = {f"t{i}": torch.full((2, 3), float(i)) for i in range(5)}
    meta = {f"key{i}": str(i) for i in range(30)}
    save_safetensors(tmp_path / "a.safetensors", tensors, meta)
    save_safetensors(tmp_path / "b.safetensors", dict(reversed(tensors.items())), dict(reversed(meta.items())))
    a = (tmp_path / "a.safetensors").read_bytes()
    assert a == (tmp_path / "b.safetensors").read_bytes()
    n = int.from_bytes(a[:8], "little")
    header = json.loads(a[8:8 + n])
    assert list(header["__metadata__"]) == sorted(meta) and list(header) == sorted(header)
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "a.safetensors")["t3"], tensors["t3"])


# --------------------------------------------------------------------------- the rest

def test_a_stray_folder_among_checkpoints_is_not_taken_for_one(tmp_path):
    from mendctl.training.checkpoint import STATE, checkpoints

    for name in ("step_0000002", "step_backup", "step_", "step_3x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE).write_text('{"step": 2}')
    assert [p.name for p in checkpoints(tmp_path)] == ["step_0000002"]


def test_output_dir_with_a_tilde_is_in_the_home_folder():
    from mendctl.core.config import load_recipe

    assert load_recipe(ROOT / GPT2, ["output_dir=~/mendctl-x"]).output_dir == Path.home() / "mendctl-x"


def test_stamping_runs_no_git_command_that_writes(monkeypatch):
    import subprocess

    from mendctl.core.provenance import git_hash

    calls = []
    real = subprocess.run

    def run(args, **kwargs):
        calls.append((args, kwargs.get("env", {}).get("GIT_OPTIONAL_LOCKS")))
        return real(args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    index = Path(real(["git", "rev-parse", "--git-path", "index"], cwd=ROOT, capture_output=True, text=True).stdout.strip())
    index = index if index.is_absolute() else ROOT / index
    before = index.stat().st_mtime_ns if index.exists() else None
    git_hash()
    assert calls and all(args[:2] == ["git", "--no-optional-locks"] and env == "0" for args, env in calls)
    assert (index.stat().st_mtime_ns if index.exists() else None) == before


def test_ctrl_c_while_the_command_line_loads_exits_130(monkeypatch, capsys):
    import builtins

    from mendctl import entry

    real = builtins.__import__

    def interrupted(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "cli" and level == 1:  # `from .cli import main` in entry.py
            raise KeyboardInterrupt
        return real(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as e:
        entry.main()
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.startswith("interrupted:") and "Traceback" not in err
