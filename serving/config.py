"""EngineConfig: every knob of the serving engine in one dataclass.

The CLI (`loramill engine`) builds it from flags and `loramill.settings`; tests build it directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.errors import InputError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    """Limits and layout of one engine.

    `max_loras` device slots (slot 0, the base model, comes on top), each padded to `max_lora_rank`;
    `max_cpu_loras` adapters' converted weights kept in host memory. `max_num_seqs` KV-cache rows of
    `max_model_len` tokens each; `max_num_batched_tokens` tokens per forward pass. `dtype` "auto" is
    the checkpoint's dtype on CUDA and float32 on the CPU.
    """

    max_loras: int = 16
    max_cpu_loras: int = 64
    max_lora_rank: int = 16
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the base model's max_position_embeddings
    max_waiting: int = 1024
    max_saved_module_bytes: int = 512 * 1024 * 1024
    dtype: str = "auto"
    device: str | None = None  # None: cuda if available, else cpu
    threads: int | None = None  # torch intra-op threads; None: torch's default

    def validate(self) -> None:
        for name in ("max_loras", "max_cpu_loras", "max_lora_rank", "max_num_seqs", "max_num_batched_tokens",
                     "max_waiting"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}", param=name)
        if self.max_cpu_loras < self.max_loras:
            raise InputError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})",
                             param="max_cpu_loras")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InputError(f"max_model_len must be at least 2, got {self.max_model_len}", param="max_model_len")
        if self.max_saved_module_bytes < 0:
            raise InputError("max_saved_module_bytes must not be negative", param="max_saved_module_bytes")
        if self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}", param="dtype")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be at least 1, got {self.threads}", param="threads")
