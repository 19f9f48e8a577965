"""Benchmark `loramill merge` against `cp -r` of the base and PEFT's merge_and_unload + save_pretrained.

    .venv/bin/python bench/merge.py [--out bench/out] [--repeat 3] [--sizes large,small]

Bases are made with `loramill base create` (Llama-shaped, float32) under --out (gitignored):
`large` is >= 1 GB, `small` is about a third of it, to show that peak memory does not grow with
the model. One adapter per base (rank 16 on every attention and MLP projection) is made with
real PEFT. Each command runs as its own process, page cache warm (one untimed `cp` first);
wall time is measured around the process, peak anonymous memory by sampling `RssAnon` in
`/proc/PID/status` (mmap'd file pages would inflate VmHWM). Reported: medians over --repeat,
and ratios against the peers measured in the same run. Runs are interleaved (cp, loramill,
PEFT, cp, ...) so load from other processes on the machine hits every peer alike.
Also timed: sha256 of the base's bytes alone, the floor of any merge that writes a manifest
with every file's sha256 (one core; sha256 cannot be split within a file).
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


def run_measured(cmd: list[str]) -> Run:
    """Run `cmd`, sampling its RssAnon every 2 ms; wall time around the whole process.

    Pending writeback is flushed first (`sync`, not timed) so no run pays for an earlier one's.
    """
    os.sync()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def bench_size(out: Path, name: str, repeat: int) -> dict:
    base = ensure_base(out, name)
    adapter = ensure_adapter(out, name, base)
    scratch = out / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    subprocess.run(["cp", "-r", str(base), str(scratch / "warm")], check=True)  # page cache warm
    shutil.rmtree(scratch / "warm")
    runs: dict[str, list[Run]] = {"cp": [], "loramill": [], "peft": []}
    merge_s, sha256_s = [], []
    for i in range(repeat):
        runs["cp"].append(run_measured(["cp", "-r", str(base), str(scratch / f"cp{i}")]))
        shutil.rmtree(scratch / f"cp{i}")
        run = run_measured([str(BIN / "loramill"), "merge", "--base", str(base), "--adapter", str(adapter),
                            "--out", str(scratch / f"lm{i}")])
        runs["loramill"].append(run)
        merge_s.append(float(re.search(r" in ([\d.]+) s", run.stdout)[1]))
        sha256_s.append(float(re.search(r" in ([\d.]+) s", run_measured([sys.executable, "-c", SHA256_FLOOR, str(base)]).stdout)[1]))
        if i == 0:
            manifest = json.loads((scratch / f"lm{i}" / "loramill-manifest.json").read_text())
        shutil.rmtree(scratch / f"lm{i}")
        if i < max(1, repeat - 1):  # PEFT is slow; one run fewer
            runs["peft"].append(run_measured([sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(scratch / f"peft{i}")]))
            shutil.rmtree(scratch / f"peft{i}")
    shutil.rmtree(scratch)
    med = {k: statistics.median(r.wall_s for r in v) for k, v in runs.items()}
    peak = {k: max(r.peak_anon_mb for r in v) for k, v in runs.items()}
    return {
        "size": name, "base_bytes": dir_bytes(base), "files": len(manifest["files"]),
        "largest_tensor_mb": largest_tensor_mb(base),
        "wall_s": med, "merge_itself_s": statistics.median(merge_s), "sha256_s": statistics.median(sha256_s), "peak_anon_mb": peak,
        "peft_detail": runs["peft"][0].stdout.strip(),
    }


def largest_tensor_mb(base: Path) -> float:
    sys.path.insert(0, str(ROOT))
    from adapters.checkpoint import read_checkpoint

    return max(t.nbytes for t in read_checkpoint(base).values()) / 1e6


def report(results: list[dict]) -> None:
    print()
    print(f"{'base':>6} {'GB':>6} | {'cp -r s':>8} {'loramill s':>10} {'(merge)':>8} {'PEFT s':>8} {'sha256 s':>8} | "
          f"{'merge/cp':>8} {'sha256/cp':>9} {'PEFT/loramill':>13} | {'anon MB: cp':>11} {'loramill':>8} {'PEFT':>7} | "
          "largest tensor MB")
    for r in results:
        w, p = r["wall_s"], r["peak_anon_mb"]
        print(f"{r['size']:>6} {r['base_bytes'] / 1e9:6.2f} | {w['cp']:8.2f} {w['loramill']:10.2f} {r['merge_itself_s']:8.2f} "
              f"{w['peft']:8.2f} {r['sha256_s']:8.2f} | {r['merge_itself_s'] / w['cp']:7.2f}x {r['sha256_s'] / w['cp']:8.2f}x "
              f"{w['peft'] / w['loramill']:12.2f}x | "
              f"{p['cp']:11.0f} {p['loramill']:8.0f} {p['peft']:7.0f} | {r['largest_tensor_mb']:.0f}")
    for r in results:
        print(f"PEFT ({r['size']}): {r['peft_detail']}")
    print("targets: merge itself <= 2x cp; whole process >= 3x faster than PEFT; loramill peak anon memory flat across sizes")
    print("sha256: hashing the base's bytes alone (one core, from the page cache), the floor for a merge whose manifest "
          "holds every file's sha256")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default="large,small")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [bench_size(args.out, name, args.repeat) for name in args.sizes.split(",")]
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
