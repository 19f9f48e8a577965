"""Int8 weight-only export: per-output-channel scales, a loader, and the perplexity change."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from adapters.checkpoint import read_checkpoint
from merge.quantize import export_int8, load_int8, quantize_rows
from merge.streaming import AdapterRef, merge_streaming
from tests.merge.helpers import PROBE, load_checkpoint


def test_quantize_rows_is_symmetric_per_output_channel():
    w = np.array([[0.5, -1.27, 0.0], [0.0, 0.0, 0.0], [2.54, 1.0, -0.3]], dtype=np.float32)
    q, scale = quantize_rows(w, axis=1)
    np.testing.assert_allclose(scale[:, 0], [0.01, 1.0, 0.02], rtol=1e-6)
    assert q.dtype == np.int8 and q.tolist() == [[50, -127, 0], [0, 0, 0], [127, 50, -15]]
    assert np.abs(q * scale - w).max() <= scale.max() / 2 + 1e-7


def _perplexity(model) -> float:
    with torch.no_grad():
        logits = model(PROBE).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), PROBE[:, 1:].reshape(-1))
    return math.exp(loss.item())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_int8_export_loads_and_stays_close(arch, make_base, make_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    base = make_base(arch=arch)
    targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    merged = merge_streaming(base, [AdapterRef(make_adapter(base, r=4, lora_alpha=8, target_modules=targets))],
                             tmp_path / "merged").out_dir
    result = export_int8(merged, tmp_path / "int8")
    tensors = read_checkpoint(result.out_dir)
    for name in result.quantized:
        assert tensors[name].dtype == "I8" and tensors[name + "_scale"].dtype == "F32"
    assert "lm_head.weight" in result.quantized and not any("embed_tokens" in n or "wte" in n for n in result.quantized)
    assert result.bytes_after < 0.45 * result.bytes_before
    manifest = json.loads((result.out_dir / "loramill-manifest.json").read_text())
    assert {f["name"] for f in manifest["files"]} >= {"model-00001-of-00001.safetensors", "config.json", "loramill-int8.json"}

    original = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    restored = load_int8(result.out_dir)
    weights = load_checkpoint(merged)
    for name, param in restored.state_dict().items():
        if name in result.quantized:
            w = weights[name]
            axis = 0 if arch == "gpt2" and "transformer.h" in name else 1
            step = w.abs().amax(dim=axis, keepdim=True) / 127
            assert ((param - w).abs() <= step / 2 + 1e-7).all(), name
    ppl_float, ppl_int8 = _perplexity(original), _perplexity(restored)
    print(f"int8 {arch}: perplexity on probe {ppl_float:.4f} -> {ppl_int8:.4f}")
    assert abs(ppl_int8 - ppl_float) / ppl_float < 0.01, (ppl_float, ppl_int8)
