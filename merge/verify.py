"""`verify_merge`: run a probe batch through base + adapters unmerged (PEFT) and through the
merged output, and compare.

The reference is the base in float32 with every adapter active at once, each LoRA's scaling
multiplied by its merge weight: exactly `W + Σ wᵢ sᵢ Bᵢ Aᵢ` applied on the fly. The candidate is
the written checkpoint loaded with plain `transformers` in its stored dtype (or, for a method
that writes an adapter, the base with the written adapter). Reported: the max absolute logit difference and the
perplexity of each on the probe. For exact methods (`linear`, `svd` at a rank that holds every
input) a difference above `RTOL[dtype] · max(1, max |reference logit|)` fails; for the others
(`ties`, `dare_*`, truncated `svd`) the figures are reported only.

`measure_int8` reports what an int8 export of a merged checkpoint costs, on the same probe.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import InputError
from adapters.peft_format import quiet_peft_model_init, read_adapter
from merge.methods import MergeMethod

RTOL = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
PROBE_TEXT = (
    "The merge writes W_eff = W_base + delta as a new checkpoint. Tenants download it and load it "
    "with transformers; its logits must match the unmerged adapter's.",
    "<|im_start|>user\nWhat is a low-rank adapter?<|im_end|>\n<|im_start|>assistant\nTwo small matrices "
    "whose product is added to a frozen weight.<|im_end|>\n",
)


class VerificationFailed(InputError):
    """The merged output's logits differ from the unmerged adapters' beyond tolerance."""


@dataclass(frozen=True)
class VerifyReport:
    max_abs_diff: float
    tolerance: float | None  # None: the method is not exact; nothing to fail on
    reference_perplexity: float
    merged_perplexity: float
    dtype: str

    @property
    def passed(self) -> bool:
        return self.tolerance is None or self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        limit = f"tolerance {self.tolerance:.2e}" if self.tolerance is not None else "inexact method, no tolerance"
        return (f"verify: max |logit diff| {self.max_abs_diff:.3e} ({self.dtype}, {limit}); perplexity on probe: "
                f"unmerged {self.reference_perplexity:.4f}, merged {self.merged_perplexity:.4f}")

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise VerificationFailed(f"verification failed, output discarded: {self.summary()}", code="verify_failed")


def _probe_ids(base_dir: Path, vocab_size: int):
    import torch
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        rows = [tokenizer(text, add_special_tokens=False)["input_ids"][:64] for text in PROBE_TEXT]
    except (OSError, ValueError):
        rows = []
    if not rows or min(map(len, rows)) < 2 or max(max(r) for r in rows) >= vocab_size:
        return torch.randint(0, vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    n = min(map(len, rows))
    return torch.tensor([r[:n] for r in rows])


def _logits_and_perplexity(model, ids) -> tuple:
    import torch

    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return logits, math.exp(loss.item())


def _reference(base_dir: Path, adapters):
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    infos = [read_adapter(ref.path) for ref in adapters]
    if any(info.saved_modules for info in infos) and (len(adapters) > 1 or float(adapters[0].weight) != 1.0):
        raise InputError("--verify has no unmerged reference for modules_to_save with several adapters or a weight other than 1")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    names = [f"a{i}" for i in range(len(adapters))]
    with quiet_peft_model_init():
        model = PeftModel.from_pretrained(model, str(adapters[0].path), adapter_name=names[0])
    for name, ref in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(str(ref.path), adapter_name=name)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, ref in zip(names, adapters, strict=True):
                if name in module.scaling:
                    module.scaling[name] *= float(ref.weight)
    model.base_model.set_adapter(names)
    return model.eval(), infos


def verify_merge(base_dir: str | Path, adapters, out_dir: str | Path, *, method: MergeMethod) -> VerifyReport:
    """Compare the merged output in `out_dir` with `base_dir` + `adapters` (`AdapterRef`s) unmerged.

    `method` is the one that wrote `out_dir`: its `writes_adapter` says how to load the output,
    its `exact_for(ranks)` whether a difference beyond tolerance fails.
    """
    import transformers

    from adapters.checkpoint import resolve_model_dir

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    base_dir, out_dir = resolve_model_dir(base_dir), Path(out_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on Conv1D and tied embeddings; we handle both
        return _compare(base_dir, adapters, out_dir, method)


def _compare(base_dir: Path, adapters, out_dir: Path, method: MergeMethod) -> VerifyReport:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference, infos = _reference(base_dir, adapters)
    if method.writes_adapter:
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        with quiet_peft_model_init():
            merged = PeftModel.from_pretrained(base, str(out_dir)).eval()
    else:
        merged = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype="auto").eval()
    exact = method.exact_for([info.max_rank for info in infos])
    dtype = str(next(merged.parameters()).dtype).removeprefix("torch.")
    ids = _probe_ids(base_dir, reference.config.vocab_size)
    ref_logits, ref_ppl = _logits_and_perplexity(reference, ids)
    out_logits, out_ppl = _logits_and_perplexity(merged, ids)
    diff = (ref_logits - out_logits).abs().max().item()
    tolerance = RTOL.get(dtype, RTOL["bfloat16"]) * max(1.0, ref_logits.abs().max().item()) if exact else None
    return VerifyReport(diff, tolerance, ref_ppl, out_ppl, dtype)


@dataclass(frozen=True)
class Int8Report:
    """What an int8 export costs: its size and the probe's perplexity before and after."""

    quantized: int  # tensors stored as int8
    bytes_before: int
    bytes_after: int
    merged_perplexity: float  # the merged checkpoint, float32
    int8_perplexity: float  # its int8 export, dequantized to float32

    def summary(self) -> str:
        change = (self.int8_perplexity / self.merged_perplexity - 1) * 100
        return (f"int8: {self.quantized} tensors quantized, {self.bytes_before / 1e9:.3f} GB -> "
                f"{self.bytes_after / 1e9:.3f} GB; perplexity on probe: merged {self.merged_perplexity:.4f}, "
                f"int8 {self.int8_perplexity:.4f} ({change:+.2f}%)")


def measure_int8(merged_dir: str | Path, exported) -> Int8Report:
    """Probe perplexity of the merged checkpoint at `merged_dir` and of its int8 export (`quantize.Int8Result`)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from merge.quantize import load_int8

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    ids = _probe_ids(Path(merged_dir), merged.config.vocab_size)
    _, merged_ppl = _logits_and_perplexity(merged, ids)
    _, int8_ppl = _logits_and_perplexity(load_int8(exported.out_dir), ids)
    return Int8Report(len(exported.quantized), exported.bytes_before, exported.bytes_after, merged_ppl, int8_ppl)
