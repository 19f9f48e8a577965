"""Real PEFT adapters for tests: `get_peft_model` + seeded random LoRA weights + `save_pretrained`."""

from __future__ import annotations

from pathlib import Path

import torch

PROBE = torch.tensor([[256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 257, 10],
                      [258, 117, 115, 101, 114, 10, 50, 43, 50, 61, 63, 257, 10, 258, 97, 115]])


def save_peft_adapter(base: Path, out: Path, *, seed: int = 0, std: float = 0.05, dtype=None, **lora) -> Path:
    """Write a PEFT LoRA adapter for `base` with random (seeded) A, B and modules_to_save copies.

    lora_B is zero at PEFT's init, so every LoRA and saved-module tensor is overwritten with
    `N(0, std²)` noise (saved modules: base + noise) from a generator seeded with `seed`.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or "auto")
    peft_model = get_peft_model(model, LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            if "lora_" in name:
                param.copy_(noise)
            elif "modules_to_save" in name:
                param.add_(noise.to(param.dtype))
    peft_model.save_pretrained(str(out))
    return out


def unmerged_logits(base: Path, adapter: Path, ids=PROBE):
    """Logits of base (float32) + adapter applied by PEFT without merging."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter))
    with torch.no_grad():
        return model.eval()(ids).logits


def checkpoint_logits(path: Path, ids=PROBE, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    with torch.no_grad():
        return model.eval()(ids).logits.float()


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors
