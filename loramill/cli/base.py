"""`loramill base create`."""

from __future__ import annotations

import click

from adapters.basemodel import ARCHS, DTYPES, BaseModelSpec, create_base_model


def register(main: click.Group) -> None:
    main.add_command(base)


@click.group()
def base() -> None:
    """Make small base models for tests and demos."""


@base.command("create")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--arch", type=click.Choice(ARCHS), default="llama", show_default=True)
@click.option("--tie-embeddings/--no-tie-embeddings", default=False, show_default=True)
@click.option("--layers", type=int, default=2, show_default=True)
@click.option("--hidden", type=int, default=128, show_default=True)
@click.option("--heads", type=int, default=4, show_default=True)
@click.option("--kv-heads", type=int, default=2, show_default=True, help="llama only")
@click.option("--intermediate", type=int, default=352, show_default=True)
@click.option("--vocab", type=int, default=320, show_default=True)
@click.option("--max-positions", type=int, default=512, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty OUT (only once the new model is complete).")
def create(out: str, arch: str, tie_embeddings: bool, overwrite: bool, **shape) -> None:
    """Write a random-initialised causal LM with a byte-level tokenizer to OUT."""
    spec = BaseModelSpec(arch=arch, tie_embeddings=tie_embeddings, **shape)
    path = create_base_model(out, spec, overwrite=overwrite)
    click.echo(f"created {arch} base model ({'tied' if tie_embeddings else 'untied'} head) at {path}")
