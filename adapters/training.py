"""LoRA fine-tuning on frozen base weights: one readable loop.

    W_eff x = W x + s · B (A x),   A ∈ R^{r×d_in} (random init), B ∈ R^{d_out×r} (zero init),
    s = alpha / r  (rsLoRA: alpha / sqrt(r))

Only A and B train (peft injects them). The loss is the mean cross-entropy over supervised
tokens (labels != -100) of every micro-batch in an optimizer step, so gradient accumulation gives
the same update as one big batch. Logits are never materialised for the whole batch: the
backbone's hidden states at supervised positions go through the LM head in chunks
(`adapters.lm_loss`), so peak memory holds one chunk's `[chunk, vocab]` logits, not
`[batch, seq, vocab]`.

A checkpoint (`<out>/checkpoints/step-NNNNNN/`) holds the adapter, the optimizer, scheduler and
RNG states, the position in the data and `metrics.jsonl` up to its step; resuming from it, into
the same `out` or a fresh one, replays the same batches in the same order and continues the
metrics from the checkpoint's copy, so adapter and metrics equal the uninterrupted run's.

`devices > 1` trains on that many processes (`adapters.distributed` launches them, `adapters.ranks`
says how they split each batch and hold the base: DDP, or FSDP for a base that does not fit one
device): the same loop, where the main process (rank 0) alone writes files and reports progress,
every process evaluates its share of each validation batch, and a stop the main process is asked
for reaches every process at the same micro-batch.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from adapters.checkpoint import check_target_modules, resolve_model_dir, safetensors_files
from adapters.errors import InputError
from adapters.fsutil import atomic_directory
from adapters.layouts import is_conv1d
from adapters.lm_loss import IGNORE_INDEX, CausalLMLoss
from adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, quiet_peft_model_init
from adapters.ranks import MAX_DEVICES, SHARDINGS, Ranks, local_bytes

STATE_FILE = "training_state.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass(frozen=True)
class TrainingConfig:
    """Everything one training run needs. Paths are local paths (a hub id for `base`)."""

    base: str
    data: str
    out: str
    validation: str | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = "all-linear"
    use_rslora: bool = False
    epochs: int | None = 1  # None: chosen from the dataset (`adapters.auto_hyperparameters`), as are the next two
    max_steps: int | None = None
    lr: float | None = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    batch_size: int | None = 8
    grad_accum: int = 1
    max_seq_len: int = 512
    packing: bool = False
    overlong: str = "truncate"
    seed: int = 0
    save_every: int | None = 0  # steps between checkpoints; 0: none, None: at the end of each epoch
    keep_checkpoints: int = 0  # the newest this many checkpoints in out/checkpoints are kept; 0: all
    eval_every: int = 0
    resume_from: str | None = None
    bf16: bool | None = None  # None: bf16 autocast where the device supports it (CUDA)
    gradient_checkpointing: bool = False
    loss_chunk_tokens: int = 512
    max_rank: int = 1024
    cache_dir: str | None = None  # tokenized-dataset cache (`adapters.data.tokenize_jsonl`); None: no cache
    devices: int = 1  # processes training together (one GPU each on CUDA); `adapters.distributed`
    sharding: str = "auto"  # how `devices` > 1 processes hold the base: "ddp", "fsdp" or "auto" (`adapters.ranks`)

    def validate(self) -> None:
        positive = {"rank": self.rank, "alpha": self.alpha, "epochs": self.epochs, "lr": self.lr,
                    "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "max_seq_len": self.max_seq_len, "loss_chunk_tokens": self.loss_chunk_tokens,
                    "devices": self.devices}
        for name, value in positive.items():
            if value is not None and not value > 0:  # None: "auto", chosen once the dataset is read
                raise InputError(f"{name} must be positive, got {value}", param=name)
        if self.rank > self.max_rank:
            raise InputError(f"rank {self.rank} is above the maximum {self.max_rank}", param="rank")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}", param="dropout")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise InputError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}", param="warmup_ratio")
        if self.max_steps is not None and self.max_steps <= 0:
            raise InputError(f"max_steps must be positive, got {self.max_steps}", param="max_steps")
        for name in ("save_every", "eval_every", "keep_checkpoints"):
            if (getattr(self, name) or 0) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}", param=name)
        if self.devices > MAX_DEVICES:
            raise InputError(f"devices {self.devices} is above the maximum {MAX_DEVICES}", param="devices")
        if self.sharding not in SHARDINGS:
            raise InputError(f"sharding must be one of {', '.join(SHARDINGS)}, got {self.sharding!r}", param="sharding")
        if self.sharding != "auto" and self.devices == 1:
            raise InputError(f"sharding {self.sharding!r} needs devices > 1: one process holds the whole base "
                             "(leave sharding 'auto')", param="sharding")
        if self.overlong not in ("truncate", "refuse"):
            raise InputError(f"overlong must be truncate or refuse, got {self.overlong!r}", param="overlong")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            raise InputError(f"targets must be 'all-linear' or a list of module names, got {self.targets!r}", param="targets")
        if not isinstance(self.targets, str) and not self.targets:
            raise InputError("targets must name at least one module", param="targets")


@dataclass(frozen=True)
class TrainingProgress:
    """What the progress callback sees after every optimizer step; `val_loss` is set on the steps that evaluated
    (every `eval_every` steps, or at each epoch's end when it is 0), so the callback sees every validation loss."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    tokens_seen: int
    tokens_per_s: float
    eta_s: float
    val_loss: float | None = None
    checkpoint: Path | None = None


ProgressCallback = Callable[[TrainingProgress], "bool | None"]


@dataclass(frozen=True)
class TrainingResult:
    adapter_dir: Path | None  # None when stopped early
    steps: int
    trained_tokens: int
    final_loss: float | None
    metrics_path: Path
    stopped: bool
    val_loss: float | None = None
    checkpoints: list[Path] = field(default_factory=list)
    base_bytes_held: int = 0  # frozen base weights the main process held: all of them, or its shards under FSDP


def device_for_training() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_base_model(base: str | Path, device: torch.device | None = None, *, stage_on_host: bool = False):
    """The frozen base as `AutoModelForCausalLM`: float32 on CPU, the checkpoint's dtype on CUDA.

    `stage_on_host`: leave the weights in host memory, in `device`'s dtype, for FSDP to move each
    process's shards to `device` (`adapters.ranks.ShardedRanks`). Refuses pickle-only checkpoints
    before anything is loaded.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # callers report their own progress
    model_dir = resolve_model_dir(base)
    safetensors_files(model_dir)
    device = device or device_for_training()
    dtype = torch.float32 if device.type == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    return model if stage_on_host else model.to(device)


def _lora_model(base_model, cfg: TrainingConfig):
    from peft import LoraConfig, get_peft_model

    model_type = base_model.config.model_type
    fan_in_fan_out = any(is_conv1d(model_type, name) for name, _ in base_model.named_modules())  # [d_in, d_out]
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.targets if isinstance(cfg.targets, str) else list(cfg.targets),
        use_rslora=cfg.use_rslora,
        fan_in_fan_out=fan_in_fan_out,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(cfg.seed)
    with quiet_peft_model_init():
        model = get_peft_model(base_model, lora)
    model.peft_config["default"].base_model_name_or_path = cfg.base
    return model


def _cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def supervised_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def real_tokens(batch: dict[str, torch.Tensor], pad_id: int) -> int:
    """Non-padding tokens of a batch: the 2D mask's ones, or for a packed batch (4D mask) every
    position but each row's trailing run of unlabelled pad tokens."""
    mask = batch["attention_mask"]
    if mask.dim() == 2:
        return int(mask.sum())
    pad = (batch["input_ids"] == pad_id) & (batch["labels"] == IGNORE_INDEX)
    return batch["input_ids"].numel() - int(pad.flip(1).cumprod(1).sum())


def _choose_auto(cfg: TrainingConfig, train_set, model_dir: Path) -> TrainingConfig:
    """`cfg` with its "auto" (None) epochs, batch size and learning rate chosen from the tokenized dataset."""
    if None not in (cfg.epochs, cfg.batch_size, cfg.lr):
        return cfg
    from dataclasses import replace

    from adapters import auto_hyperparameters
    from adapters.checkpoint import read_config
    from adapters.data import supervised_token_count

    config = read_config(model_dir)
    width = next((config[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(config.get(k), int)), None)
    chosen = auto_hyperparameters.choose(
        len(train_set), supervised_token_count(train_set), width, n_epochs=cfg.epochs, batch_size=cfg.batch_size,
        learning_rate_multiplier=None if cfg.lr is None else cfg.lr / auto_hyperparameters.BASE_LEARNING_RATE)
    return replace(cfg, epochs=chosen.n_epochs, batch_size=chosen.batch_size, lr=chosen.learning_rate)


def _decoder_layers(causal_lm) -> list[torch.nn.Module]:
    """The model's repeated blocks (`LlamaDecoderLayer`, `GPT2Block`, ...: transformers' `_no_split_modules`),
    the units FSDP gathers one at a time."""
    names = set(getattr(causal_lm, "_no_split_modules", None) or ())
    return [m for m in causal_lm.modules() if type(m).__name__ in names]


class _LossModule(torch.nn.Module):
    """backbone → chunked LM-head cross-entropy, as one module so DDP and FSDP see every forward.

    `forward(input_ids, attention_mask, labels[, position_ids])` → the summed loss over supervised tokens (scalar).
    """

    def __init__(self, backbone: torch.nn.Module, loss_fn: CausalLMLoss):
        super().__init__()
        self.backbone = backbone
        self.head = loss_fn.head  # registered, so a wrapper sees the head's (possibly tied) weight
        self.loss_fn = loss_fn

    def forward(self, labels: torch.Tensor, **batch: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(**batch, use_cache=False).last_hidden_state
        return self.loss_fn(hidden, labels)


class LoraTrainer:
    """One training run: `run()` is the loop, `close()` strips the LoRA layers off the base."""

    def __init__(self, cfg: TrainingConfig, progress: ProgressCallback | None, base_model,
                 should_stop: Callable[[], bool] | None = None, checkpoint_on_stop: bool = False,
                 ranks: Ranks | None = None):
        """`ranks`: this process's place among several training together (`adapters.ranks`); default one process.
        `progress` and `should_stop` are only consulted on the main process."""
        from adapters.checkpoint import read_config
        from adapters.data import DataConfig, batches_per_epoch, tokenize_jsonl
        from adapters.tokenizer import load_tokenizer

        cfg.validate()
        self.cfg = cfg
        self.progress = progress
        self.should_stop = should_stop or (lambda: False)
        self.checkpoint_on_stop = checkpoint_on_stop
        self.out = Path(cfg.out)
        base_device = next(base_model.parameters()).device if base_model is not None else device_for_training()
        self.ranks = ranks or Ranks(base_device)
        model_dir = resolve_model_dir(cfg.base)
        read_config(model_dir)  # a directory that is not a base model (an adapter, say) is refused in one line
        check_target_modules(model_dir, cfg.targets)
        self.tokenizer = load_tokenizer(model_dir)
        data_cfg = DataConfig(max_seq_len=cfg.max_seq_len, overlong=cfg.overlong)
        with self.ranks.main_first():  # the others then read what it cached
            self.train_set = tokenize_jsonl(cfg.data, self.tokenizer, data_cfg, cache_dir=cfg.cache_dir)
            self.val_set = None
            if cfg.validation:
                self.val_set = tokenize_jsonl(cfg.validation, self.tokenizer, data_cfg, cache_dir=cfg.cache_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        cfg = self.cfg = _choose_auto(cfg, self.train_set, model_dir)

        base = base_model if base_model is not None else load_base_model(
            model_dir, self.ranks.device, stage_on_host=self.ranks.shards_base)
        self.device = self.ranks.device
        self.model = _lora_model(base, cfg)
        causal_lm = self.model.get_base_model()
        if cfg.gradient_checkpointing:
            if hasattr(causal_lm, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
                causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            causal_lm.enable_input_require_grads()
        self.loss_module = _LossModule(causal_lm.base_model, CausalLMLoss(
            causal_lm.get_output_embeddings(), cfg.loss_chunk_tokens,
            getattr(causal_lm.config, "final_logit_softcapping", None)))
        use_bf16 = cfg.bf16 if cfg.bf16 is not None else (self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None

        self.batches_per_epoch = batches_per_epoch(self.train_set, batch_size=cfg.batch_size,
                                                   max_seq_len=cfg.max_seq_len, packing=cfg.packing)
        steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.total_steps = min(cfg.max_steps or 10**12, steps_per_epoch * cfg.epochs)
        # wrapped before the optimizer exists: FSDP moves the LoRA weights to the device with the base's shards
        self.forward_module = self.ranks.wrap(self.loss_module, _decoder_layers(causal_lm))
        self.base_bytes_held = local_bytes(p for p in self.model.parameters() if not p.requires_grad)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _cosine_with_warmup(warmup, self.total_steps))
        self.step = 0
        self.epoch = 0
        self.micro_in_epoch = 0  # micro-batches of the current epoch already consumed
        self.tokens_seen = 0
        self.checkpoints: list[Path] = []
        self.resumed_from = Path(cfg.resume_from) if cfg.resume_from else None
        if self.resumed_from:
            self._load_state(self.resumed_from)  # the same checkpoint on every process: equal weights again

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> TrainingResult:
        cfg = self.cfg
        main = self.ranks.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        metrics = _MetricsLog(self.out / METRICS_NAME, resumed_from=self.resumed_from, step=self.step) if main else None
        clock = _Clock(self.step, self.tokens_seen)
        batches = self._epoch_batches()
        loss = val_loss = None
        stopped = False
        self.model.train()
        while self.step < self.total_steps:
            group = list(itertools.islice(batches, cfg.grad_accum))  # the epoch's last group may be short
            loss = self._optimizer_step(group)
            if loss is None:  # asked to stop inside the step
                stopped = True
                break
            self.step += 1
            self.micro_in_epoch += len(group)
            step_val = epoch_val = None
            evaluate = self.val_set is not None  # every process, on its share
            if evaluate and cfg.eval_every and self.step % cfg.eval_every == 0:
                step_val = val_loss = self.evaluate()
            if self.micro_in_epoch == self.batches_per_epoch:
                self.epoch, self.micro_in_epoch = self.epoch + 1, 0
                batches = self._epoch_batches()
                if evaluate and not cfg.eval_every:
                    epoch_val = val_loss = self.evaluate()
            checkpoint = self._checkpoint_dir()
            if not main:
                if self.ranks.agree(False):
                    stopped = True
                    break
                continue
            report = self._report(loss, step_val if step_val is not None else epoch_val, checkpoint, clock)
            metrics.write(report)
            if checkpoint is not None:
                self._save_checkpoint(checkpoint, metrics.path)
            if self.ranks.agree(self.progress is not None and bool(self.progress(report))):
                stopped = True
                break
        if main and stopped and self.checkpoint_on_stop and self.step > 0:
            target = self.out / "checkpoints" / f"step-{self.step:06d}"
            if not (self.checkpoints and self.checkpoints[-1] == target):
                self._save_checkpoint(target, metrics.path)
        if not stopped and self.val_set is not None and val_loss is None:
            val_loss = self.evaluate()
        adapter_dir = None if stopped or not main else self._save_adapter()
        return TrainingResult(adapter_dir=adapter_dir, steps=self.step, trained_tokens=self.tokens_seen,
                              final_loss=loss, metrics_path=self.out / METRICS_NAME, stopped=stopped,
                              val_loss=val_loss, checkpoints=list(self.checkpoints),
                              base_bytes_held=self.base_bytes_held)

    def _epoch_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The current epoch's micro-batches from the current position (lazy)."""
        from adapters.data import iterate_batches

        cfg = self.cfg
        return iterate_batches(self.train_set, batch_size=cfg.batch_size, pad_id=self.pad_id,
                               max_seq_len=cfg.max_seq_len, packing=cfg.packing, shuffle=True, seed=cfg.seed,
                               epoch=self.epoch, start_batch=self.micro_in_epoch, mask_dtype=self.autocast_dtype)

    def _forward_loss(self, batch: dict[str, torch.Tensor], module: torch.nn.Module | None = None) -> torch.Tensor:
        """Summed cross-entropy over `batch`'s supervised tokens, through `module` (default: the wrapped one)."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return (module or self.forward_module)(**batch)

    def _optimizer_step(self, group: list[dict[str, torch.Tensor]]) -> float | None:
        """One optimizer step over `group`'s micro-batches; its mean loss, or None when asked to stop first.

        A loss that is not finite fails the run before the weights are touched: a learning rate or
        alpha too large for the model would otherwise train on into NaN weights and "succeed".
        """
        ranks = self.ranks
        group = [{k: v.to(self.device) for k, v in b.items()} for b in group]
        n_tokens = sum(supervised_tokens(b["labels"]) for b in group)  # of the whole step, on every process
        total, tokens = 0.0, 0
        for i, batch in enumerate(group):
            if ranks.agree(ranks.is_main and self.should_stop()):
                self.optimizer.zero_grad(set_to_none=True)
                return None
            tokens += real_tokens(batch, self.pad_id)
            share = ranks.share(batch)
            last = i == len(group) - 1
            with nullcontext() if last else ranks.no_sync(self.forward_module):
                if share is None:  # no rows for this process: a zero-weight pass still joins DDP's all-reduce
                    loss_sum = self._forward_loss({k: v[:1] for k, v in batch.items()}) * 0.0  # and FSDP's gathers
                else:
                    loss_sum = self._forward_loss(share)
                (loss_sum * (ranks.world / max(1, n_tokens))).backward()  # DDP averages over the world
            total += loss_sum.item()
        ranks.average_gradients(self.trainable)
        total = ranks.sum(total)
        if not math.isfinite(total):
            raise InputError(f"the training loss is {total} at step {self.step + 1}: the learning rate or LoRA alpha "
                             "is too large for this model; nothing was saved", param="learning_rate_multiplier",
                             code="training_diverged")
        self.tokens_seen += tokens
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / max(1, n_tokens)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the validation set's supervised tokens: every process computes its share of each batch
        (under FSDP each must join every forward), through `loss_module` (no DDP wrapper; FSDP's hooks sit on the
        module itself), and the sums are added."""
        from adapters.data import iterate_batches

        self.model.eval()
        total, count = 0.0, 0
        for batch in iterate_batches(self.val_set, batch_size=self.cfg.batch_size, pad_id=self.pad_id,
                                     max_seq_len=self.cfg.max_seq_len, packing=self.cfg.packing,
                                     shuffle=False, seed=0, epoch=0, mask_dtype=self.autocast_dtype):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            count += supervised_tokens(batch["labels"])
            share = self.ranks.share(batch)
            if share is None:  # no rows here: a pass on one row, not counted, keeps FSDP's gathers in step
                self._forward_loss({k: v[:1] for k, v in batch.items()}, self.loss_module)
            else:
                total += float(self._forward_loss(share, self.loss_module))
        self.model.train()
        return self.ranks.sum(total) / max(1, count)

    # -- reporting ------------------------------------------------------------------------------

    def _report(self, loss: float, val_loss: float | None, checkpoint: Path | None, clock: _Clock) -> TrainingProgress:
        elapsed = time.perf_counter() - clock.started
        return TrainingProgress(
            step=self.step, total_steps=self.total_steps,
            epoch=self.epoch + self.micro_in_epoch / max(1, self.batches_per_epoch),
            loss=loss, lr=self.scheduler.get_last_lr()[0], tokens_seen=self.tokens_seen,
            tokens_per_s=(self.tokens_seen - clock.tokens) / max(elapsed, 1e-9),
            eta_s=(self.total_steps - self.step) * elapsed / max(1, self.step - clock.step),
            val_loss=val_loss, checkpoint=checkpoint,
        )

    # -- files ----------------------------------------------------------------------------------

    def _checkpoint_dir(self) -> Path | None:
        """Where this step's checkpoint goes, when one is due (every `save_every` steps, or at each epoch's end when
        it is None; never at the last step, whose checkpoint is the adapter itself)."""
        if self.cfg.save_every is None:
            due = self.micro_in_epoch == 0  # the step that ended an epoch
        else:
            due = bool(self.cfg.save_every) and self.step % self.cfg.save_every == 0
        if not due or self.step == self.total_steps:
            return None
        return self.out / "checkpoints" / f"step-{self.step:06d}"

    def _save_checkpoint(self, target: Path, metrics: Path) -> None:
        with atomic_directory(target, overwrite=True) as tmp:
            self.model.save_pretrained(str(tmp), safe_serialization=True)
            torch.save(self._state(), tmp / STATE_FILE)
            shutil.copyfile(metrics, tmp / METRICS_NAME)
        self.checkpoints.append(target)
        self._prune_checkpoints(target.parent)

    def _prune_checkpoints(self, root: Path) -> None:
        """Delete all but the newest `keep_checkpoints` checkpoints under `root` (this run's and any it resumed).

        Step directory names sort by step (`step-NNNNNN`); the one being resumed from counts like any other.
        """
        keep = self.cfg.keep_checkpoints
        if not keep:
            return
        found = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in found[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        self.checkpoints = [p for p in self.checkpoints if p.exists()]

    def _state(self) -> dict:
        return {
            "step": self.step, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch,
            "tokens_seen": self.tokens_seen, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": json.dumps(asdict(self.cfg), default=str),
        }

    def _load_state(self, ckpt: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state_path = ckpt / STATE_FILE
        if not state_path.exists():
            raise InputError(f"{ckpt} is not a loramill training checkpoint (no {STATE_FILE})", param="resume_from")
        state = torch.load(state_path, weights_only=True, map_location="cpu")
        result = set_peft_model_state_dict(self.model, load_file(str(ckpt / WEIGHTS_NAME)))
        if getattr(result, "unexpected_keys", None):
            raise InputError(f"{ckpt}: checkpoint does not match this run's adapter ({result.unexpected_keys[0]})", param="resume_from")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.micro_in_epoch, self.tokens_seen = state["micro_in_epoch"], state["tokens_seen"]
        if self.micro_in_epoch == self.batches_per_epoch:  # saved at an epoch's end by an earlier loramill
            self.epoch, self.micro_in_epoch = self.epoch + 1, 0

    def _save_adapter(self) -> Path:
        """PEFT's own files, each renamed into `out` so a reader never sees half an adapter."""
        staging = self.out / f".adapter.tmp-{os.getpid()}"
        self.model.save_pretrained(str(staging), safe_serialization=True)
        for name in (CONFIG_NAME, "README.md", WEIGHTS_NAME):
            if (staging / name).exists():
                os.replace(staging / name, self.out / name)
        shutil.rmtree(staging)
        return self.out

    def close(self) -> None:
        """Strip the LoRA layers so a cached base model is left as it came."""
        self.model.unload()


@dataclass(frozen=True)
class _Clock:
    """Where this run (or resumption) started: throughput and ETA count from here."""

    step: int
    tokens: int
    started: float = field(default_factory=time.perf_counter)


class _MetricsLog:
    """metrics.jsonl, one JSON object per optimizer step (`val_loss` set on the steps that evaluated).

    A resumed run starts from the checkpoint's copy of the log, or, for a checkpoint without one,
    from the log already in `out`; either way only the lines up to the checkpoint's step are kept.
    """

    def __init__(self, path: Path, *, resumed_from: Path | None, step: int):
        self.path = path
        kept = []
        if resumed_from is not None:
            source = resumed_from / METRICS_NAME if (resumed_from / METRICS_NAME).exists() else path
            if source.exists():
                kept = [line for line in source.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write(self, p: TrainingProgress) -> None:
        record = {k: v for k, v in asdict(p).items() if k not in ("checkpoint", "eta_s", "total_steps")}
        if p.checkpoint is not None:
            record["checkpoint"] = p.checkpoint.name
        self._append(record)


def train(cfg: TrainingConfig, progress: ProgressCallback | None = None, base_model=None,
          should_stop: Callable[[], bool] | None = None,
          on_start: Callable[[TrainingConfig], None] | None = None, checkpoint_on_stop: bool = False) -> TrainingResult:
    """Train a LoRA adapter on `cfg.data` and write it to `cfg.out` in PEFT's layout.

    `base_model`: an already loaded model to reuse (a worker's cache); it is returned to its
    original state (LoRA layers removed) before this returns. `should_stop()`: asked between
    micro-batches, so a long optimizer step (many accumulated micro-batches) stops within one
    micro-batch; the unfinished step is dropped, as when `progress` asks to stop. `on_start(cfg)`:
    told the configuration actually trained with ("auto" values chosen) before the first step.
    `checkpoint_on_stop`: a run stopped early saves a checkpoint of its last finished step (what
    `loramill train` does on Ctrl-C, so it can be resumed); a cancelled job does not.

    `cfg.devices > 1`: the run happens in that many child processes (`adapters.distributed.launch`,
    which resolves `cfg.sharding` "auto" to DDP or FSDP); this process relays their progress to
    `progress` and its stops to them; `base_model` is unused, and a stopped run keeps the
    checkpoints it has (`checkpoint_on_stop` is for one process).
    """
    if cfg.devices > 1:
        from adapters.distributed import launch

        cfg.validate()
        return launch(cfg, progress=progress, should_stop=should_stop, on_start=on_start)
    trainer = LoraTrainer(cfg, progress, base_model, should_stop, checkpoint_on_stop)
    try:
        if on_start is not None:
            on_start(trainer.cfg)
        return trainer.run()
    finally:
        trainer.close()
