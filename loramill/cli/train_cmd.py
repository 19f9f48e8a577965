"""`loramill train`: LoRA on a local base checkpoint, progress on the terminal."""

from __future__ import annotations

import sys

import click

from adapters.ranks import MAX_DEVICES


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
def train(**options) -> None:
    """Train a LoRA adapter on frozen base weights; writes a PEFT adapter to --out."""
    from adapters.training import TrainingConfig, train as run_training
    from loramill.settings import get_settings

    options["targets"] = _targets(options["targets"])
    options["use_rslora"] = options.pop("rslora")
    cfg = TrainingConfig(**options, cache_dir=str(get_settings().resolved_dataset_cache_dir))
    reporter = _TerminalProgress() if sys.stderr.isatty() else _LineProgress()
    try:
        result = run_training(cfg, progress=reporter)
    finally:
        reporter.close()
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    click.echo(f"trained {result.steps} steps on {result.trained_tokens} tokens, final loss {result.final_loss:.4f}{val}; adapter at {result.adapter_dir}")


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
