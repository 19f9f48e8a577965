"""`loramill merge`: adapters into a new checkpoint (or, with a method that writes one, a new adapter).

The choices and method options come from the merge registry (`merge.methods.METHODS`, each
method's declared parameters) and `merge.options`. Torch-free unless --verify or --int8: the
merge runs on numpy, so the whole process stays close to the time of copying the checkpoint.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import click

from merge.methods import DEFAULT_METHOD, METHODS
from merge.options import DTYPE_CHOICES, SEED

PARAMETERS = {p.name: p for method in METHODS.values() for p in method.parameters}  # --density, --rank, ...
USERS = {name: [m.name for m in METHODS.values() if name in {p.name for p in m.parameters}] for name in PARAMETERS}
SEED_USERS = [m.name for m in METHODS.values() if m.uses_seed]


def register(main: click.Group) -> None:
    main.add_command(merge)


def _adapter_ref(spec: str):
    """`DIR` or `DIR:WEIGHT` -> (path, weight or None)."""
    from adapters.errors import InputError

    if ":" not in spec or Path(spec).exists():
        return spec, None
    path, weight = spec.rsplit(":", 1)
    try:
        return path, float(weight)
    except ValueError:
        raise InputError(f"adapter weight {weight!r} in --adapter {spec} is not a number", param="adapter") from None


def _method_options(command):
    """One click option per parameter any method declares; None when not given (the method's default applies)."""
    for p in reversed(PARAMETERS.values()):
        default = f", default {p.default}" if p.default is not None else ""
        command = click.option(p.flag, p.name, type=p.type, default=None,
                               help=f"{', '.join(USERS[p.name])}: {p.help} ({p.range_text()}{default}).")(command)
    return command


@click.command()
@click.option("--base", required=True, help="Base checkpoint directory (or hub id).")
@click.option("--adapter", "adapters", multiple=True, required=True, metavar="DIR[:WEIGHT]",
              help="PEFT adapter directory, optionally with its weight; repeat for several.")
@click.option("--out", required=True, type=click.Path(), help="Output directory (written atomically).")
@click.option("--method", type=click.Choice(list(METHODS)), default=DEFAULT_METHOD, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True)
@click.option("--max-shard-size", default="2GB", show_default=True)
@_method_options
@click.option(SEED.flag, type=int, default=SEED.default, show_default=True, help=f"{', '.join(SEED_USERS)}: {SEED.help}.")
@click.option("--verify", is_flag=True, help="Compare logits with the unmerged adapters; discard the output beyond tolerance.")
@click.option("--int8", is_flag=True, help="Write OUT as an int8 weight-only export of the merged checkpoint "
                                           "and print its perplexity cost on the probe.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def merge(base, adapters, out, method, dtype, max_shard_size, seed, verify, int8, overwrite, **options) -> None:
    """Merge LoRA adapters into BASE, writing a Hugging Face checkpoint to OUT."""
    # One BLAS thread: the merge's products are small (rank r), and a second core hashes the output.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from adapters.errors import InputError
    from merge.methods import make_method
    from merge.streaming import AdapterRef, check_output

    merge_method = make_method(method, seed=seed, **options)
    if int8 and merge_method.writes_adapter:
        raise InputError(f"--int8 exports a merged checkpoint; method {method} writes an adapter", param="int8")
    parsed = [_adapter_ref(spec) for spec in adapters]
    given = sum(w is not None for _, w in parsed)
    if 0 < given < len(parsed):
        raise InputError(f"weights given for {given} of {len(parsed)} adapters; give one for each or for none", param="adapter")
    refs = [AdapterRef(path, 1.0 if w is None else w) for path, w in parsed]
    out = Path(out)
    check_output(out, overwrite)
    started = time.perf_counter()
    if int8:
        with _scratch_beside(out) as scratch:
            result, reports = _merge(base, refs, scratch / "merged", merge_method, dtype, max_shard_size, verify, False)
            from merge.quantize import export_int8

            exported = export_int8(result.out_dir, out, overwrite=overwrite,
                                   provenance={k: v for k, v in result.manifest.items() if k != "files"})
            elapsed = time.perf_counter() - started
            from merge.verify import measure_int8

            reports.append(measure_int8(result.out_dir, exported))
        size = sum(p.stat().st_size for p in out.iterdir())
        click.echo(f"merged {len(refs)} adapter(s) ({method}) into int8 checkpoint {out}: "
                   f"{len(list(out.iterdir()))} files, {size / 1e9:.3f} GB in {elapsed:.2f} s")
    else:
        result, reports = _merge(base, refs, out, merge_method, dtype, max_shard_size, verify, overwrite)
        elapsed = time.perf_counter() - started
        manifest = result.manifest
        size = sum(f["size"] for f in manifest["files"])
        notes = ", lm_head written untied (tie_word_embeddings: false)" if manifest["untied_embeddings"] else ""
        click.echo(f"merged {len(refs)} adapter(s) ({method}) into {manifest['kind']} {result.out_dir}: "
                   f"{len(manifest['files'])} files, {size / 1e9:.3f} GB in {elapsed:.2f} s{notes}")
    for report in reports:
        click.echo(report.summary())


def _merge(base, refs, out: Path, merge_method, dtype, max_shard_size, verify: bool, overwrite: bool):
    """`merge_streaming` with a progress bar on stderr; with `verify`, the output is compared before it is committed."""
    from merge.streaming import merge_streaming

    reports = []

    def check(tmp: Path) -> None:
        from merge.verify import verify_merge

        report = verify_merge(base, refs, tmp, method=merge_method)
        reports.append(report)
        report.raise_if_failed()

    with _LazyBar("merging") as progress:  # drawn from the first tensor written: an input error prints no bar before it
        result = merge_streaming(base, refs, out, method=merge_method, dtype=dtype, max_shard_size=max_shard_size,
                                 overwrite=overwrite, progress=progress, before_commit=check if verify else None)
    return result, reports


class _LazyBar:
    """A `click.progressbar` on stderr that appears at the first `progress(done, total)` call, not before."""

    def __init__(self, label: str):
        self.label, self.bar = label, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=max(1, total), label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.length = max(1, total)
        self.bar.update(done - self.bar.pos)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


@contextmanager
def _scratch_beside(out: Path):
    """A temporary directory in `out`'s parent (same file system), removed on exit whatever happens."""
    from adapters.errors import InputError

    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f".{out.name}.float-", dir=parent))
    except OSError as exc:
        raise InputError(f"cannot write to {parent}: {exc.strerror or exc}", param="out") from exc
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
