"""`loramill train`: LoRA on a local base checkpoint, progress on the terminal.

Ctrl-C (SIGINT) stops at the end of the micro-batch running, saves a checkpoint of the last
finished step, prints the command that resumes from it and exits 130 (128 + SIGINT, as a shell
reports a process that SIGINT ended); a second Ctrl-C ends the process at once.
"""

from __future__ import annotations

import shlex
import shutil
import signal
import sys
from pathlib import Path

import click

from adapters.errors import InputError
from adapters.fsutil import new_directories_removed_on_error
from adapters.ranks import MAX_DEVICES, SHARDINGS

INTERRUPTED_EXIT = 128 + signal.SIGINT


def register(main: click.Group) -> None:
    main.add_command(train)


def _targets(value: str) -> str | tuple[str, ...]:
    if value == "all-linear":
        return value
    names = tuple(t.strip() for t in value.split(",") if t.strip())
    return names or value


@click.command()
@click.option("--base", required=True, help="Base model directory (or hub id).")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Training JSONL.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Adapter output directory.")
@click.option("--validation", type=click.Path(dir_okay=False), help="Validation JSONL.")
@click.option("--rank", type=int, default=8, show_default=True)
@click.option("--alpha", type=float, default=16.0, show_default=True)
@click.option("--dropout", type=float, default=0.0, show_default=True)
@click.option("--targets", default="all-linear", show_default=True, help="'all-linear' or comma-separated module names.")
@click.option("--rslora/--no-rslora", default=False, show_default=True, help="Scale by alpha/sqrt(r).")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--max-steps", type=int, default=None)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup-ratio", type=float, default=0.03, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--max-seq-len", type=int, default=512, show_default=True)
@click.option("--overlong", type=click.Choice(["truncate", "refuse"]), default="truncate", show_default=True)
@click.option("--packing/--no-packing", default=False, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-every", type=int, default=0, show_default=True, help="Checkpoint every N steps (0: never).")
@click.option("--eval-every", type=int, default=0, show_default=True, help="Validate every N steps (0: each epoch).")
@click.option("--resume-from", type=click.Path(file_okay=False), help="A checkpoint directory to resume from.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False, show_default=True)
@click.option("--devices", type=click.IntRange(1, MAX_DEVICES), default=1, show_default=True,
              help="Train on N processes together (one GPU each; gloo processes on a CPU), through accelerate.")
@click.option("--sharding", type=click.Choice(SHARDINGS), default="auto", show_default=True,
              help="How --devices N > 1 hold the base: ddp (a copy each), fsdp (1/N each, for a base that does not fit "
                   "one GPU), auto (fsdp when the base's weights exceed half of a GPU's memory).")
@click.option("--overwrite", is_flag=True,
              help="Replace a non-empty --out (its old contents are deleted once the data and base have loaded).")
def train(overwrite: bool, **options) -> None:
    """Train a LoRA adapter on frozen base weights; writes a PEFT adapter to --out.

    Ctrl-C saves a checkpoint and prints how to resume it with --resume-from.
    """
    from adapters.training import TrainingConfig, train as run_training
    from loramill.settings import get_settings

    out = Path(options["out"])
    _check_out(out, options["base"], overwrite=overwrite, resuming=options["resume_from"] is not None)
    options["targets"] = _targets(options["targets"])
    options["use_rslora"] = options.pop("rslora")
    settings = get_settings()
    cfg = TrainingConfig(**options, keep_checkpoints=settings.keep_checkpoints,
                         cache_dir=str(settings.resolved_dataset_cache_dir))
    reporter = _TerminalProgress() if sys.stderr.isatty() else _LineProgress()
    interrupt = _Interrupt()

    def clear_old(_cfg) -> None:  # only once the data and base loaded: a run that cannot start deletes nothing
        if overwrite and out.is_dir() and options["resume_from"] is None:
            shutil.rmtree(out)

    try:
        with interrupt, new_directories_removed_on_error(settings.resolved_dataset_cache_dir):
            result = run_training(cfg, progress=reporter, should_stop=interrupt.is_set, on_start=clear_old,
                                  checkpoint_on_stop=True)
    except KeyboardInterrupt:  # the second Ctrl-C
        reporter.close()
        click.echo("interrupted again: stopped without saving", err=True)
        sys.exit(INTERRUPTED_EXIT)
    finally:
        reporter.close()
    if result.stopped:
        _say_how_to_resume(result)
        sys.exit(INTERRUPTED_EXIT)
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    click.echo(f"trained {result.steps} steps on {result.trained_tokens} tokens, final loss {result.final_loss:.4f}{val}; adapter at {result.adapter_dir}")


def _check_out(out: Path, base: str, *, overwrite: bool, resuming: bool) -> None:
    """Refuse an --out that would destroy something: a non-empty directory (unless --overwrite, or resuming into it),
    or a place inside the base model's directory."""
    base_dir = Path(base)
    if base_dir.is_dir():
        resolved, base_resolved = out.resolve(), base_dir.resolve()
        if resolved == base_resolved or base_resolved in resolved.parents:
            raise InputError(f"--out {out} is inside the base model directory {base}; choose a directory outside it",
                             param="out")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory", param="out")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resuming):
        raise InputError(f"--out {out} exists and is not empty (pass --overwrite to replace it, or "
                         "--resume-from one of its checkpoints to continue)", param="out")


class _Interrupt:
    """Ctrl-C asks the training loop to stop (it polls `is_set` between micro-batches); a second one ends the process."""

    def __init__(self):
        self.set = False

    def is_set(self) -> bool:
        return self.set

    def _handle(self, _signum, _frame) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        click.echo("\ninterrupted: saving a checkpoint of the last finished step (Ctrl-C again to quit now)", err=True)

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *_exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


def _say_how_to_resume(result) -> None:
    if not result.checkpoints:
        click.echo(f"stopped before the first step finished; nothing to resume (metrics in {result.metrics_path})",
                   err=True)
        return
    checkpoint = result.checkpoints[-1]
    argv = sys.argv[1:]
    if "--resume-from" in argv:  # resuming a resumed run: replace the old checkpoint
        i = argv.index("--resume-from")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--resume-from=")]
    command = shlex.join(["loramill", *argv, "--resume-from", str(checkpoint)])
    click.echo(f"stopped at step {result.steps}; checkpoint saved in {checkpoint}\nresume with:\n  {command}", err=True)


class _LineProgress:
    """One plain line every few steps, for logs and pipes."""

    def __init__(self, every_s: float = 2.0):
        self.every_s, self.last = every_s, 0.0

    def __call__(self, p) -> None:
        import time

        now = time.monotonic()
        if now - self.last >= self.every_s or p.step == p.total_steps:
            self.last = now
            click.echo(f"step {p.step}/{p.total_steps} epoch {p.epoch:.2f} loss {p.loss:.4f} lr {p.lr:.2e} "
                       f"{p.tokens_per_s:.0f} tok/s eta {p.eta_s:.0f}s", err=True)

    def close(self) -> None:
        pass


class _TerminalProgress:
    def __init__(self):
        from tqdm import tqdm

        self.bar = tqdm(unit="step", dynamic_ncols=True)

    def __call__(self, p) -> None:
        self.bar.total = p.total_steps
        self.bar.n = p.step
        self.bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.lr:.1e}", tok_s=f"{p.tokens_per_s:.0f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
