"""Training throughput and peak memory: loramill's loop against its peers, in one run.

Peers, on the same base model, data and LoRA settings (rank 16 on every projection, AdamW):
  - `trainer`: transformers `Trainer` with a PEFT model,
  - `plain`:   a plain PEFT + PyTorch loop (`model(**batch, labels=...).loss.backward()`).
Each runner is its own process, so peak RSS (`ru_maxrss`) is that runner's alone. Throughput
counts steps after `--warmup` warm-up steps. With `--packing`, a variable-length data set is also
trained unpacked (padded, every peer) and packed (loramill), comparing useful (non-padding) tokens/s.

    python bench/train.py                      # 58 M-parameter Llama, 8 x 256 tokens a step
    python bench/train.py --hidden 256 --layers 2 --steps 4   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def make_base(args) -> Path:
    from adapters.basemodel import BaseModelSpec, create_base_model

    path = OUT / f"base-h{args.hidden}-l{args.layers}-v{args.vocab}"
    if not path.exists():
        spec = BaseModelSpec(hidden=args.hidden, layers=args.layers, heads=args.hidden // 64,
                             kv_heads=args.hidden // 64, intermediate=args.hidden * 3, vocab=args.vocab,
                             max_positions=max(512, args.seq_len))
        create_base_model(path, spec)
    return path


def make_data(path: Path, n: int, seq_len: int, variable: bool) -> Path:
    """`{"text"}` lines of random lowercase words; with the byte tokenizer, one token per byte.

    Fixed: every sample is exactly `seq_len` tokens (text + eos). Variable: 32..seq_len.
    """
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            length = rng.randint(32, seq_len) if variable else seq_len
            words = []
            while sum(len(w) + 1 for w in words) < length:
                words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))))
            f.write(json.dumps({"text": " ".join(words)[: length - 1]}) + "\n")
    return path


# --- runners: each prints one JSON line -------------------------------------------------------

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _tokenized(base: Path, data: Path, seq_len: int):
    from transformers import AutoTokenizer

    from adapters.data import DataConfig, tokenize_jsonl

    tok = AutoTokenizer.from_pretrained(base)
    return tok, tokenize_jsonl(data, tok, DataConfig(max_seq_len=seq_len), cache_dir=OUT / "cache")


class _Clock:
    """Step end times; tokens/s over the steps after warm-up."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.tokens = warmup, [], []

    def tick(self, useful_tokens: int) -> None:
        self.times.append(time.perf_counter())
        self.tokens.append(useful_tokens)

    def rate(self) -> float:
        t = self.times[self.warmup:]
        return sum(self.tokens[self.warmup + 1:]) / (t[-1] - t[0])


def run_loramill(args) -> dict:
    from adapters.training import TrainingConfig, train

    clock, last = _Clock(args.warmup), [0]

    def progress(p):
        clock.tick(p.tokens_seen - last[0])
        last[0] = p.tokens_seen

    cfg = TrainingConfig(base=str(args.base), data=str(args.data), out=str(args.scratch / "adapter"),
                         rank=16, alpha=32, targets=tuple(LORA["target_modules"]), lr=1e-4,
                         batch_size=args.batch_size, max_seq_len=args.seq_len, packing=args.packing,
                         max_steps=args.steps + args.warmup, cache_dir=str(OUT / "cache"), warmup_ratio=0.0)
    train(cfg, progress=progress)
    return {"tokens_per_s": clock.rate()}


def _peft_model(base: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))


def run_plain(args) -> dict:
    import torch

    from adapters.data import iterate_batches

    tok, ds = _tokenized(args.base, args.data, args.seq_len)
    model = _peft_model(args.base).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    clock = _Clock(args.warmup)
    batches = iterate_batches(ds, batch_size=args.batch_size, pad_id=tok.pad_token_id, max_seq_len=args.seq_len,
                              packing=False, shuffle=True, seed=0, epoch=0)
    for _, batch in zip(range(args.steps + args.warmup), batches):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.tick(int(batch["attention_mask"].sum()))
    return {"tokens_per_s": clock.rate()}


def run_trainer(args) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    tok, ds = _tokenized(args.base, args.data, args.seq_len)
    model = _peft_model(args.base)
    clock = _Clock(args.warmup)
    pad = tok.pad_token_id

    def collate(rows):
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    batch_tokens = []

    class Tick(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.tick(batch_tokens.pop(0) if batch_tokens else 0)

    def counting_collate(rows):
        batch = collate(rows)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    targs = TrainingArguments(output_dir=str(args.scratch / "trainer"), per_device_train_batch_size=args.batch_size,
                              max_steps=args.steps + args.warmup, learning_rate=1e-4, report_to=[], save_strategy="no",
                              logging_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                              remove_unused_columns=False)
    Trainer(model=model, args=targs, train_dataset=ds.remove_columns([c for c in ds.column_names if c not in ("input_ids", "labels")]),
            data_collator=counting_collate, callbacks=[Tick()]).train()
    return {"tokens_per_s": clock.rate()}


RUNNERS = {"loramill": run_loramill, "plain": run_plain, "trainer": run_trainer}


def child(args) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(dir=OUT) as scratch:  # adapters, Trainer output: thrown away
        args.scratch = Path(scratch)
        result = RUNNERS[args.run](args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def measure(runner: str, base: Path, data: Path, args, packing: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--run", runner, "--base", str(base), "--data", str(data),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len)] + (["--packing"] if packing else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{runner} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", choices=sorted(RUNNERS))
    p.add_argument("--base", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-packing", action="store_true", help="only the fixed-length comparison")
    args = p.parse_args()
    if args.run:
        return child(args)

    OUT.mkdir(exist_ok=True)
    base = make_base(args)
    n = args.batch_size * (args.steps + args.warmup) * 2
    fixed = make_data(OUT / f"fixed-{args.seq_len}.jsonl", n, args.seq_len, variable=False)
    print(f"base {base.name}, batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps after {args.warmup}")
    results = {name: measure(name, base, fixed, args) for name in ("plain", "trainer", "loramill")}
    for name, r in results.items():
        print(f"  {name:9s} {r['tokens_per_s']:8.0f} tok/s   peak RSS {r['peak_rss_mb']:7.0f} MB")
    fastest = max(("plain", "trainer"), key=lambda k: results[k]["tokens_per_s"])
    ours, peer = results["loramill"], results[fastest]
    print(f"loramill / {fastest} (faster peer): speed {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x (target >= 1.0), "
          f"peak memory {ours['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x (target <= 0.8)")
    if args.skip_packing:
        return
    variable = make_data(OUT / f"variable-{args.seq_len}.jsonl", n, args.seq_len, variable=True)
    padded = {name: measure(name, base, variable, args) for name in ("plain", "trainer", "loramill")}
    packed = measure("loramill", base, variable, args, packing=True)
    peer = max(("plain", "trainer"), key=lambda k: padded[k]["tokens_per_s"])
    print(f"variable-length data, useful tok/s: padded plain {padded['plain']['tokens_per_s']:.0f}, "
          f"trainer {padded['trainer']['tokens_per_s']:.0f}, loramill {padded['loramill']['tokens_per_s']:.0f}; "
          f"loramill packed {packed['tokens_per_s']:.0f}")
    print(f"loramill packed / {peer} (faster padded peer): {packed['tokens_per_s'] / padded[peer]['tokens_per_s']:.2f}x "
          f"(target >= 1.5); packed / loramill padded: {packed['tokens_per_s'] / padded['loramill']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
