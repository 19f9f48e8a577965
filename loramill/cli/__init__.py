"""`loramill` command line. Each subcommand imports its heavy dependencies inside its body,
so `loramill --help` and `loramill merge` start fast."""

from __future__ import annotations

import sys

import click

from adapters.errors import InputError


class _Group(click.Group):
    """Turns user-fixable errors into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except FileNotFoundError as exc:
            click.echo(f"error: no such file or directory: {exc.filename or exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="loramill")
def main() -> None:
    """LoRA adapter fine-tuning, merging and multi-adapter serving."""


def _register() -> None:
    from loramill.cli import base, engine_cmd, inspect_cmd, merge_cmd, service_cmds, train_cmd

    for module in (base, inspect_cmd, train_cmd, merge_cmd, service_cmds, engine_cmd):
        module.register(main)


_register()
