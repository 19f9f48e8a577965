"""`loramill base create`: small random-initialised causal LMs in the Hugging Face layout.

Three families cover the layouts real checkpoints have: Llama (separate q/k/v/o and gate/up/down
`nn.Linear`s, RMSNorm, grouped-query attention), GPT-2 (fused `c_attn`, `Conv1D` weights stored
transposed as `[d_in, d_out]`) and GPT-NeoX (fused `query_key_value` `nn.Linear`, and a head module
`lm_head` that transformers stores under another key, `embed_out.weight`). Any may tie `lm_head`
to the token embedding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from adapters.errors import InputError
from adapters.tokenizer import byte_tokenizer_vocab_size, save_byte_tokenizer

ARCHS = ("llama", "gpt2", "gpt_neox")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class BaseModelSpec:
    """Shape of a base model. Defaults train in seconds on a CPU (Llama: 451,200 parameters).

    `kv_heads` applies to Llama only; GPT-2 and GPT-NeoX have one key/value head per query head,
    so theirs is set to `heads`.
    """

    arch: str = "llama"
    tie_embeddings: bool = False
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 352
    vocab: int = 320
    max_positions: int = 512
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch != "llama":
            object.__setattr__(self, "kv_heads", self.heads)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise InputError(f"unknown arch {self.arch!r}; expected one of {', '.join(ARCHS)}", param="arch")
        for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "max_positions"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}", param=name)
        if self.hidden % self.heads:
            raise InputError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})", param="heads")
        if self.heads % self.kv_heads:
            raise InputError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})", param="kv_heads")
        if self.vocab < byte_tokenizer_vocab_size():
            raise InputError(
                f"vocab must be at least {byte_tokenizer_vocab_size()} (256 bytes + special tokens), got {self.vocab}",
                param="vocab",
            )
        if self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}", param="dtype")


def _config(spec: BaseModelSpec, tok):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # Fan-in scale (1/sqrt(hidden)) rather than transformers' fixed 0.02: with a frozen random
    # norm and head, 0.02 caps the reachable logit margin so low that no adapter can be confident.
    special["initializer_range"] = spec.hidden ** -0.5
    if spec.arch == "llama":
        return LlamaConfig(
            vocab_size=spec.vocab,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            max_position_embeddings=spec.max_positions,
            tie_word_embeddings=spec.tie_embeddings,
            **special,
        )
    if spec.arch == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=spec.vocab,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            max_position_embeddings=spec.max_positions,
            tie_word_embeddings=spec.tie_embeddings,
            **special,
        )
    return GPT2Config(
        vocab_size=spec.vocab,
        n_embd=spec.hidden,
        n_layer=spec.layers,
        n_head=spec.heads,
        n_inner=spec.intermediate,
        n_positions=spec.max_positions,
        tie_word_embeddings=spec.tie_embeddings,
        **special,
    )


def create_base_model(out_dir: str | Path, spec: BaseModelSpec = BaseModelSpec(), *, overwrite: bool = False) -> Path:
    """Write a random-initialised model, its tokenizer and generation config to `out_dir`.

    Written into a temporary sibling directory and renamed, so a half-written model never
    looks finished. Refuses an existing non-empty `out_dir` unless `overwrite`.
    """
    from adapters.fsutil import atomic_directory

    spec.validate()
    out = Path(out_dir)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        import torch  # after the checks above, so bad options fail at once
        from transformers import AutoModelForCausalLM, GenerationConfig

        tok = save_byte_tokenizer(tmp, model_max_length=spec.max_positions)
        config = _config(spec, tok)
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec.dtype))
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=[tok.eos_token_id, tok.bos_token_id],
            pad_token_id=tok.pad_token_id,
            do_sample=False,
            max_new_tokens=64,
        )
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "loramill-base.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
        for file in tmp.iterdir():  # safetensors writes its files 0600; a shared model dir must be readable
            file.chmod(0o644)
    return out
