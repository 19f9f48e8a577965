"""Several adapters: linear, TIES, DARE (hand-computed on small tensors), SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.errors import InputError
from merge.methods import METHODS, DareLinear, DareTies, Linear, Ties, make_method
from merge.streaming import AdapterRef, merge_streaming
from tests.merge.helpers import PROBE, checkpoint_logits, load_checkpoint


def f32(rows):
    return np.array(rows, dtype=np.float32)


def test_linear_is_the_weighted_sum():
    got = Linear().combine([f32([1, -2]), f32([4, 8])], [0.5, -0.25], "t")
    assert np.array_equal(got, f32([0.5 - 1, -1 - 2]))


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    t1 = f32([[0.9, -0.1], [0.5, -0.8]])
    t2 = f32([[-0.2, -0.7], [0.6, 0.05]])
    t3 = f32([[-0.3, 0.4], [-0.1, -0.9]])
    # density 0.5: keep the 2 largest magnitudes of each task
    #   t1 -> [[0.9, 0], [0, -0.8]]   t2 -> [[0, -0.7], [0.6, 0]]   t3 -> [[0, 0.4], [0, -0.9]]
    # elected sign of the sums [[0.9, -0.3], [0.6, -1.7]]: [[+, -], [+, -]]
    # disjoint mean: [[0.9/1, -0.7/1], [0.6/1, (-0.8 - 0.9)/2]]
    got = Ties(density=0.5).combine([t1, t2, t3], [1.0, 1.0, 1.0], "t")
    np.testing.assert_allclose(got, f32([[0.9, -0.7], [0.6, -0.85]]), rtol=0, atol=1e-7)


def test_ties_weights_scale_the_task_vectors_before_election():
    # weight 3 on t2 flips the elected sign of the first entry: 1.0 - 3*0.5 < 0
    got = Ties(density=1.0).combine([f32([1.0, 1.0]), f32([-0.5, 1.0])], [1.0, 3.0], "t")
    np.testing.assert_allclose(got, f32([-1.5, (1.0 + 3.0) / 2]), rtol=0, atol=1e-7)


def _dare_mask(seed, index, tensor, shape, drop_rate):
    """What DARE draws: the same seeded generator the method documents."""
    import hashlib

    key = int.from_bytes(hashlib.sha256(tensor.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, index, key]).random(shape, dtype=np.float32) >= drop_rate


def test_dare_linear_drops_and_rescales():
    d1, d2 = f32(np.arange(1, 101).reshape(10, 10)), f32(-np.arange(1, 101).reshape(10, 10))
    got = DareLinear(drop_rate=0.75, seed=3).combine([d1, d2], [1.0, 0.5], "layer.weight")
    keep1, keep2 = _dare_mask(3, 0, "layer.weight", d1.shape, 0.75), _dare_mask(3, 1, "layer.weight", d2.shape, 0.75)
    expected = np.where(keep1, d1 * 4, 0) + 0.5 * np.where(keep2, d2 * 4, 0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert 0.1 < keep1.mean() < 0.4  # about 1 - p survive


def test_dare_ties_drops_then_elects():
    d1, d2 = f32([[2.0, 1.0], [3.0, -1.0]]), f32([[-1.0, 1.0], [-4.0, -2.0]])
    got = DareTies(drop_rate=0.5, seed=1).combine([d1, d2], [1.0, 1.0], "x")
    r1 = np.where(_dare_mask(1, 0, "x", (2, 2), 0.5), d1 * 2, 0)
    r2 = np.where(_dare_mask(1, 1, "x", (2, 2), 0.5), d2 * 2, 0)
    positive = (r1 + r2) >= 0
    agree1, agree2 = np.where(positive, r1 > 0, r1 < 0), np.where(positive, r2 > 0, r2 < 0)
    expected = (np.where(agree1, r1, 0) + np.where(agree2, r2, 0)) / np.maximum(agree1 + agree2, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_dare_is_reproducible_with_a_seed_and_differs_across_seeds():
    delta = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    a = DareLinear(drop_rate=0.5, seed=7).combine([delta], [1.0], "w")
    assert np.array_equal(a, DareLinear(drop_rate=0.5, seed=7).combine([delta], [1.0], "w"))
    assert not np.array_equal(a, DareLinear(drop_rate=0.5, seed=8).combine([delta], [1.0], "w"))
    assert not np.array_equal(a, DareLinear(drop_rate=0.5, seed=7).combine([delta], [1.0], "other"))


@pytest.mark.parametrize("name,options,message", [
    ("ties", {"drop_rate": 0.5}, "--drop-rate does not apply to method ties"),
    ("dare_linear", {"density": 0.5}, "--density does not apply"),
    ("linear", {"rank": 4}, "--rank does not apply"),
    ("ties", {"density": 1.5}, "--density must be in (0, 1]"),
    ("dare_ties", {"drop_rate": 1.0}, "--drop-rate must be in [0, 1)"),
    ("svd", {}, "method svd needs --rank"),
    ("slerp", {}, "unknown merge method 'slerp'"),
])
def test_method_options_are_checked(name, options, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")
                       .replace(")", r"\)")):
        make_method(name, **options)


def test_cli_choices_and_options_are_the_registry():
    from loramill.cli.merge_cmd import merge
    from merge.options import DTYPE_CHOICES, OUTPUT_DTYPES

    params = {p.name: p for p in merge.params}
    assert list(params["method"].type.choices) == list(METHODS)
    assert list(params["dtype"].type.choices) == ["auto", *OUTPUT_DTYPES] == list(DTYPE_CHOICES)
    declared = {p.name for m in METHODS.values() for p in m.parameters}
    assert declared == {"density", "drop_rate", "rank"} and declared <= set(params)


def test_methods_describe_their_flags_and_parameters_as_plain_data():
    import json

    from merge.options import describe

    data = json.loads(json.dumps(describe()))  # plain data all the way down
    assert list(data["methods"]) == list(METHODS) and data["default_method"] == "linear"
    assert data["dtypes"] == ["auto", "float32", "bfloat16", "float16"]
    assert data["seed"] == {"type": "integer", "description": data["seed"]["description"], "default": 0,
                            "minimum": 0, "maximum": 2**31 - 1}
    ties, svd = data["methods"]["ties"], data["methods"]["svd"]
    assert ties["parameters"]["density"] == {"type": "number", "description": ties["parameters"]["density"]["description"],
                                             "default": 0.2, "exclusiveMinimum": 0, "maximum": 1}
    assert svd["required"] == ["rank"] and svd["writes_adapter"] and not ties["writes_adapter"]
    assert data["methods"]["linear"]["exact"] and data["methods"]["linear"]["elementwise"]
    assert data["methods"]["dare_ties"]["uses_seed"] and not data["methods"]["ties"]["uses_seed"]


@pytest.mark.parametrize("name,options,message", [
    ("svd", {"rank": 2.5}, "--rank must be an integer, got 2.5"),
    ("svd", {"rank": 0}, "--rank must be at least 1, got 0"),
    ("ties", {"density": float("nan")}, "--density must be in (0, 1], got nan"),
    ("dare_linear", {"drop_rate": True}, "--drop-rate must be a number, got True"),
    ("linear", {"seed": -1}, "--seed must be in [0, 2147483647], got -1"),
])
def test_each_method_checks_its_own_parameters(name, options, message):
    import re

    with pytest.raises(InputError, match=re.escape(message)):
        make_method(name, **options)


def test_flags_not_names_decide():
    assert make_method("svd", rank=4).exact_for([2, 2]) and not make_method("svd", rank=3).exact_for([2, 2])
    assert make_method("linear").exact_for([64]) and not make_method("ties").exact_for([1])
    assert make_method("dare_linear", seed=3).describe() == {"name": "dare_linear", "drop_rate": 0.9, "seed": 3}
    assert make_method("ties", seed=3).describe() == {"name": "ties", "density": 0.2}


def _lora_factors(adapter, module):
    from safetensors.torch import load_file

    t = load_file(str(adapter / "adapter_model.safetensors"))
    return t[f"base_model.model.{module}.lora_B.weight"].double(), t[f"base_model.model.{module}.lora_A.weight"].double()


@pytest.fixture()
def two_adapters(make_base, make_adapter):
    base = make_base(arch="llama")
    first = make_adapter(base, seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    second = make_adapter(base, seed=2, r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj"])
    return base, first, second


def test_linear_of_two_adapters(two_adapters, tmp_path):
    base, first, second = two_adapters
    out = merge_streaming(base, [AdapterRef(first, 0.7), AdapterRef(second, -0.4)], tmp_path / "m").out_dir
    merged, original = load_checkpoint(out), load_checkpoint(base)
    module = "model.layers.1.self_attn.q_proj"
    b1, a1 = _lora_factors(first, module)
    b2, a2 = _lora_factors(second, module)
    expected = original[f"{module}.weight"].double() + 0.7 * (8 / 4) * b1 @ a1 - 0.4 * (4 / 2 ** 0.5) * b2 @ a2
    assert (merged[f"{module}.weight"].double() - expected).abs().max().item() <= 1e-6
    v = "model.layers.0.self_attn.v_proj"
    b1, a1 = _lora_factors(first, v)
    assert (merged[f"{v}.weight"].double() - original[f"{v}.weight"].double() - 0.7 * 2 * b1 @ a1).abs().max() <= 1e-6


def test_ties_and_dare_checkpoints_follow_the_method(two_adapters, tmp_path):
    base, first, second = two_adapters
    refs = [AdapterRef(first), AdapterRef(second)]
    module = "model.layers.0.self_attn.q_proj"
    original = load_checkpoint(base)[f"{module}.weight"].numpy()
    deltas = []
    for adapter, scale in ((first, 2.0), (second, 4 / 2 ** 0.5)):
        b, a = _lora_factors(adapter, module)
        deltas.append(((b @ a) * scale).float().numpy())
    for method, options in (("ties", {"density": 0.3}), ("dare_ties", {"drop_rate": 0.6, "seed": 5})):
        out = merge_streaming(base, refs, tmp_path / method, method=method, **options).out_dir
        expected = original + make_method(method, **options).combine(deltas, [1.0, 1.0], f"{module}.weight")
        np.testing.assert_allclose(load_checkpoint(out)[f"{module}.weight"].numpy(), expected, rtol=0, atol=1e-6)
    again = merge_streaming(base, refs, tmp_path / "again", method="dare_ties", drop_rate=0.6, seed=5).out_dir
    other = merge_streaming(base, refs, tmp_path / "other", method="dare_ties", drop_rate=0.6, seed=6).out_dir
    assert torch.equal(load_checkpoint(again)[f"{module}.weight"], load_checkpoint(tmp_path / "dare_ties")[f"{module}.weight"])
    assert not torch.equal(load_checkpoint(other)[f"{module}.weight"], load_checkpoint(again)[f"{module}.weight"])


def test_svd_at_full_rank_reproduces_the_combined_delta_and_peft_loads_it(two_adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, first, second = two_adapters
    refs = [AdapterRef(first, 0.7), AdapterRef(second, 0.3)]
    linear = merge_streaming(base, refs, tmp_path / "linear").out_dir
    svd = merge_streaming(base, refs, tmp_path / "svd", method="svd", rank=6).out_dir
    assert (svd / "adapter_config.json").exists() and not list(svd.glob("model-*.safetensors"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(svd))
    merged = model.merge_and_unload().state_dict()
    expected = load_checkpoint(linear)
    for name, tensor in expected.items():
        assert (merged[name] - tensor).abs().max().item() <= 1e-5, name
    with torch.no_grad():
        svd_logits = model.eval()(PROBE).logits
    assert (svd_logits - checkpoint_logits(linear)).abs().max().item() <= 1e-4

    truncated = merge_streaming(base, refs, tmp_path / "svd2", method="svd", rank=2).out_dir
    from safetensors.torch import load_file

    factors = load_file(str(truncated / "adapter_model.safetensors"))
    assert factors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 128)
    assert factors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (64, 2)
