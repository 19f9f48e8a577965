"""Lean model runners over a flattened ragged batch, one class per architecture family.

A runner takes the weights of a transformers model (`from_pretrained`), keeps them in the layout
the engine computes fastest with (`Projection`: `Wᵀ` row-major, q|k|v and gate|up fused), drops the
transformers model, and runs `forward(batch)`:

    tokens [T], positions [T], per-token slots      the decode tokens of rows 0..B-1 first, then
                                                    each new prompt back to back
    -> logits [N, V] float32                        at each sequence's last token (decodes, then prompts)

Attention writes the new keys and values into the per-row KV cache, then attends batched for the
decode rows (SDPA over the cached prefix with a length mask; the query heads sharing a KV head are
folded into the query length) and causally per prompt. RoPE tables come from the model's own rotary
module, so its scaling variants carry over.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters.checkpoint import read_config
from adapters.errors import InputError
from serving.config import EngineConfig
from serving.kv_cache import KVCache
from serving.layers import Embedding, Projection
from serving.lora import LoraBatch


@dataclass
class ForwardBatch:
    tokens: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    lora: LoraBatch  # per-token slots
    num_decode: int  # tokens 0..B-1 are the next tokens of KV rows 0..B-1
    decode_mask: torch.Tensor | None  # [B, 1, 1, n] bool: key position < that row's length (this token included)
    prefills: list[tuple[int, int, int]]  # (KV row, first token, length) of each new prompt
    sample_index: torch.Tensor  # [N] the token whose logits each sequence samples from
    head_lora: LoraBatch  # the slots of the sampled tokens


def _t(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear's [d_out, d_in] weight as a row-major [d_in, d_out] copy."""
    return weight.detach().t().contiguous()


def _cat(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    if all(t is None for t in tensors):
        return None
    if any(t is None for t in tensors):
        raise InputError("a fused projection has a bias on some parts only; this layout is not supported")
    return torch.cat([t.detach() for t in tensors], dim=-1)


class CausalLM:
    """What every runner shares: embedding, head, KV cache, attention and the adapter-facing tables.

    `projections` maps a checkpoint module name to (`Projection`, part index): where an adapter's
    LoRA on that module goes; `embeddings` the same for token embeddings; `head` is "lm_head".
    """

    def __init__(self, hf_model, config: EngineConfig, *, layers: int, heads: int, kv_heads: int, head_dim: int,
                 max_model_len: int, names: dict[int, str]):
        self.device = next(hf_model.parameters()).device
        self.dtype = next(hf_model.parameters()).dtype
        self.slots, self.rank = config.max_loras + 1, config.max_lora_rank
        self.pack_rows = config.max_num_seqs  # the decode batch size once full (see `BaseMatmul`)
        self.num_layers, self.heads, self.kv_heads, self.head_dim = layers, heads, kv_heads, head_dim
        self.max_model_len = max_model_len
        self.projections: dict[str, tuple[Projection, int]] = {}
        self.embeddings: dict[str, Embedding] = {}
        self.names = names
        self.kv = KVCache(layers, config.max_num_seqs, kv_heads, max_model_len, head_dim,
                          dtype=self.dtype, device=self.device)
        self._rows = torch.arange(config.max_num_seqs, device=self.device)

    def projection(self, modules: list, weight_t: torch.Tensor, bias: torch.Tensor | None, *,
                   allocate: bool = True) -> Projection:
        parts = [(self.names[id(m)], self._out_features(m)) for m in modules]
        proj = Projection(weight_t, bias, parts, slots=self.slots, rank=self.rank, allocate=allocate,
                          pack_rows=self.pack_rows)
        for p, (name, _) in enumerate(parts):
            self.projections[name] = (proj, p)
        return proj

    @staticmethod
    def _out_features(module) -> int:
        return module.weight.shape[1] if type(module).__name__ == "Conv1D" else module.weight.shape[0]

    def embedding(self, module) -> Embedding:
        emb = Embedding(module.weight.detach(), self.names[id(module)], slots=self.slots, rank=self.rank)
        self.embeddings[emb.name] = emb
        return emb

    def head(self, module) -> Projection:
        """The LM head; a tied head gets its own transposed copy of the embedding."""
        weight_t = _t(module.weight)
        return self.projection([module], weight_t, None if module.bias is None else module.bias.detach(), allocate=False)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
               scale: float) -> torch.Tensor:
        """q [T, H, d], k, v [T, H_kv, d] -> [T, H·d]; stores k, v in the cache."""
        cache_k, cache_v = self.kv.k[layer], self.kv.v[layer]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        group = heads // kv_heads
        outs = []
        b = batch.num_decode
        if b:
            rows, pos = self._rows[:b], batch.positions[:b]
            cache_k[rows, :, pos] = k[:b]
            cache_v[rows, :, pos] = v[:b]
            n = batch.decode_mask.shape[-1]
            out = F.scaled_dot_product_attention(q[:b].view(b, kv_heads, group, dim), cache_k[:b, :, :n],
                                                 cache_v[:b, :, :n], attn_mask=batch.decode_mask, scale=scale)
            outs.append(out.reshape(b, heads * dim))
        for row, start, length in batch.prefills:
            qi, ki, vi = (t[start:start + length].transpose(0, 1) for t in (q, k, v))
            cache_k[row, :, :length] = ki
            cache_v[row, :, :length] = vi
            out = F.scaled_dot_product_attention(qi[None], ki[None], vi[None], is_causal=True, scale=scale,
                                                 enable_gqa=group > 1)
            outs.append(out[0].transpose(0, 1).reshape(length, heads * dim))
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class LlamaModel(CausalLM):
    """Llama family: RMSNorm, RoPE, grouped-query attention, gated MLP (Llama, Mistral, Qwen2 layouts)."""

    def __init__(self, hf_model, config: EngineConfig, max_model_len: int, names: dict[int, str]):
        from transformers.activations import ACT2FN

        cfg = hf_model.config
        heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        super().__init__(hf_model, config, layers=cfg.num_hidden_layers, heads=heads, kv_heads=kv_heads,
                         head_dim=head_dim, max_model_len=max_model_len, names=names)
        inner = hf_model.model
        self.eps = cfg.rms_norm_eps
        self.act = ACT2FN[cfg.hidden_act]
        self.scale = head_dim ** -0.5
        self.embed = self.embedding(inner.embed_tokens)
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
            self.layers.append(dict(
                in_norm=layer.input_layernorm.weight.detach(),
                qkv=self.projection([q, k, v], torch.cat([_t(q.weight), _t(k.weight), _t(v.weight)], 1),
                                    _cat(q.bias, k.bias, v.bias)),
                o=self.projection([attn.o_proj], _t(attn.o_proj.weight), _cat(attn.o_proj.bias)),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                gate_up=self.projection([mlp.gate_proj, mlp.up_proj],
                                        torch.cat([_t(mlp.gate_proj.weight), _t(mlp.up_proj.weight)], 1),
                                        _cat(mlp.gate_proj.bias, mlp.up_proj.bias)),
                down=self.projection([mlp.down_proj], _t(mlp.down_proj.weight), _cat(mlp.down_proj.bias)),
            ))
        self.norm = inner.norm.weight.detach()
        self.lm_head = self.head(hf_model.lm_head)
        positions = torch.arange(max_model_len, device=self.device)[None]
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device), positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        lora, hidden = batch.lora, self.embed.weight.shape[1]
        t = batch.tokens.shape[0]
        x = self.embed(batch.tokens, lora)
        cos, sin = self.cos[batch.positions][:, None, :], self.sin[batch.positions][:, None, :]
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (hidden,), layer["in_norm"], self.eps)
            q, k, v = layer["qkv"](h, lora)
            q = self._rope(q.view(t, self.heads, self.head_dim), cos, sin)
            k = self._rope(k.view(t, self.kv_heads, self.head_dim), cos, sin)
            attn = self.attend(i, q, k, v.view(t, self.kv_heads, self.head_dim), batch, self.scale)
            x = x + layer["o"](attn, lora)[0]
            h = F.rms_norm(x, (hidden,), layer["post_norm"], self.eps)
            gate, up = layer["gate_up"](h, lora)
            x = x + layer["down"](self.act(gate) * up, lora)[0]
        x = F.rms_norm(x[batch.sample_index], (hidden,), self.norm, self.eps)
        return self.lm_head(x, batch.head_lora)[0].float()


class GPT2Model(CausalLM):
    """GPT-2: learned positions, LayerNorm, fused `c_attn` (Conv1D, weights already `Wᵀ`), tied head."""

    def __init__(self, hf_model, config: EngineConfig, max_model_len: int, names: dict[int, str]):
        from transformers.activations import ACT2FN

        cfg = hf_model.config
        if getattr(cfg, "add_cross_attention", False):
            raise InputError("GPT-2 models with cross-attention are not supported by the loramill engine")
        heads = cfg.n_head
        super().__init__(hf_model, config, layers=cfg.n_layer, heads=heads, kv_heads=heads,
                         head_dim=cfg.n_embd // heads, max_model_len=max_model_len, names=names)
        inner = hf_model.transformer
        self.eps = cfg.layer_norm_epsilon
        self.act = ACT2FN[cfg.activation_function]
        base_scale = self.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        self.embed = self.embedding(inner.wte)
        self.wpe = inner.wpe.weight.detach()
        self.layers = []
        for i, block in enumerate(inner.h):
            attn, mlp = block.attn, block.mlp
            self.layers.append(dict(
                ln_1=(block.ln_1.weight.detach(), block.ln_1.bias.detach()),
                c_attn=self.projection([attn.c_attn], attn.c_attn.weight.detach(), attn.c_attn.bias.detach()),
                attn_proj=self.projection([attn.c_proj], attn.c_proj.weight.detach(), attn.c_proj.bias.detach()),
                ln_2=(block.ln_2.weight.detach(), block.ln_2.bias.detach()),
                c_fc=self.projection([mlp.c_fc], mlp.c_fc.weight.detach(), mlp.c_fc.bias.detach()),
                mlp_proj=self.projection([mlp.c_proj], mlp.c_proj.weight.detach(), mlp.c_proj.bias.detach()),
                scale=base_scale / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else base_scale,
            ))
        self.ln_f = (inner.ln_f.weight.detach(), inner.ln_f.bias.detach())
        self.lm_head = self.head(hf_model.lm_head)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        lora, hidden = batch.lora, self.embed.weight.shape[1]
        t = batch.tokens.shape[0]
        x = self.embed(batch.tokens, lora) + self.wpe[batch.positions]
        for i, layer in enumerate(self.layers):
            h = F.layer_norm(x, (hidden,), *layer["ln_1"], self.eps)
            q, k, v = (part.view(t, self.heads, self.head_dim) for part in layer["c_attn"](h, lora)[0].split(hidden, -1))
            x = x + layer["attn_proj"](self.attend(i, q, k, v, batch, layer["scale"]), lora)[0]
            h = F.layer_norm(x, (hidden,), *layer["ln_2"], self.eps)
            x = x + layer["mlp_proj"](self.act(layer["c_fc"](h, lora)[0]), lora)[0]
        x = F.layer_norm(x[batch.sample_index], (hidden,), *self.ln_f, self.eps)
        return self.lm_head(x, batch.head_lora)[0].float()


# model_type (config.json) -> runner. Everything else is refused by name.
ARCHITECTURES = {"llama": LlamaModel, "mistral": LlamaModel, "qwen2": LlamaModel, "gpt2": GPT2Model}


def resolve_device_dtype(config: EngineConfig, checkpoint_dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """CUDA when present (the checkpoint's half dtype, else bfloat16), else the CPU in float32."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.dtype != "auto":
        return device, getattr(torch, config.dtype)
    if device.type == "cpu":
        return device, torch.float32
    return device, torch.float16 if checkpoint_dtype == "float16" else torch.bfloat16


def check_architecture(hf_config: dict) -> str:
    """The checkpoint's model_type if the engine runs it; else `InputError` naming the architecture."""
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        arch = ", ".join(hf_config.get("architectures") or []) or "unknown"
        raise InputError(f"architecture {arch} (model_type {model_type!r}) is not supported by the loramill engine "
                         f"(supported: {', '.join(sorted(ARCHITECTURES))}); serve this base with vLLM instead",
                         param="base")
    return model_type


def load_model(base_dir: str | Path, config: EngineConfig) -> CausalLM:
    """Load a base checkpoint into its runner. Refuses unsupported architectures before loading weights."""
    from transformers import AutoModelForCausalLM

    base_dir = Path(base_dir)
    hf_config = read_config(base_dir)
    model_type = check_architecture(hf_config)
    device, dtype = resolve_device_dtype(config, hf_config.get("dtype") or hf_config.get("torch_dtype"))
    limit = hf_config.get("max_position_embeddings") or hf_config.get("n_positions")
    max_model_len = min(config.max_model_len or limit, limit)
    window = hf_config.get("sliding_window") if model_type == "mistral" or hf_config.get("use_sliding_window") else None
    if window and window < max_model_len:
        raise InputError(f"this base uses sliding-window attention ({window} tokens), which the loramill engine does "
                         f"not implement; set max_model_len to at most {window}", param="max_model_len")
    if max_model_len > config.max_num_batched_tokens:
        raise InputError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be at least max_model_len "
                         f"({max_model_len}), so that any prompt fits in one step", param="max_num_batched_tokens")
    hf_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval()
    names = {id(module): name for name, module in hf_model.named_modules()}
    with torch.no_grad():
        return ARCHITECTURES[model_type](hf_model, config, max_model_len, names)


def build_batch(decodes: list[tuple[int, int, int]], prefills: list[tuple[int, list[int], int]], *,
                device: torch.device, dtype: torch.dtype) -> ForwardBatch:
    """One step's batch. `decodes[i] = (token, position, slot)` of KV row i; `prefills = [(row, prompt, slot)]`."""
    tokens = [tok for tok, _, _ in decodes]
    positions = [pos for _, pos, _ in decodes]
    slots = [slot for _, _, slot in decodes]
    spans = []
    for row, prompt, slot in prefills:
        spans.append((row, len(tokens), len(prompt)))
        tokens.extend(prompt)
        positions.extend(range(len(prompt)))
        slots.extend([slot] * len(prompt))
    sample = list(range(len(decodes))) + [start + length - 1 for _, start, length in spans]
    decode_mask = None
    if decodes:
        lengths = torch.tensor(positions[:len(decodes)], device=device) + 1
        decode_mask = (torch.arange(int(lengths.max()), device=device)[None] < lengths[:, None])[:, None, None, :]
    return ForwardBatch(
        tokens=torch.tensor(tokens, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        lora=LoraBatch.build(slots, device, dtype),
        num_decode=len(decodes),
        decode_mask=decode_mask,
        prefills=spans,
        sample_index=torch.tensor(sample, dtype=torch.long, device=device),
        head_lora=LoraBatch.build([slots[i] for i in sample], device, dtype),
    )
