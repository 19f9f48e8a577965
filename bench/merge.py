"""Benchmark `loramill merge` against `cp -r` of the base and PEFT's merge_and_unload + save_pretrained.

    .venv/bin/python bench/merge.py [--out bench/out] [--repeat 3] [--sizes large,small] [--also NAME=TREE ...]

Bases are made with `loramill base create` (Llama-shaped, float32) under --out (gitignored):
`large` is >= 1 GB, `small` is about a third of it, to show that peak memory does not grow with
the model. One adapter per base (rank 16 on every attention and MLP projection) is made with
real PEFT. Each command runs as its own process, page cache warm (one untimed `cp` first);
wall time is measured around the process, peak anonymous memory by sampling `RssAnon` in
`/proc/PID/status` (mmap'd file pages would inflate VmHWM). Reported: medians over --repeat,
and ratios against the peers measured in the same run. Runs are interleaved (cp, loramill,
PEFT, cp, ...) so load from other processes on the machine hits every peer alike.
Also timed: sha256 of the base's bytes alone, the floor of any merge that writes a manifest
with every file's sha256 (one core; sha256 cannot be split within a file). The target is the
merge itself (the CLI's own timer, imports excluded) within 1.2x max(cp, sha256), taken per
round. `--also NAME=TREE` times `loramill merge` from another source tree too (e.g. a second
checkout of main), interleaved with the rest, to compare before and after in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SIZES = {
    "large": dict(hidden=2048, layers=4, intermediate=5632, vocab=32000, heads=16, kv_heads=4),
    "small": dict(hidden=1024, layers=4, intermediate=2816, vocab=32000, heads=8, kv_heads=2),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_MERGE = textwrap.dedent("""
    import sys, time
    started = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    imported = time.perf_counter()
    base, adapter, out = sys.argv[1:4]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    model.merge_and_unload().save_pretrained(out)
    print(f"imports {imported - started:.3f} s, merge {time.perf_counter() - imported:.3f} s")
""")

SHA256_FLOOR = textwrap.dedent("""
    import hashlib, mmap, pathlib, sys, time
    started = time.perf_counter()
    for path in sorted(pathlib.Path(sys.argv[1]).glob("*.safetensors")):
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            hashlib.sha256(m).hexdigest()
    print(f"sha256 in {time.perf_counter() - started:.3f} s")
""")

MAKE_ADAPTER = textwrap.dedent("""
    import sys, torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base, out = sys.argv[1:3]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules=sys.argv[3].split(",")))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    model.save_pretrained(out)
""")


@dataclass
class Run:
    wall_s: float
    peak_anon_mb: float
    stdout: str


def run_measured(cmd: list[str], env: dict | None = None) -> Run:
    """Run `cmd`, sampling its RssAnon every 2 ms; wall time around the whole process.

    Pending writeback is flushed first (`sync`, not timed) so no run pays for an earlier one's.
    """
    os.sync()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    status = Path(f"/proc/{proc.pid}/status")
    peak_kb = 0
    while proc.poll() is None:
        try:
            match = re.search(r"RssAnon:\s+(\d+) kB", status.read_text())
            if match:
                peak_kb = max(peak_kb, int(match[1]))
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.002)
    wall = time.perf_counter() - started
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return Run(wall, peak_kb / 1024, out)


def ensure_base(out: Path, name: str) -> Path:
    base = out / f"base-{name}"
    if not (base / "config.json").exists():
        shape = SIZES[name]
        args = [str(BIN / "loramill"), "base", "create", str(base), "--arch", "llama"]
        for key, value in shape.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        subprocess.run(args, check=True)
    return base


def ensure_adapter(out: Path, name: str, base: Path) -> Path:
    adapter = out / f"adapter-{name}"
    if not (adapter / "adapter_model.safetensors").exists():
        subprocess.run([sys.executable, "-c", MAKE_ADAPTER, str(base), str(adapter), ",".join(TARGETS)], check=True)
    return adapter


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_size(out: Path, name: str, repeat: int, trees: dict[str, Path]) -> dict:
    """Interleaved rounds of cp, sha256, every loramill tree and PEFT; medians, ranges and per-round ratios."""
    base = ensure_base(out, name)
    adapter = ensure_adapter(out, name, base)
    scratch = out / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    subprocess.run(["cp", "-r", str(base), str(scratch / "warm")], check=True)  # page cache warm
    shutil.rmtree(scratch / "warm")
    merges = {"loramill": None, **{f"loramill@{label}": tree for label, tree in trees.items()}}
    runs: dict[str, list[Run]] = {"cp": [], **{k: [] for k in merges}, "peft": []}
    itself: dict[str, list[float]] = {k: [] for k in merges}  # the CLI's own timer
    sha256_s: list[float] = []
    manifest = None
    for i in range(repeat):
        runs["cp"].append(run_measured(["cp", "-r", str(base), str(scratch / "cp")]))
        shutil.rmtree(scratch / "cp")
        sha256_s.append(float(re.search(r" in ([\d.]+) s", run_measured([sys.executable, "-c", SHA256_FLOOR, str(base)]).stdout)[1]))
        order = list(merges)[i % len(merges):] + list(merges)[:i % len(merges)]  # who goes first rotates
        for key in order:
            env = {**os.environ, "PYTHONPATH": str(merges[key])} if merges[key] else None
            run = run_measured([str(BIN / "loramill"), "merge", "--base", str(base), "--adapter", str(adapter),
                                "--out", str(scratch / "lm")], env=env)
            runs[key].append(run)
            itself[key].append(float(re.search(r" in ([\d.]+) s", run.stdout)[1]))
            if manifest is None:
                manifest = json.loads((scratch / "lm" / "loramill-manifest.json").read_text())
            shutil.rmtree(scratch / "lm")
        if i < max(1, repeat - 1):  # PEFT is slow; one run fewer
            runs["peft"].append(run_measured([sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(scratch / "peft")]))
            shutil.rmtree(scratch / "peft")
    shutil.rmtree(scratch)
    floor = [max(c.wall_s, h) for c, h in zip(runs["cp"], sha256_s, strict=True)]
    return {
        "size": name, "base_bytes": dir_bytes(base), "files": len(manifest["files"]),
        "largest_tensor_mb": largest_tensor_mb(base),
        "wall_s": {k: _spread(r.wall_s for r in v) for k, v in runs.items()},
        "merge_itself_s": {k: _spread(v) for k, v in itself.items()},
        "sha256_s": _spread(sha256_s),
        "merge_over_floor": {k: _spread(m / f for m, f in zip(v, floor, strict=True)) for k, v in itself.items()},
        "merge_over_cp": {k: _spread(m / c.wall_s for m, c in zip(v, runs["cp"], strict=True)) for k, v in itself.items()},
        "peak_anon_mb": {k: max(r.peak_anon_mb for r in v) for k, v in runs.items()},
        "peft_detail": runs["peft"][0].stdout.strip(),
    }


def _spread(values) -> dict:
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def largest_tensor_mb(base: Path) -> float:
    sys.path.insert(0, str(ROOT))
    from adapters.checkpoint import read_checkpoint

    return max(t.nbytes for t in read_checkpoint(base).values()) / 1e6


def _range(x: dict, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(x['median'])} ({fmt.format(x['min'])}-{fmt.format(x['max'])})"


def report(results: list[dict]) -> None:
    print()
    print("medians over the rounds, (min-max) in brackets; ratios are taken per round, then summarised")
    for r in results:
        w = r["wall_s"]
        print(f"\n{r['size']}: {r['base_bytes'] / 1e9:.2f} GB, {r['files']} files, largest tensor {r['largest_tensor_mb']:.0f} MB")
        print(f"  cp -r           {_range(w['cp'])} s     sha256 of the bytes alone {_range(r['sha256_s'])} s")
        for key, itself in r["merge_itself_s"].items():
            print(f"  {key:<15} merge itself {_range(itself)} s, whole process {_range(w[key])} s | "
                  f"merge/cp {_range(r['merge_over_cp'][key])}x, merge/max(cp, sha256) {_range(r['merge_over_floor'][key])}x | "
                  f"PEFT/whole {w['peft']['median'] / w[key]['median']:.2f}x | peak anon {r['peak_anon_mb'][key]:.0f} MB")
        print(f"  PEFT            whole process {_range(w['peft'])} s, peak anon {r['peak_anon_mb']['peft']:.0f} MB ({r['peft_detail']})")
    print("\ntargets: merge itself <= 1.2x max(cp, sha256); whole process >= 3x faster than PEFT; "
          "loramill peak anon memory flat across sizes")
    print("sha256: hashing the base's bytes alone (one core, from the page cache), the floor for a merge whose manifest "
          "holds every file's sha256")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default="large,small")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=TREE",
                        help="also time `loramill merge` from the source tree TREE (PYTHONPATH), reported as loramill@NAME")
    args = parser.parse_args()
    trees = {}
    for spec in args.also:
        label, _, tree = spec.partition("=")
        if not tree or not (Path(tree) / "merge" / "streaming.py").exists():
            parser.error(f"--also {spec}: expected NAME=TREE with TREE a loramill source tree")
        trees[label] = Path(tree).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [bench_size(args.out, name, args.repeat, trees) for name in args.sizes.split(",")]
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
