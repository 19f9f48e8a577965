"""`loramill` command line. Each subcommand imports its heavy dependencies inside its body,
so `loramill --help` and `loramill merge` start fast."""

from __future__ import annotations

import sys

import click

from adapters.errors import InputError
from jobs.errors import JobsError


class _Group(click.Group):
    """Turns user-fixable errors into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (InputError, JobsError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except FileNotFoundError as exc:
            click.echo(f"error: no such file or directory: {exc.filename or exc}", err=True)
            sys.exit(2)


def _die_with_parent(_ctx: click.Context, _param: click.Parameter, parent_pid: int | None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux `PR_SET_PDEATHSIG`); exit if it already has.

    What `loramill serve` starts (its worker, its engines) must not outlive it.
    """
    if parent_pid is None:
        return
    import ctypes
    import os
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        sys.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="loramill")
@click.option("--parent-pid", type=int, default=None, expose_value=False, callback=_die_with_parent, hidden=True,
              help="Exit when this process (the parent) dies.")
def main() -> None:
    """LoRA adapter fine-tuning, merging and multi-adapter serving."""


def _register() -> None:
    from loramill.cli import base, engine_cmd, inspect_cmd, jobs_cmd, merge_cmd, service_cmds, train_cmd

    for module in (base, inspect_cmd, train_cmd, merge_cmd, service_cmds, jobs_cmd, engine_cmd):
        module.register(main)


_register()
