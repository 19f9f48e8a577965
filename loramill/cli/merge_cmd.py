"""`loramill merge`: adapters into a new checkpoint (or, with --method svd, one new adapter).

Torch-free unless --verify: the merge runs on numpy, so the whole process stays close to the
time of copying the checkpoint.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

METHOD_NAMES = ("linear", "ties", "dare_linear", "dare_ties", "svd")


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


@click.command()
@click.option("--base", required=True, help="Base checkpoint directory (or hub id).")
@click.option("--adapter", "adapters", multiple=True, required=True, metavar="DIR[:WEIGHT]",
              help="PEFT adapter directory, optionally with its weight; repeat for several.")
@click.option("--out", required=True, type=click.Path(), help="Output directory (written atomically).")
@click.option("--method", type=click.Choice(METHOD_NAMES), default="linear", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--max-shard-size", default="2GB", show_default=True)
@click.option("--density", type=float, default=None, help="ties: fraction of each delta kept (default 0.2).")
@click.option("--drop-rate", type=float, default=None, help="dare_*: drop probability (default 0.9).")
@click.option("--rank", type=int, default=None, help="svd: rank of the adapter written.")
@click.option("--seed", type=int, default=0, show_default=True, help="dare_*: seed of the drop masks.")
@click.option("--verify", is_flag=True, help="Compare logits with the unmerged adapters; discard the output beyond tolerance.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def merge(base, adapters, out, method, dtype, max_shard_size, density, drop_rate, rank, seed, verify, overwrite) -> None:
    """Merge LoRA adapters into BASE, writing a Hugging Face checkpoint to OUT."""
    # One BLAS thread: the merge's products are small (rank r), and a second core hashes the output.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from adapters.errors import InputError
    from merge.streaming import AdapterRef, merge_streaming

    parsed = [_adapter_ref(spec) for spec in adapters]
    given = sum(w is not None for _, w in parsed)
    if 0 < given < len(parsed):
        raise InputError(f"weights given for {given} of {len(parsed)} adapters; give one for each or for none", param="adapter")
    refs = [AdapterRef(path, 1.0 if w is None else w) for path, w in parsed]
    reports = []

    def check(tmp: Path) -> None:
        from merge.verify import verify_merge

        report = verify_merge(base, refs, tmp, method=method)
        reports.append(report)
        report.raise_if_failed()

    started = time.perf_counter()
    with click.progressbar(length=1, label="merging", file=click.get_text_stream("stderr")) as bar:
        def progress(done: int, total: int) -> None:
            bar.length = total
            bar.update(done - bar.pos)

        result = merge_streaming(base, refs, out, method=method, dtype=dtype, max_shard_size=max_shard_size,
                                 density=density, drop_rate=drop_rate, rank=rank, seed=seed, overwrite=overwrite,
                                 progress=progress, before_commit=check if verify else None)
    elapsed = time.perf_counter() - started
    manifest = result.manifest
    size = sum(f["size"] for f in manifest["files"])
    what = "adapter" if manifest["kind"] == "adapter" else "checkpoint"
    notes = ", lm_head written untied (tie_word_embeddings: false)" if manifest["untied_embeddings"] else ""
    click.echo(f"merged {len(refs)} adapter(s) ({method}) into {what} {result.out_dir}: "
               f"{len(manifest['files'])} files, {size / 1e9:.3f} GB in {elapsed:.2f} s{notes}")
    for report in reports:
        click.echo(report.summary())
