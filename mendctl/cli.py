"""The `mendctl` command line: every command takes a recipe and dotted key=value overrides."""
from __future__ import annotations

import errno
import os
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .core.config import TRAINING_SECTIONS, Recipe, RecipeError, load_recipe
from .data.metaicl import DEFAULT_K, DEFAULT_SEEDS

# emoji off: `random-init:llama:` is a model name, not an emoji code. User text (paths, names, labels,
# messages that quote them) goes through escape(): `[/b]` in a label is text, not markup.
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)


class UserError(click.ClickException):
    """A problem the user can fix in their input: one message, no traceback, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        err_console.print(f"[red]error:[/] {escape(self.message)}", highlight=False, soft_wrap=True)


# What a Ctrl-C leaves, per command: the advice must be one the command takes.
_INTERRUPTED = {
    "pretrain": "the last finished step is checkpointed; continue with --resume",
    "finetune": "the last finished step is checkpointed; continue with --resume",
    "distill": "the vectors files written so far are kept; run distill again to make the rest",
    "eval": "no results were written; run eval again (baseline scores already cached are kept)",
    "teacher": "the teacher rows written so far are kept in the cache; run it again to fill the rest",
}


def _interrupted(name: str | None = None) -> None:
    ctx = click.get_current_context(silent=True)
    name = name or (ctx.info_name if ctx is not None else None)
    advice = _INTERRUPTED.get(name, "nothing was finished; run the command again")
    err_console.print(f"[yellow]interrupted[/]: {advice}", highlight=False, soft_wrap=True)
    sys.exit(130)


class _Commands(click.Group):
    """The command group, with the exit code rule at the very top: Ctrl-C at any point (loading a module,
    reading the recipe, click's own prompt) exits 130 with one line, never a traceback or `Aborted!`."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        args = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except (KeyboardInterrupt, click.Abort, EOFError):
            _interrupted(next((a for a in args if a in self.commands), None))
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


# Errors of the user's own files (the path is in the message): a missing, unwritable or full place.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG, errno.ELOOP}


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug"))


def _fail(message: str, code: int, hint: str = "") -> None:
    if _debug():
        traceback.print_exc()
    # escaped: a message may hold brackets (a pip extra, a list) that rich would read as markup and drop
    err_console.print(f"[red]error:[/] {escape(message)}{escape(hint)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _recipe(path: str, overrides: tuple[str, ...], unused: tuple[str, ...] = ()) -> Recipe:
    try:
        recipe = load_recipe(path, overrides, unused)
        _check_positions(recipe, path)
        return recipe
    except RecipeError as e:
        err_console.print(f"[red]invalid recipe[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:
        _fail(f"{e.filename or path}: {e.strerror or e}", 2)


def _check_positions(recipe: Recipe, path: str) -> None:
    from .core.positions import recipe_problems

    problems = recipe_problems(recipe)
    if problems:
        raise RecipeError(path, [(path, key, msg) for key, msg in problems])


def _run(fn, *args, lock: Path | None = None, **kwargs):
    """Runs a command under the lock of its output folder, with the exit code rule of the README.

    2: the user can fix it in their input (recipe, overrides, data files, partitions, paths,
    checkpoints they point to); 1: the run failed on its own; 130: interrupted. `--debug` adds the
    traceback; without it, nothing but the message is shown.
    """
    from .commands.train import TrainingDiverged
    from .core.fileio import disk_full, says_disk_full
    from .core.lock import command_line, output_lock
    from .core.vectors import VectorsMismatch
    from .data.bigbench import FetchError
    from .data.metaicl import DataError
    from .models.model_sources import ModelSourceError

    try:
        if lock is None:
            return fn(*args, **kwargs)
        with output_lock(lock, command_line()):
            return fn(*args, **kwargs)
    except KeyboardInterrupt:
        _interrupted()
    except (TrainingDiverged, FetchError) as e:
        _fail(str(e), 1)
    except (DataError, VectorsMismatch, FileNotFoundError, FileExistsError, ValueError, ModelSourceError) as e:
        _fail(str(e), 2)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # the folder it was writing into, and what is free there
            _fail(str(disk_full(Path(e.filename).parent if e.filename else lock or Path.cwd())), 2)
        if e.errno in _USER_ERRNOS:
            _fail(f"{e.filename or 'a file'}: {e.strerror}", 2)
        _fail(f"{type(e).__name__}: {e}", 1, hint="" if _debug() else " (rerun with --debug for the traceback)")
    except Exception as e:  # a bug or a failure of the run itself, not of the user's input
        if says_disk_full(e):  # a library's own words for a full disk (safetensors, torch's zip writer)
            _fail(f"{disk_full(lock or Path.cwd())} ({type(e).__name__}: {str(e)[:200]})", 2)
        if _debug():
            raise
        _fail(f"the run failed: {type(e).__name__}: {e}", 1, hint=" (rerun with --debug for the traceback)")


def _run_command(recipe: Recipe, command: str, fn, *args, stage: str | None = None, lock: Path | None = None,
                 **kwargs):
    """`_run` for a command that reads a recipe's inputs: prepare makes them first, once, under the
    same lock and with the same exit codes as the command's own body."""
    from .data.prepare import prepare

    def prepared():
        prepare(recipe, command, stage, console=console)
        return fn(*args, **kwargs)

    return _run(prepared, lock=lock)


recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False))
overrides_arg = click.argument("overrides", nargs=-1)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mendctl")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
def cli(debug: bool) -> None:
    """MEND: distill few-shot demonstrations into K vectors a frozen LLM reads instead.

    Every command takes a recipe (YAML) and optional key=value overrides, e.g.
    `mendctl finetune recipes/tiny/gpt2.yaml finetune.steps=10 output_dir=/tmp/x`.
    """


def _stage_command(stage: str, doc: str):
    @cli.command(stage, help=doc)
    @recipe_arg
    @overrides_arg
    @click.option("--resume", is_flag=True, help="Continue the interrupted run from its last checkpoint.")
    @click.option("--restart", is_flag=True, help="Start over, deleting the checkpoints of an earlier run.")
    def command(recipe: str, overrides: tuple[str, ...], resume: bool, restart: bool) -> None:
        from .commands.train import train

        if resume and restart:
            raise UserError("--resume and --restart exclude each other")
        r = _recipe(recipe, overrides)
        _run_command(r, stage, train, r, stage, resume=resume, restart=restart, console=console, lock=r.output_dir)

    return command


_stage_command("pretrain", "Stage 1: meta-distillation pretraining on plain text (KL only).")
_stage_command("finetune", "Stage 2: meta-distillation finetuning on meta-train tasks (CE + kl_weight x KL).")


@cli.command()
@recipe_arg
@click.argument("stage", type=click.Choice(["pretrain", "finetune"]))
@overrides_arg
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes the training will be launched with (they read more positions per step).")
def teacher(recipe: str, stage: str, overrides: tuple[str, ...], processes: int) -> None:
    """Fill the teacher cache for every example position the stage's training reads (see teacher_cache)."""
    from .commands.teacher import fill_teacher

    r = _recipe(recipe, overrides)
    done = _run_command(r, "teacher", fill_teacher, r, stage, processes=processes, console=console, stage=stage)
    console.print(f"[green]teacher cache[/]: {done['positions']} positions, {done['computed']} computed, "
                  f"in {escape(str(done['folder']))}")


@cli.command()
@recipe_arg
@click.argument("checkpoint", type=click.Path(exists=True))
@click.argument("dest", type=click.Path(dir_okay=False))
@overrides_arg
@click.option("--force", is_flag=True, help="Overwrite DEST if it exists.")
def export(recipe: str, checkpoint: str, dest: str, overrides: tuple[str, ...], force: bool) -> None:
    """Write a training checkpoint (a step_N folder) as a distiller file, e.g. the step the curves chose."""
    from .commands.export import export_checkpoint

    if os.path.lexists(dest) and not force:
        raise UserError(f"{dest} exists: pass --force to overwrite it")
    r = _recipe(recipe, overrides)
    path = _run_command(r, "export", export_checkpoint, r, Path(checkpoint), Path(dest))
    console.print(f"[green]distiller[/]: {escape(str(path))} (load it with distill.checkpoint={escape(str(path))})")


@cli.command()
@recipe_arg
@overrides_arg
@click.option("--force", is_flag=True, help="Rewrite vectors files that are already up to date (with --out: overwrite it).")
@click.option("--demos", type=click.Path(dir_okay=False, path_type=Path),
              help="Your own demonstrations (JSONL rows: input, output, optional options) instead of the test tasks'.")
@click.option("--out", type=click.Path(path_type=Path), help="With --demos: the vectors file to write.")
@click.option("--name", help="With --demos: the task name the file records (default: the demos file's stem).")
@click.option("--untrained", is_flag=True,
              help="With --demos: distil with the untrained distiller when none is trained (for trying commands out).")
def distill(recipe: str, overrides: tuple[str, ...], force: bool, demos: Path | None, out: Path | None,
            name: str | None, untrained: bool) -> None:
    """Distil each test task's demonstrations into output_dir/vectors/{task}/{seed}.safetensors (and each
    of distill.variants into its own output_dir/vectors-... folder), or with --demos FILE.jsonl --out
    FILE.safetensors your own (no partition or task data needed)."""
    if demos is None:
        if out is not None or name is not None or untrained:
            raise UserError("--out, --name and --untrained go with --demos")
        from .commands.distill import run_distill

        r = _recipe(recipe, overrides)
        _run_command(r, "distill", run_distill, r, force=force, console=console, lock=r.output_dir)
        return
    from .commands.distill_demos import distill_demos

    if out is None:
        raise UserError("--demos needs --out FILE.safetensors")
    r = _recipe(recipe, overrides, TRAINING_SECTIONS)
    _run(distill_demos, r, demos, out, name=name, untrained=untrained, force=force, console=console)


@cli.command()
@recipe_arg
@overrides_arg
@click.option("--queries", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="JSONL rows with input, and options to score (else text is generated); other fields are kept.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The JSONL of answers to write.")
@click.option("--method", type=click.Choice(["mend", "icl", "zero-shot"]), default="mend", show_default=True,
              help="What the LLM reads before each query: the vectors, the demonstrations, or nothing.")
@click.option("--vectors", type=click.Path(dir_okay=False, path_type=Path), help="With --method mend: the vectors file.")
@click.option("--demos", type=click.Path(dir_okay=False, path_type=Path), help="With --method icl: demonstrations (JSONL).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Queries run together.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Longest generated answer, in tokens (greedy).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def predict(recipe: str, overrides: tuple[str, ...], queries: Path, out: Path, method: str, vectors: Path | None,
            demos: Path | None, batch_size: int, max_new_tokens: int, force: bool) -> None:
    """Answer your own queries (JSONL) after distilled vectors, demonstrations or nothing: the chosen
    option and each option's probability, or generated text."""
    from .commands.predict import run_predict

    r = _recipe(recipe, overrides, TRAINING_SECTIONS)
    _run(run_predict, r, queries, out, method=method, vectors=vectors, demos=demos, batch_size=batch_size,
         max_new_tokens=max_new_tokens, force=force, console=console)


@cli.command("eval")
@recipe_arg
@overrides_arg
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most N queries per task and seed (for quick checks; results are then partial).")
def eval_(recipe: str, overrides: tuple[str, ...], limit: int | None) -> None:
    """Compare zero-shot, ICL and the vectors rows (mend, mend+fit@N, fitted@N) on the test tasks: quality,
    FLOPs, latency, memory."""
    from .commands.eval import run_eval

    r = _recipe(recipe, overrides)
    _run_command(r, "eval", run_eval, r, limit=limit, console=console, lock=r.output_dir)


def _need_extra(extra: str, *modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"this command needs {', '.join(missing)}: pip install 'mendctl[{extra}]'")


def _free_port(host: str, port: int) -> None:
    """Refuses a port another process holds (or that needs privileges) before any model loads."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


@cli.command()
@recipe_arg
@overrides_arg
@click.option("--vectors", "folder", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder of models: NAME.safetensors (vectors, model NAME) and NAME.jsonl (demonstrations, "
                   "models NAME:icl and NAME:icl-cached).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback: this machine only).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Concurrent requests answered by one model call, at most.")
@click.option("--max-wait-ms", type=click.FloatRange(min=0, max=10_000), default=10.0, show_default=True,
              help="How long a request waits for others to batch with when none is waiting.")
def serve(recipe: str, overrides: tuple[str, ...], folder: Path, host: str, port: int, max_batch: int,
          max_wait_ms: float) -> None:
    """Serve vectors over HTTP: OpenAI-compatible POST /v1/completions, GET /v1/models, GET /health."""
    _need_extra("serve", "fastapi", "uvicorn")
    r = _recipe(recipe, overrides, TRAINING_SECTIONS)
    _free_port(host, port)
    from .commands.serve import run_serve

    _run(run_serve, r, folder, host, port, max_batch, max_wait_ms, console)


@cli.command("lm-eval", context_settings={"ignore_unknown_options": True})
@recipe_arg
@click.option("--vectors", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The vectors file the LLM reads in place of the few-shot context.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval(recipe: str, vectors: Path, args: tuple[str, ...]) -> None:
    """Score lm-eval tasks with vectors: `mendctl lm-eval RECIPE [key=value ...] --vectors F --tasks T ...`.

    The arguments after the overrides are lm-eval's own (`lm-eval run --help`): --tasks, --include_path,
    --limit, --output_path, ...; the model is `mend`, reading RECIPE's LLM and the vectors.
    """
    _need_extra("lm-eval", "lm_eval")
    split = next((i for i, a in enumerate(args) if a.startswith("-") or "=" not in a), len(args))
    overrides, rest = args[:split], list(args[split:])
    _recipe(recipe, overrides, TRAINING_SECTIONS)
    from .commands.lm_eval import run_lm_eval

    _run(run_lm_eval, Path(recipe), overrides, vectors, rest)


@cli.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
def validate(recipes: tuple[str, ...]) -> None:
    """Check recipes (schema, paths, backend names) without loading any model."""
    failed = 0
    for path in recipes:
        try:
            _check_positions(load_recipe(path), path)
            console.print(f"[green]ok[/] {escape(path)}")
        except RecipeError as e:
            failed += 1
            err_console.print(f"[red]invalid recipe[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    if failed:
        sys.exit(2)


@cli.command("ls")
@click.argument("what", type=click.Choice(["all", "recipes", "backends", "partitions"]), default="all")
def ls(what: str) -> None:
    """List shipped recipes, registered backends and partitions."""
    if what in ("all", "recipes"):
        from .core.shipped import recipes_dir, shipped_recipes

        table = Table("recipe", "first line", title=f"recipes (in {recipes_dir()}; mendctl cp RECIPE DEST)")
        for name, path in shipped_recipes().items():
            first = path.read_text().splitlines()[0].lstrip("# ") if path.stat().st_size else ""
            table.add_row(escape(name), escape(first))
        console.print(table)
    if what in ("all", "backends"):
        from .core.registry import aliases, registered

        others = aliases()
        table = Table("backend", "aliases", "class", title="backends (entry points: mendctl.backends)")
        for name, value in registered().items():
            table.add_row(name, ", ".join(a for a, target in sorted(others.items()) if target == name), value)
        console.print(table)
    if what in ("all", "partitions"):
        from .core.partitions import list_partitions, load_partition

        table = Table("partition", "train tasks", "test tasks", title="partitions")
        for name in list_partitions():
            p = load_partition(name)
            table.add_row(escape(name), str(len(p.train)), str(len(p.test)))
        console.print(table)


@cli.command()
@click.argument("recipe")
@click.argument("dest", type=click.Path())
@click.option("--force", is_flag=True, help="Overwrite DEST if it exists.")
def cp(recipe: str, dest: str, force: bool) -> None:
    """Copy a shipped recipe (`llama/smollm2-demo`, or `smollm2-demo`) to DEST, a file or folder, to start from."""
    from .core.fileio import write_bytes
    from .core.shipped import find_recipe

    try:
        source = find_recipe(recipe)
    except ValueError as e:
        raise UserError(str(e)) from None
    target = Path(dest) / source.name if Path(dest).is_dir() else Path(dest)
    if os.path.lexists(target) and not force:
        raise UserError(f"{target} exists: pass --force to overwrite it")
    try:
        write_bytes(target, source.read_bytes())  # a new file renamed into place: a link at DEST is refused
    except ValueError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"{e.filename or target}: {e.strerror or e}") from None
    console.print(f"[green]copied[/] {escape(str(source))} to {escape(str(target))}")


@cli.group()
def data() -> None:
    """Prepare task data."""


@data.command("bigbench")
@click.argument("paths", nargs=-1, required=True, metavar="[SRC] OUT")
@click.option("--tasks", help="Comma-separated task names (default: all).")
@click.option("--fetch", is_flag=True, help="Download the bigbench==1.0.0 sdist with pip into the cache and use it as SRC.")
@click.option("--k", default=DEFAULT_K, show_default=True, help="Demonstrations per train/dev split.")
@click.option("--per-example-options", is_flag=True,
              help="Keep examples whose options differ from their task's first, each with its own options.")
def data_bigbench(paths: tuple[str, ...], tasks: str | None, fetch: bool, k: int, per_example_options: bool) -> None:
    """Convert BIG-bench task files (a folder, or the sdist tarball) into the MetaICL layout in OUT.

    `mendctl data bigbench SRC OUT`, or `mendctl data bigbench --fetch OUT`.
    """
    from .data.bigbench import convert_bigbench, fetch_bigbench
    from .models.model_sources import cache_dir

    if len(paths) != (1 if fetch else 2):
        raise UserError("give SRC and OUT, or --fetch and OUT")
    if not fetch and not Path(paths[0]).exists():
        raise UserError(f"SRC does not exist: {paths[0]}")
    source = _run(fetch_bigbench, cache_dir() / "bigbench") if fetch else Path(paths[0])
    report = _run(convert_bigbench, source, Path(paths[-1]), tasks=tasks.split(",") if tasks else None, k=k,
                  progress=True, per_example_options=per_example_options, lock=Path(paths[-1]))
    console.print(report.summary(), markup=False)


@data.command("metaicl")
@click.argument("data_dir", metavar="DIR")
@click.option("--partition", help="One partition, shipped name or JSON file (default: the seven of MetaICL).")
@click.option("--k", default=DEFAULT_K, show_default=True, help="Demonstrations per set in the file names.")
@click.option("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), show_default=True,
              help="Comma-separated seeds of the demonstration sets.")
def data_metaicl(data_dir: str, partition: str | None, k: int, seeds: str) -> None:
    """Check a folder made by MetaICL's preprocessing scripts against one partition, or all seven.

    Names the tasks, seeds and splits that are missing; exit code 2 when anything is.
    """
    from .data.metaicl_check import check_partition
    from .core.partitions import METAICL_PARTITIONS, load_partition

    if not Path(data_dir).is_dir():
        raise UserError(f"{data_dir}: not a folder (MetaICL's scripts write data/ in their checkout)")
    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise UserError(f"--seeds {seeds!r}: not a comma-separated list of integers") from None
    try:
        partitions = [load_partition(p) for p in ([partition] if partition else METAICL_PARTITIONS)]
    except ValueError as e:
        raise UserError(str(e)) from None
    checks = [check_partition(Path(data_dir), p, k=k, seeds=seed_list) for p in partitions]
    for check in checks:
        console.print("\n".join(check.lines()), highlight=False, soft_wrap=True, markup=False)
    if len(checks) > 1:
        console.print(f"{sum(c.complete for c in checks)} of {len(checks)} partitions complete")
    if not all(c.complete for c in checks):
        sys.exit(2)


def main() -> None:
    try:
        cli(prog_name="mendctl")
    except KeyboardInterrupt:  # between click's handlers: as late as the last line
        sys.exit(130)
