"""loramill's serving engine: one resident base model, many LoRA adapters batched into one forward pass.

`loramill engine --base PATH` runs it as an HTTP server speaking the part of vLLM's OpenAI-compatible
protocol that multi-LoRA serving uses, so the control plane (`service/`) drives it and a vLLM server
(`--enable-lora`, `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`) interchangeably. The engine knows models,
KV caches, adapter slots and sampling; it knows no tenants, keys or database. The OpenAI `user` field
is its only notion of who asks: the fairness key.

Modules, bottom-up (each imports only those above it, plus `adapters/`, torch and transformers):

    config.py       EngineConfig: every knob (slots, ranks, batch limits, dtype, device)
    errors.py       the request errors the HTTP layer maps to 4xx/5xx in OpenAI's error shape
    lora.py         batched LoRA: `LoraBatch` (per-step plan derived from the per-token slot index)
                    and `add_lora`, the one function a fused kernel replaces (kernel chosen per device)
    layers.py       `Projection` (base weight + per-slot LoRA stacks), `Embedding`, per-slot saved copies
    kv_cache.py     the per-row static KV cache
    models.py       lean model runners (Llama family, GPT-2) over a flattened ragged batch
    adapter_cache.py  PEFT adapters read, checked, converted; host LRU (`max_cpu_loras`) over device
                    slots (`max_loras`) with pins
    sampling.py     SamplingParams and the batched sampler (greedy, temperature, top-k/p, seeds, logprobs)
    detokenizer.py  incremental detokenization (never splits a UTF-8 character) and stop strings
    scheduler.py    fair admission (per-user, per-adapter virtual time), rows, token budget
    engine.py       `Engine` (synchronous core: add, abort, step) and `AsyncEngine` (engine thread + asyncio)
    metrics.py      Prometheus metrics on a registry of the engine's own
    protocol.py     OpenAI request parsing/validation and response shapes
    server.py       the FastAPI app: completions, chat, models, LoRA load/unload, health, metrics

Batched LoRA. For a target module with base `y = x Wᵀ`, every token t adds its own adapter:
`y_t += s_σ(t) · (x_t A_σ(t)ᵀ) B_σ(t)ᵀ`, σ(t) the token's slot. Each module holds stacks for `S = max_loras + 1`
slots, logically `A[S, r_max, d_in]`, `B[S, d_out, r_max]`, ranks zero-padded to `r_max = max_lora_rank`,
the scale folded into B. Slot 0 stays all zeros: the base model. Base weights are never modified.
Storage is transposed for row-major GEMMs (`A` as `[d_in, S·P·r_max]`, slot-major, for the P outputs
sharing an input, e.g. q|k|v; `B` as `[S·r_max, d_out]` per output), because on the serving issue's CPU
`x @ Wᵀ` with `Wᵀ` stored `[d_in, d_out]` ran about 1.6x faster than `F.linear` at decode batch sizes; base
weights are stored the same way (GPT-2's Conv1D already is). For the full decode batch (`max_num_seqs`
rows), the most frequent shape, each float32 CPU base projection uses the fastest of three GEMM kernels on
this machine, measured at load (`BaseMatmul`: row-major, transposed-B BLAS, or MKL's packed SGEMM).
The layers' only extra input is the per-token slot index. Once per step it becomes a `LoraBatch` plan:
tokens in long runs of one slot (a prefill) form segments, each two small GEMMs against that slot's
A and B (SGMV-like); the remaining tokens (decodes, one per sequence) take a dense path, one GEMM
against all slots `1..hi` in use, a one-hot slot mask, one GEMM back (BGMV-like, no gathers).
Embedding LoRA gathers `A` per token; the head is a `Projection` like any other.
`modules_to_save` on the embedding or head get a per-slot copy within `max_saved_module_bytes`;
any other saved module is refused with a message naming it and saying to merge instead.

Adapter cache (vLLM lora/ style). `/v1/load_lora_adapter` reads and checks an adapter (headers, ranks
against `max_lora_rank`, shapes against the base) and converts its weights on a loader thread into the
host LRU (`max_cpu_loras`); names stay registered after host eviction and are re-read on demand, also
on the loader thread, so disk reads never stall decoding. A request is admitted only when its adapter
is in a device slot or can take one: a free slot, or the least recently used slot no running
request pins. Copying host tensors into a slot is a memcpy between steps.

KV cache and batch. Per-row static cache `K, V[L, max_num_seqs, H_kv, max_model_len, d_head]`;
running sequences occupy rows `0..B-1` (a finished row is filled by moving the last row into it).
A step is one flattened ragged batch: first one decode token per running row, then the prompts of
newly admitted sequences back to back (no padding). Linear layers run on all tokens at once;
attention runs batched for the decode rows (SDPA over the cache with a length mask; grouped query
heads folded into the query length) and per sequence, causally, for prefills. Logits are computed
only at each sequence's last token.

Scheduler. Continuous batching: between steps, finished and aborted sequences leave and waiting ones
join, bounded by `max_num_seqs` rows, `max_num_batched_tokens` tokens per step and the adapter slots
(a request whose adapter cannot get a slot waits; others pass it). Admission order is start-time fair
queuing over `user`s, then over adapters within a user, so one flood cannot starve others. A request
whose client disconnects is aborted and its row freed before the next step.

Sampling is per row: greedy, or temperature/top-k/top-p with a per-request `torch.Generator` (seeded
from `seed` when given), so a seeded request samples the same tokens whatever shares its batch.
"""
