"""`loramill inspect PATH [--json]`: tensors, groups, counts, tied head and shape problems.

Exit status: 0 clean, 1 when shape problems were found (printed), 2 on unusable input.
"""

from __future__ import annotations

import json
import sys

import click


def register(main: click.Group) -> None:
    main.add_command(inspect)


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(path: str, as_json: bool) -> None:
    """Inspect the checkpoint at PATH (directory or hub id) from its safetensors headers only."""
    from adapters.inspection import inspect_checkpoint

    report = inspect_checkpoint(path)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(render(report))
    if report.problems:
        sys.exit(1)


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")


def render(report) -> str:
    """The report as a readable table: one block per group, then totals, head and problems."""
    from adapters.inspection import GROUPS

    d = report.dims
    dims = ", ".join(f"{k} {v}" for k, v in (("hidden", d.hidden), ("heads", d.heads), ("kv_heads", d.kv_heads),
                                             ("head_dim", d.head_dim), ("intermediate", d.intermediate),
                                             ("vocab", d.vocab), ("layers", d.layers)) if v is not None)
    arch = report.architectures[0] if report.architectures else "unknown architecture"
    lines = [
        f"{report.path}",
        f"  {report.model_type or 'unknown model_type'} ({arch}), {len(report.files)} safetensors file(s), "
        f"{_size(report.total_bytes)}",
        f"  config: {dims or 'no recognised dimensions'}",
        f"  shape rules: {report.convention or 'none for this architecture (tensors listed and counted only)'}",
    ]
    width = max((len(t.name) for t in report.tensors), default=10)
    for group in GROUPS:
        members = [t for t in report.tensors if t.group == group]
        if not members:
            continue
        total = report.groups[group]
        lines += ["", f"{group}  ({total.tensors} tensor{'s' if total.tensors != 1 else ''}, {total.parameters:,} parameters)"]
        for t in members:
            note = "" if t.counted else ("  (buffer, not a parameter)" if group == "buffer" else "  (tied: counted in embedding)")
            lines.append(f"  {t.name:<{width}}  {str(list(t.shape)):<16} {t.dtype:<5} {t.numel:>14,}{note}")
    dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(report.dtypes.items()))
    lines += [
        "",
        f"total: {report.total_parameters:,} parameters in {len(report.tensors)} tensors ({dtypes})",
        f"head: {'tied' if report.tied_head else 'untied'} ({report.tied_reason})",
    ]
    if report.problems:
        lines.append(f"problems: {len(report.problems)}")
        lines += [f"  {p.message}" for p in report.problems]
    else:
        lines.append("problems: none" if report.convention else "problems: shapes not checked")
    return "\n".join(lines)
