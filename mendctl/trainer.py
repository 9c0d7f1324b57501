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
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import get_linear_schedule_with_warmup

from .backend import Models
from .checkpoint import (BEST, checkpoints, keep_trainable_in_checkpoints, load_distiller, read_state,
                         save_checkpoint, save_distiller, write_distiller)
from .config import FinetuneSpec, PretrainSpec, Recipe
from .anchors import anchor_embeddings, anchor_ids
from .curves import Validation, plot
from .distiller import distil, distiller_inputs
from .examples import Example, example_source
from .losses import ForwardKL, SparseKL, TargetCE
from .registry import get_backend
from .resume import trim_metrics, verify_checkpoint
from .teacher_cache import CachedTeacher, open_teacher
from .workspace import stage_input

class TrainingDiverged(RuntimeError):
    pass


@dataclass
class StepStats:
    loss: torch.Tensor
    kl: float
    ce: float
    teacher_ce: float  # the same CE for ICL itself: the level the student's CE is chasing
    tokens: int


def step_loss(models: Models, distiller, batch: list[Example], recipe: Recipe, kl: ForwardKL | SparseKL,
              ce_weight: float, kl_weight: float, device, cached: CachedTeacher | None = None,
              positions: list[int] | None = None) -> StepStats:
    """`cached` (with the batch's example positions) replaces the teacher's forward pass by its top-k."""
    llm = models.llm
    as_t = lambda ids: torch.tensor(ids, dtype=torch.long, device=device)  # noqa: E731
    xs, ys = [as_t(e.x) for e in batch], [as_t(e.y) for e in batch]
    d_ids, d_mask = distiller_inputs([e.distiller_text for e in batch], models.distiller_tokenizer,
                                     recipe.distiller.max_length, device)
    if cached is None:
        with torch.no_grad():
            teacher = llm.target_logits([llm.embed(as_t(e.ctx)) for e in batch], xs, ys)
    else:
        top = cached(batch, positions)
    anchor, k = recipe.distiller.anchor, recipe.num_vectors
    anchors = None if anchor == "none" else anchor_embeddings(
        llm, [anchor_ids(anchor, e.ctx, e.labels, k) for e in batch], k)
    vectors = distiller(d_ids, d_mask, anchors)
    student = llm.target_logits(list(vectors), xs, ys)
    ce = TargetCE()
    # The CEs are measured whenever there are target tokens, even at ce_weight 0 (a KL-only run's curve).
    has_y = bool(student.is_y.any())
    if cached is None:
        kl_loss = kl(teacher.logits, student.logits)
        teacher_ce = ce(teacher.logits[teacher.is_y], teacher.targets[teacher.is_y]).item() if has_y else 0.0
    else:
        kl_loss = kl(top.logp, top.ids, top.log_rest, student.logits)
        teacher_ce = -top.target_logp[student.is_y].mean().item() if has_y else 0.0
    ce_loss = ce(student.logits[student.is_y], student.targets[student.is_y]) if has_y else kl_loss.new_zeros(())
    loss = kl_weight * kl_loss + ce_weight * ce_loss
    tokens = int(d_mask.sum()) + sum(len(e.ctx) + 2 * (llm.bos_len + len(e.x) + len(e.y)) for e in batch)
    return StepStats(loss, kl_loss.item(), ce_loss.item(), teacher_ce, tokens)


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled)


def _init_weights(stage: str, spec, recipe: Recipe, models: Models, console: Console) -> str | None:
    if stage != "finetune":
        return None
    source = stage_input(recipe, "finetune")
    if source is None:
        console.print("[yellow]No stage-1 distiller in "
                      f"{recipe.stage_dir('pretrain')}: finetuning starts from the initial distiller.[/]")
        return None
    load_distiller(models.distiller, source)
    console.print(f"Starting from {source}")
    return str(source)


def _metrics_log(path: Path, resume_step: int, console: Console):
    """metrics.jsonl opened for append; on resume, lines after the checkpoint are dropped."""
    note = trim_metrics(path, resume_step)
    if note:
        console.print(f"[yellow]note[/]: {note}")
    return path.open("a")


def train(recipe: Recipe, stage: str, resume: bool = False, restart: bool = False, console: Console | None = None
          ) -> Path:
    """Runs one stage; `resume` continues from the newest checkpoint, `restart` discards earlier ones."""
    spec: PretrainSpec | FinetuneSpec | None = getattr(recipe, stage)
    if spec is None:
        raise ValueError(f"the recipe has no `{stage}` section")
    if spec.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(f"{stage}.mixed_precision: fp16 needs a GPU and none is available; use no (or bf16)")
    out = recipe.stage_dir(stage)
    ckpt_root = out / "checkpoints"
    console = console or Console()
    if not resume and checkpoints(ckpt_root):
        if not restart:
            raise FileExistsError(f"{ckpt_root} holds checkpoints of an earlier run: continue it with --resume, "
                                  "or start over with --restart (which deletes them)")
        shutil.rmtree(ckpt_root)
    trackers = _available_trackers(spec.trackers, console)
    accelerator = Accelerator(mixed_precision=spec.mixed_precision, log_with=trackers or None, project_dir=str(out))
    main = accelerator.is_main_process
    set_seed(recipe.seed)
    backend = get_backend(recipe.backend)
    if main:
        console.print(f"{stage}: loading the {recipe.backend} LLM and distiller")
    models = backend.build(recipe)
    start_from = _init_weights(stage, spec, recipe, models, console if main else Console(quiet=True))
    models.llm.to(accelerator.device)
    llm_before = {k: v.clone() for k, v in list(models.llm.model.state_dict().items())[:2]}

    distiller = models.distiller.train()
    # fused: one kernel for all parameters; on CPU it cut the optimiser step of a 50M distiller ~7x here.
    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=spec.lr,
                                  weight_decay=spec.weight_decay, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, spec.warmup_steps, spec.steps)
    distiller, optimizer, scheduler = accelerator.prepare(distiller, optimizer, scheduler)
    keep_trainable_in_checkpoints(accelerator)
    examples = example_source(stage, recipe, models.llm_tokenizer, models.llm.is_encoder_decoder,
                              backend.template(recipe))
    cached = open_teacher(recipe, stage, models, backend.template(recipe)) if spec.teacher_cache else None

    step = 0
    if resume:
        done = checkpoints(ckpt_root)
        if not done:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_root}")
        verify_checkpoint(done[-1], accelerator.num_processes)
        step = read_state(done[-1])["step"]
        if step > spec.steps:
            raise ValueError(f"--resume: {done[-1]} is at step {step}, beyond {stage}.steps={spec.steps}; "
                             f"set {stage}.steps to at least {step}")
        accelerator.load_state(str(done[-1]))
        if main:
            console.print(f"Resuming from {done[-1]} (step {step}/{spec.steps})")
    if trackers:
        accelerator.init_trackers(f"mendctl-{stage}", config=recipe.model_dump(mode="json"))

    kl = SparseKL(spec.temperature) if cached else ForwardKL(spec.temperature)
    ce_weight = spec.ce_weight if stage == "finetune" else 0.0
    kl_weight = spec.kl_weight if stage == "finetune" else 1.0
    per_step = spec.batch_size * spec.grad_accum * accelerator.num_processes
    out.mkdir(parents=True, exist_ok=True)
    # A fresh run (step 0) keeps nothing of an earlier one, not even its step-0 validation line.
    log = _metrics_log(out / "metrics.jsonl", step, console) if main else None
    progress = _progress(console, main)
    bar = progress.add_task(stage, total=spec.steps, completed=step, stats="")
    last_good = checkpoints(ckpt_root)[-1] if resume else None
    # Learning curves on the main process only: the others wait for it at the next gradient all-reduce.
    validation = (Validation(recipe, models, backend.template(recipe), spec.eval_queries)
                  if spec.eval_every and main else None)

    info = {"stage": stage, "initialised_from": start_from, "llm_id": models.llm_id,
            "llm_config_hash": models.llm_config_hash}
    best_kl = _best_val_kl(out / "metrics.jsonl") if spec.keep_best and main else None

    def validate(at: int) -> dict:
        nonlocal best_kl
        vectors = distil(models, validation.contexts, recipe.distiller.max_length, spec.batch_size, validation.anchors)
        scores = {"step": at, **validation.score(vectors)}
        if spec.keep_best and (best_kl is None or scores["val_kl"] < best_kl):
            best_kl = scores["val_kl"]
            write_distiller(out / BEST, accelerator.unwrap_model(distiller), recipe, {**info, "steps": at, **scores})
        return scores

    if validation and step == 0:  # the untrained distiller: where the curve starts
        first = validate(0)
        log.write(json.dumps(first) + "\n")
        if trackers:
            accelerator.log(first, step=0)
    t0 = time.perf_counter()
    def checkpoint(at: int) -> Path:
        if cached:
            cached.cache.flush()
        return save_checkpoint(accelerator, ckpt_root, at, {"step": at, "position": at * per_step}, spec.keep_last)

    rng = _rng_state()
    try:
        with progress:
            while step < spec.steps:
                tic = time.perf_counter()
                sums = _optimizer_step(models, distiller, optimizer, scheduler, examples, accelerator, recipe, spec,
                                       kl, ce_weight, kl_weight, step, per_step, last_good, stage, cached)
                step += 1
                rng = _rng_state()
                # Logged values are averaged over processes (tokens summed), not rank 0's alone.
                loss_m, kl_m, ce_m, teacher_ce_m, tokens = (accelerator.reduce(sums, "sum") / torch.tensor(
                    [accelerator.num_processes * spec.grad_accum] * 4 + [1], dtype=torch.float64,
                    device=accelerator.device)).tolist()
                record = {"step": step, "loss": loss_m, "kl": kl_m, "ce": ce_m, "teacher_ce": teacher_ce_m,
                          "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / (time.perf_counter() - tic),
                          "elapsed_s": time.perf_counter() - t0}
                if validation and (step % spec.eval_every == 0 or step == spec.steps):
                    record |= validate(step)
                if main:
                    _report(record, log, progress, bar, console, spec.steps, stage, show_ce=stage == "finetune")
                if trackers:
                    accelerator.log(record, step=step)
                if step % spec.save_every == 0 or step == spec.steps:
                    last_good = checkpoint(step)
    except KeyboardInterrupt:
        # Keep the finished steps: checkpoint the last completed one, with the RNG as it was then, so
        # that --resume continues exactly as if nothing had happened. A multi-process run cannot
        # rely on every process being interrupted at once, so it keeps its last regular checkpoint.
        if accelerator.num_processes == 1 and step > 0 and (last_good is None or read_state(last_good)["step"] != step):
            _set_rng_state(rng)
            saved = checkpoint(step)
            console.print(f"[yellow]interrupted[/]: step {step} saved to {saved}")
        raise
    if log:
        log.close()
        plot(out / "metrics.jsonl", out / "curves.png", stage)
    if cached:
        cached.cache.flush()
    accelerator.wait_for_everyone()
    _check_frozen(models, llm_before)
    path = out / "distiller.safetensors"
    if main:
        path = save_distiller(out, accelerator.unwrap_model(distiller), recipe, {**info, "steps": step})
        console.print(f"[green]{stage} done[/]: {path}")
    if trackers:
        accelerator.end_training()
    return path


def _optimizer_step(models, distiller, optimizer, scheduler, examples, accelerator, recipe, spec, kl, ce_weight,
                    kl_weight, step, per_step, last_good, stage, cached=None) -> torch.Tensor:
    """One optimiser step over grad_accum micro-batches; returns [loss, kl, ce, teacher_ce, tokens] summed."""
    sums = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    for micro in range(spec.grad_accum):
        base = step * per_step + (micro * accelerator.num_processes + accelerator.process_index) * spec.batch_size
        positions = list(range(base, base + spec.batch_size))
        batch = [examples.get(p) for p in positions]
        sync = micro == spec.grad_accum - 1
        with accelerator.autocast(), (accelerator.no_sync(distiller) if not sync else nullcontext()):
            stats = step_loss(models, distiller, batch, recipe, kl, ce_weight, kl_weight, accelerator.device,
                              cached, positions)
            if not torch.isfinite(stats.loss):
                where = f"; the last good checkpoint is {last_good}" if last_good else "; no checkpoint was written yet"
                raise TrainingDiverged(f"{stage}: the loss became {stats.loss.item()} at step {step + 1}{where}. "
                                       "Lower the learning rate or use mixed_precision: no.")
            accelerator.backward(stats.loss / spec.grad_accum)
        sums += torch.tensor([stats.loss.item(), stats.kl, stats.ce, stats.teacher_ce, stats.tokens], dtype=torch.float64,
                             device=accelerator.device)
    if spec.max_grad_norm:
        accelerator.clip_grad_norm_(distiller.parameters(), spec.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


def _best_val_kl(metrics_path: Path) -> float | None:
    """The lowest validation KL logged so far (a resumed run keeps the best of the steps it continues)."""
    if not metrics_path.is_file():
        return None
    kls = [json.loads(line).get("val_kl") for line in metrics_path.read_text().splitlines() if line.strip()]
    return min((k for k in kls if k is not None), default=None)


def _report(record: dict, log, progress: Progress, bar, console: Console, total: int, stage: str, show_ce: bool) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()
    text = (f"loss {record['loss']:.4f}  kl {record['kl']:.4f}"
            + (f"  ce {record['ce']:.4f} (icl {record['teacher_ce']:.4f})" if show_ce else "")
            + f"  {record['tokens_per_s']:.0f} tok/s")
    progress.update(bar, completed=record["step"], stats=text)
    if "val_mend_f1" in record:
        console.print(f"{stage} step {record['step']} validation: mend macro-F1 {100 * record['val_mend_f1']:.1f} "
                      f"(icl {100 * record['val_icl_f1']:.1f}, zero-shot {100 * record['val_zero_shot_f1']:.1f}), "
                      f"agreement {100 * record['val_agreement']:.1f}%, KL {record['val_kl']:.4f}")
    # Without a terminal the bar is invisible: a plain line every 5% keeps logs informative.
    if not console.is_terminal and (record["step"] % max(1, total // 20) == 0 or record["step"] == total):
        console.print(f"{stage} step {record['step']}/{total}  {text}")


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
