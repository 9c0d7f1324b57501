"""The two-stage meta-distillation trainer (method.md, "Training"), one loop for both stages.

The frozen LLM is its own teacher: it reads the raw demonstrations (teacher, no gradients) or the
distilled vectors (student) before the same query; the distiller learns to make the student's
next-token distributions match the teacher's. Accelerate handles devices, mixed precision and
multiple processes; the single-process CPU run is the same code.
"""
from __future__ import annotations

import json
import random
import shutil
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import set_seed
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from ..core.config import Recipe, TemplateSpec, resolved_dict
from ..core.fileio import open_append
from ..core.registry import get_backend
from ..models.anchors import anchor_embeddings, anchor_ids
from ..models.backend import Models
from ..models.distiller import distiller_inputs
from ..training.averaging import WeightAverage
from ..training.checkpoint import (BEST, checkpoints, keep_trainable_in_checkpoints, load_distiller, read_state,
                                   save_checkpoint, save_distiller, write_distiller)
from ..training.curves import Validation, plot
from ..training.examples import Example, TaskExamples, TextExamples
from ..training.losses import ForwardKL, OptionKL, SparseKL, TargetCE
from ..training.resume import check_same_recipe, trim_metrics, verify_checkpoint
from ..training.stage import Stage, build_stage
from ..training.teacher_cache import CachedTeacher, open_teacher, teacher_logits


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class StepStats:
    loss: torch.Tensor
    kl: float
    ce: float
    teacher_ce: float  # the same CE for ICL itself: the level the student's CE is chasing
    tokens: int


@dataclass
class Objective:
    """What a step's loss is made of: the teacher's side of the KL, and the weights of KL and CE."""
    kl: ForwardKL | SparseKL
    ce_weight: float
    kl_weight: float
    # The teacher's top-k from the cache instead of its forward pass; the KL must then be a SparseKL.
    cached: CachedTeacher | None = None
    measure_ce: bool = True  # False: ce and teacher_ce are logged as 0 (stage 1)
    on: str = "query"  # finetune.kl_on

    @classmethod
    def for_stage(cls, stage: Stage, cached: CachedTeacher | None) -> Objective:
        t = stage.spec.temperature
        kl = OptionKL(t) if stage.kl_on == "options" else SparseKL(t) if cached else ForwardKL(t)
        return cls(kl, stage.ce_weight, stage.kl_weight, cached, stage.measures_ce, stage.kl_on)


def step_loss(models: Models, distiller, batch: list[Example], recipe: Recipe, objective: Objective,
              positions: list[int] | None = None) -> StepStats:
    """`positions` (the batch's example positions) are the cached teacher's keys."""
    llm, cached = models.llm, objective.cached
    as_t = lambda ids: torch.tensor(ids, dtype=torch.long, device=llm.device)  # noqa: E731
    xs, ys = [as_t(e.x) for e in batch], [as_t(e.y) for e in batch]
    # The distiller reads each episode's demonstrations once (queries_per_episode: several queries share them).
    episodes: dict[tuple, int] = {}
    episode = [episodes.setdefault((e.distiller_text, tuple(e.ctx)), len(episodes)) for e in batch]
    firsts = [batch[episode.index(n)] for n in range(len(episodes))]
    d_ids, d_mask = distiller_inputs([e.distiller_text for e in firsts], models.distiller_tokenizer,
                                     recipe.distiller.max_length, llm.device)
    anchor, k = recipe.distiller.anchor, recipe.num_vectors
    anchors = None if anchor == "none" else anchor_embeddings(
        llm, [anchor_ids(anchor, e.ctx, e.labels, k) for e in firsts], k)
    vectors = distiller(d_ids, d_mask, anchors)
    if objective.on == "options":
        return _option_step(llm, batch, [vectors[n] for n in episode], xs, objective, int(d_mask.sum()))
    if cached is None:
        with torch.no_grad():
            teacher = teacher_logits(llm, batch)
    else:
        top = cached(batch, positions)
    student = llm.target_logits([vectors[n] for n in episode], xs, ys)
    ce = TargetCE()
    # Measured even at ce_weight 0: a KL-only run still shows how the student's CE follows ICL's.
    has_y = objective.measure_ce and bool(student.is_y.any())
    # kl_on: output keeps the output's rows; the default takes every row as it is, with no copy of the logits.
    output_only = objective.on == "output"
    student_kl = student.logits[student.is_y] if output_only else student.logits
    if cached is None:
        kl_loss = objective.kl(teacher.logits[teacher.is_y] if output_only else teacher.logits, student_kl)
        teacher_ce = ce(teacher.logits[teacher.is_y], teacher.targets[teacher.is_y]).item() if has_y else 0.0
    else:
        kept = top.rows(student.is_y) if output_only else top
        kl_loss = objective.kl(kept.logp, kept.ids, kept.log_rest, student_kl)
        teacher_ce = -top.target_logp[student.is_y].mean().item() if has_y else 0.0
    ce_loss = ce(student.logits[student.is_y], student.targets[student.is_y]) if has_y else kl_loss.new_zeros(())
    loss = objective.kl_weight * kl_loss + objective.ce_weight * ce_loss
    # tokens/s counts what the models read: a teacher served from the cache read nothing.
    query = lambda e: llm.bos_len + len(e.x) + len(e.y)  # noqa: E731
    taught = batch if cached is None else [batch[i] for i in cached.computed]
    tokens = (int(d_mask.sum()) + sum(map(query, batch)) + sum(map(query, taught))
              + sum(len(ctx) for ctx in {tuple(e.ctx) for e in taught}))
    return StepStats(loss, kl_loss.item(), ce_loss.item(), teacher_ce, tokens)


def _option_step(llm, batch: list[Example], prefixes: list[torch.Tensor], xs: list[torch.Tensor],
                 objective: Objective, distiller_tokens: int) -> StepStats:
    """finetune.kl_on: options. The KL between ICL's and the student's distributions over each example's
    options, as `mendctl eval` scores them; the CE is the student's mean token loss of the gold option."""
    as_t = lambda ids: torch.tensor(ids, dtype=torch.long, device=llm.device)  # noqa: E731
    options = [[as_t(o) for o in e.options] for e in batch]
    gold = [e.options.index(e.y) for e in batch]
    with torch.no_grad():
        teacher = [llm.option_losses(llm.embed(as_t(e.ctx)), x, o) for e, x, o in zip(batch, xs, options)]
    student = [llm.option_losses(p, x, o) for p, x, o in zip(prefixes, xs, options)]
    kl_loss = objective.kl(teacher, student)
    ce_loss = torch.stack([s[g] for s, g in zip(student, gold)]).mean()
    loss = objective.kl_weight * kl_loss + objective.ce_weight * ce_loss
    teacher_ce = statistics.fmean(float(t[g]) for t, g in zip(teacher, gold))
    per_query = sum(llm.bos_len + len(e.x) + sum(map(len, e.options)) for e in batch)
    tokens = distiller_tokens + 2 * per_query + sum(len(e.ctx) for e in batch)
    return StepStats(loss, kl_loss.item(), ce_loss.item(), teacher_ce, tokens)


@dataclass
class Run:
    """What every step of one stage's run reads, built once by _prepare."""
    stage: Stage
    accelerator: Accelerator
    models: Models
    distiller: torch.nn.Module  # as Accelerate prepared it: wrapped for gradient sync with several processes
    optimizer: AcceleratedOptimizer
    scheduler: AcceleratedScheduler
    examples: TextExamples | TaskExamples
    objective: Objective
    template: TemplateSpec
    tracking: bool
    llm_before: dict[str, torch.Tensor]  # a few frozen LLM tensors, to prove at the end that none changed
    average: WeightAverage | None = None  # `ema`: what the curve scores and the saved distillers hold
    last_good: Path | None = None  # the newest checkpoint, named when the loss diverges

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def per_step(self) -> int:
        spec = self.stage.spec
        return spec.batch_size * spec.grad_accum * self.accelerator.num_processes

    def kept(self):
        """The weights to score and save: the average with `ema`, else the weights as they are."""
        return self.average.applied() if self.average else nullcontext()

    @property
    def info(self) -> dict:
        """What run.json says of where the distiller came from."""
        start = self.stage.start_from
        return {"stage": self.stage.name, "initialised_from": None if start is None else str(start),
                "llm_id": self.models.llm_id, "llm_config_hash": self.models.llm_config_hash}


def train(recipe: Recipe, stage_name: str, resume: bool = False, restart: bool = False,
          console: Console | None = None) -> Path:
    """Runs one stage; `resume` continues from the newest checkpoint, `restart` discards earlier ones."""
    stage = build_stage(recipe, stage_name)
    spec, console = stage.spec, console or Console()
    _clear_the_way(stage, resume, restart)
    run = _prepare(stage, _available_trackers(spec.trackers, console), console)
    step = _resume(run, console) if resume else 0
    if run.tracking:
        run.accelerator.init_trackers(f"mendctl-{stage.name}", config=recipe.model_dump(mode="json"))
    stage.out.mkdir(parents=True, exist_ok=True)
    # A fresh run (step 0) keeps nothing of an earlier one, not even its step-0 validation line.
    log = _metrics_log(stage.out / "metrics.jsonl", step, console) if run.main else None
    progress = _progress(console, run.main)
    report = _Report(stage, log, progress, progress.add_task(stage.name, total=spec.steps, completed=step, stats=""),
                     console)
    curve = _curve(run)
    if curve and step == 0:  # the untrained distiller: where the curve starts
        first = curve.point(run, 0)
        log.write(json.dumps(first) + "\n")
        if run.tracking:
            run.accelerator.log(first, step=0)
    t0 = time.perf_counter()
    rng = _rng_state()
    try:
        with progress:
            while step < spec.steps:
                tic = time.perf_counter()
                sums = _optimizer_step(run, step)
                step += 1
                rng = _rng_state()
                record = {"step": step, **_means(run, sums, tic), "elapsed_s": time.perf_counter() - t0}
                if curve and (step % spec.eval_every == 0 or step == spec.steps):
                    record |= curve.point(run, step)
                if run.main:
                    report(record)
                if run.tracking:
                    run.accelerator.log(record, step=step)
                if step % spec.save_every == 0 or step == spec.steps:
                    run.last_good = _checkpoint(run, step)
    except KeyboardInterrupt:
        _save_interrupted(run, step, rng, console)
        raise
    if log:
        log.close()
        plot(stage.out / "metrics.jsonl", stage.out / "curves.png", stage.name)
    return _finish(run, step, console)


def _clear_the_way(stage: Stage, resume: bool, restart: bool) -> None:
    """Refuses what cannot run before anything slow is loaded; --restart deletes the earlier checkpoints."""
    if stage.spec.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(f"{stage.name}.mixed_precision: fp16 needs a GPU and none is available; use no (or bf16)")
    if not resume and checkpoints(stage.checkpoints):
        if not restart:
            raise FileExistsError(f"{stage.checkpoints} holds checkpoints of an earlier run: continue it with "
                                  "--resume, or start over with --restart (which deletes them)")
        shutil.rmtree(stage.checkpoints)


def _prepare(stage: Stage, trackers: list[str], console: Console) -> Run:
    """The models, optimiser and data of the run, in the order that fixes its random draws."""
    recipe, spec = stage.recipe, stage.spec
    accelerator = Accelerator(mixed_precision=spec.mixed_precision, log_with=trackers or None,
                              project_dir=str(stage.out))
    main = accelerator.is_main_process
    set_seed(recipe.seed)
    backend = get_backend(recipe.backend)
    if main:
        console.print(f"{stage.name}: loading the {recipe.backend} LLM and distiller")
    models = backend.build(recipe)
    _init_weights(stage, models, console if main else Console(quiet=True))
    models.llm.to(accelerator.device)
    llm_before = {k: v.clone() for k, v in list(models.llm.model.state_dict().items())[:2]}

    distiller = models.distiller.train()
    # fused: one kernel for all parameters; on CPU it cut the optimiser step of a 50M distiller ~7x here.
    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=spec.lr,
                                  weight_decay=spec.weight_decay, fused=True)
    schedule = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}[spec.lr_schedule]
    scheduler = schedule(optimizer, spec.warmup_steps, spec.steps)
    distiller, optimizer, scheduler = accelerator.prepare(distiller, optimizer, scheduler)
    keep_trainable_in_checkpoints(accelerator)
    template = backend.template(recipe)
    examples = stage.examples(models, template)
    cached = open_teacher(recipe, stage.name, models, template) if stage.reads_teacher_cache else None
    average = WeightAverage(accelerator.unwrap_model(distiller), spec.ema) if spec.ema else None
    if average:
        accelerator.register_for_checkpointing(average)
    return Run(stage, accelerator, models, distiller, optimizer, scheduler, examples,
               Objective.for_stage(stage, cached), template, bool(trackers), llm_before, average)


def _init_weights(stage: Stage, models: Models, console: Console) -> None:
    if stage.start_from is not None:
        load_distiller(models.distiller, stage.start_from, for_vectors=False)
        console.print(f"Starting from {stage.start_from}", markup=False)
    elif stage.follows is not None:
        console.print("[yellow]No stage-1 distiller in "
                      f"{escape(str(stage.recipe.stage_dir(stage.follows)))}: finetuning starts from the initial "
                      "distiller.[/]")


def _resume(run: Run, console: Console) -> int:
    """Loads the newest checkpoint (weights, optimiser, scheduler, RNG); returns its step."""
    stage, accelerator = run.stage, run.accelerator
    done = checkpoints(stage.checkpoints)
    if not done:
        raise FileNotFoundError(f"--resume: no checkpoint in {stage.checkpoints}")
    verify_checkpoint(done[-1], accelerator.num_processes, averaged=run.average is not None)
    state = read_state(done[-1])
    check_same_recipe(state, resolved_dict(stage.recipe), stage.name, done[-1])
    step = state["step"]
    if step > stage.spec.steps:
        raise ValueError(f"--resume: {done[-1]} is at step {step}, beyond {stage.name}.steps={stage.spec.steps}; "
                         f"set {stage.name}.steps to at least {step}")
    accelerator.load_state(str(done[-1]))
    if run.main:
        console.print(f"Resuming from {done[-1]} (step {step}/{stage.spec.steps})", markup=False)
    run.last_good = done[-1]
    return step


def _metrics_log(path: Path, resume_step: int, console: Console):
    """metrics.jsonl opened for append; on resume, lines after the checkpoint are dropped."""
    note = trim_metrics(path, resume_step)
    if note:
        console.print(f"[yellow]note[/]: {escape(note)}")
    return open_append(path)


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled)


@dataclass
class _Curve:
    """Validation points; with keep_best, best.safetensors follows the lowest val_kl so far."""
    validation: Validation
    best_kl: float | None

    def point(self, run: Run, at: int) -> dict:
        recipe, spec = run.stage.recipe, run.stage.spec
        with run.kept():
            scores = {"step": at, **self.validation.score_distiller(recipe.distiller.max_length, spec.batch_size)}
            if spec.keep_best and (self.best_kl is None or scores["val_kl"] < self.best_kl):
                self.best_kl = scores["val_kl"]
                write_distiller(run.stage.out / BEST, run.accelerator.unwrap_model(run.distiller), recipe,
                                {**run.info, "steps": at, **scores})
        return scores


def _curve(run: Run) -> _Curve | None:
    spec = run.stage.spec
    # Learning curves on the main process only: the others wait for it at the next gradient all-reduce.
    if not (spec.eval_every and run.main):
        return None
    validation = Validation(run.stage.recipe, run.models, run.template, spec.eval_queries, spec.eval_sets)
    return _Curve(validation, _best_val_kl(run.stage.out / "metrics.jsonl") if spec.keep_best else None)


def _optimizer_step(run: Run, step: int) -> torch.Tensor:
    """One optimiser step over grad_accum micro-batches; returns [loss, kl, ce, teacher_ce, tokens] summed."""
    accelerator, spec, distiller = run.accelerator, run.stage.spec, run.distiller
    sums = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    for micro in range(spec.grad_accum):
        # Each process reads its own positions: example p is the same whatever the number of processes.
        base = step * run.per_step + (micro * accelerator.num_processes + accelerator.process_index) * spec.batch_size
        positions = list(range(base, base + spec.batch_size))
        batch = [run.examples.get(p) for p in positions]
        sync = micro == spec.grad_accum - 1
        with accelerator.autocast(), (accelerator.no_sync(distiller) if not sync else nullcontext()):
            stats = step_loss(run.models, distiller, batch, run.stage.recipe, run.objective, positions)
            if not torch.isfinite(stats.loss):
                raise _diverged(run, stats.loss.item(), step + 1)
            accelerator.backward(stats.loss / spec.grad_accum)
        sums += torch.tensor([stats.loss.item(), stats.kl, stats.ce, stats.teacher_ce, stats.tokens], dtype=torch.float64,
                             device=accelerator.device)
    if spec.max_grad_norm:
        accelerator.clip_grad_norm_(distiller.parameters(), spec.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.average:
        run.average.update()
    return sums


def _diverged(run: Run, loss: float, step: int) -> TrainingDiverged:
    where = f"; the last good checkpoint is {run.last_good}" if run.last_good else "; no checkpoint was written yet"
    return TrainingDiverged(f"{run.stage.name}: the loss became {loss} at step {step}{where}. "
                            "Lower the learning rate or use mixed_precision: no.")


def _means(run: Run, sums: torch.Tensor, tic: float) -> dict:
    """The step's logged values, averaged over processes (tokens summed), not rank 0's alone."""
    accelerator, grad_accum = run.accelerator, run.stage.spec.grad_accum
    loss, kl, ce, teacher_ce, tokens = (accelerator.reduce(sums, "sum") / torch.tensor(
        [accelerator.num_processes * grad_accum] * 4 + [1], dtype=torch.float64, device=accelerator.device)).tolist()
    return {"loss": loss, "kl": kl, "ce": ce, "teacher_ce": teacher_ce, "lr": run.scheduler.get_last_lr()[0],
            "tokens_per_s": tokens / (time.perf_counter() - tic)}


def _checkpoint(run: Run, at: int) -> Path:
    # The cache first: a resumed run must find every teacher row the checkpointed steps computed.
    if run.objective.cached:
        run.objective.cached.cache.flush()
    # The resolved recipe too: --resume compares it with its own (resume.check_same_recipe).
    state = {"step": at, "position": at * run.per_step, "recipe": resolved_dict(run.stage.recipe)}
    return save_checkpoint(run.accelerator, run.stage.checkpoints, at, state, run.stage.spec.keep_last)


def _save_interrupted(run: Run, step: int, rng: dict, console: Console) -> None:
    """Keeps the finished steps on Ctrl-C: checkpoints the last completed one, with the RNG as it was
    then, so that --resume continues exactly as if nothing had happened. A multi-process run cannot
    rely on every process being interrupted at once, so it keeps its last regular checkpoint."""
    last = run.last_good
    if run.accelerator.num_processes == 1 and step > 0 and (last is None or read_state(last)["step"] != step):
        _set_rng_state(rng)
        saved = _checkpoint(run, step)
        console.print(f"[yellow]interrupted[/]: step {step} saved to {escape(str(saved))}")


def _finish(run: Run, step: int, console: Console) -> Path:
    """Checks that the LLM stayed frozen and writes the final distiller (main process)."""
    if run.objective.cached:
        run.objective.cached.cache.flush()
    run.accelerator.wait_for_everyone()
    _check_frozen(run.models, run.llm_before)
    path = run.stage.out / "distiller.safetensors"
    if run.main:
        with run.kept():
            path = save_distiller(run.stage.out, run.accelerator.unwrap_model(run.distiller), run.stage.recipe,
                                  {**run.info, "steps": step, "ema": run.stage.spec.ema})
        console.print(f"[green]{run.stage.name} done[/]: {escape(str(path))}")
    if run.tracking:
        run.accelerator.end_training()
    return path


def _best_val_kl(metrics_path: Path) -> float | None:
    """The lowest validation KL logged so far (a resumed run keeps the best of the steps it continues)."""
    if not metrics_path.is_file():
        return None
    kls = [json.loads(line).get("val_kl") for line in metrics_path.read_text().splitlines() if line.strip()]
    return min((k for k in kls if k is not None), default=None)


@dataclass
class _Report:
    """Where a step's record goes on the main process: metrics.jsonl, the progress bar, the console."""
    stage: Stage
    log: TextIO
    progress: Progress
    bar: TaskID
    console: Console

    def __call__(self, record: dict) -> None:
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        name, total = self.stage.name, self.stage.spec.steps
        text = (f"loss {record['loss']:.4f}  kl {record['kl']:.4f}"
                + (f"  ce {record['ce']:.4f} (icl {record['teacher_ce']:.4f})" if self.stage.measures_ce else "")
                + f"  {record['tokens_per_s']:.0f} tok/s")
        self.progress.update(self.bar, completed=record["step"], stats=text)
        if "val_mend_f1" in record:
            self.console.print(f"{name} step {record['step']} validation: mend macro-F1 "
                               f"{100 * record['val_mend_f1']:.1f} (icl {100 * record['val_icl_f1']:.1f}, "
                               f"zero-shot {100 * record['val_zero_shot_f1']:.1f}), agreement "
                               f"{100 * record['val_agreement']:.1f}%, KL {record['val_kl']:.4f}"
                               + (f", correction {record['val_correction']:.3f} of the anchors "
                                  f"({100 * record['val_correction_shared']:.0f}% shared by all sets)"
                                  if "val_correction" in record else ""))
        # Without a terminal the bar is invisible: a plain line every 5% keeps logs informative.
        if not self.console.is_terminal and (record["step"] % max(1, total // 20) == 0 or record["step"] == total):
            self.console.print(f"{name} step {record['step']}/{total}  {text}")


def _available_trackers(requested: list[str], console: Console) -> list[str]:
    """The requested trackers that are installed; Accelerate would drop the others without a word."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    installed = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    kept = [t for t in requested if installed[t]()]
    for missing in [t for t in requested if t not in kept]:
        console.print(f"[yellow]warning[/]: tracker {missing} is not installed (pip install {missing}); "
                      "metrics still go to metrics.jsonl")
    return kept


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_frozen(models: Models, before: dict) -> None:
    after = models.llm.model.state_dict()
    for k, v in before.items():
        if not torch.equal(v, after[k]):
            raise AssertionError(f"the frozen LLM's {k} changed during training")
