"""`adapters.layouts` against the installed transformers: Conv1D modules and checkpoint key renames.

GPT-NeoX's head is the module `lm_head`, stored as `embed_out.weight`: adapters name the module,
merges must read and write the checkpoint key, so that plain transformers loads the result.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters.checkpoint import TensorInfo, check_target_modules, read_checkpoint
from adapters.errors import InputError
from adapters.layouts import CONV1D_MODULES, is_conv1d, transformers_renames
from adapters.peft_format import AdapterInfo, BaseWeights, LoraModule, bind_adapter, read_base, validate_adapter
from merge.streaming import AdapterRef, merge_streaming
from tests.merge.helpers import checkpoint_logits, save_peft_adapter, unmerged_logits


def _causal_lm_classes() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# ---- Conv1D -----------------------------------------------------------------------------------


def test_conv1d_table_is_what_the_modeling_sources_of_every_causal_lm_build():
    """Scan the file defining each causal-LM class for `self.<name> = Conv1D(`; the table must
    name exactly those modules, and none of them may also be an `nn.Linear` there."""
    import transformers

    defined_in: dict[str, str] = {}
    for path in (Path(transformers.__file__).parent / "models").glob("*/modeling_*.py"):
        text = path.read_text()
        for name in re.findall(r"^class (\w+)\(", text, re.M):
            defined_in[name] = text
    classes = _causal_lm_classes()
    unscanned = [cls for cls in classes.values() if cls not in defined_in]
    assert len(unscanned) < 0.05 * len(classes), f"most causal-LM classes must be found, missing {unscanned}"
    found = {}
    for model_type, cls in classes.items():
        source = defined_in.get(cls, "")
        conv1d = set(re.findall(r"self\.(\w+)\s*=\s*Conv1D\(", source))
        if conv1d:
            found[model_type] = conv1d
            linear = set(re.findall(r"self\.(\w+)\s*=\s*nn\.Linear\(", source))
            assert not conv1d & linear, f"{model_type}: {conv1d & linear} are both Conv1D and nn.Linear"
    assert found == {k: set(v) for k, v in CONV1D_MODULES.items()}


@pytest.mark.parametrize("model_type", sorted(CONV1D_MODULES))
def test_is_conv1d_agrees_with_the_module_types_transformers_builds(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, n_layer=2))
    modules = dict(model.named_modules())
    assert any(isinstance(m, Conv1D) for m in modules.values())
    for name, module in modules.items():
        if name:
            assert is_conv1d(model_type, name) == isinstance(module, Conv1D), name


# ---- checkpoint keys: every causal LM transformers renames --------------------------------------


def _models_with_renames() -> list[str]:
    """Causal-LM model types whose conversion tables hold a rename: looked up as transformers does,
    by class name and model_type, for the causal LM, its base model and its sub-configs."""
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    def renames(name) -> bool:
        return any(isinstance(t, WeightRenaming) for t in get_checkpoint_conversion_mapping(name) or [])

    found = []
    for model_type, cls in _causal_lm_classes().items():
        names = {cls, model_type, MODEL_MAPPING_NAMES.get(model_type)}
        try:
            config = AutoConfig.for_model(model_type)
            names |= {getattr(sub, "model_type", None) for sub in getattr(config, "sub_configs", {}).values()}
        except Exception:  # noqa: BLE001 — transformers cannot build its own default config
            pass
        if any(name and renames(name) for name in names):
            found.append(model_type)
    return found


def _meta_model(model_type: str):
    """The causal LM on the meta device (two layers where the config allows), or None when
    transformers cannot build it from its defaults."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for overrides in ({"num_hidden_layers": 2}, {}):
        try:
            config = AutoConfig.for_model(model_type, **overrides)
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config)
        except Exception:  # noqa: BLE001 — missing optional dependency or a broken default config
            continue
    return None


def _renamed_targets(model) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict]:
    """`{module: (checkpoint key, weight shape)}` for every LoRA-targetable module whose weight
    transformers saves under another key (`save_pretrained`'s own renaming), and the saved state."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.pytorch_utils import Conv1D

    state = model.state_dict()
    saved = revert_weight_conversion(model, dict(state))
    by_tensor = {id(t): key for key, t in saved.items()}
    targets = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, Conv1D)):
            key = by_tensor.get(id(state.get(f"{name}.weight")))
            if key is not None and key != f"{name}.weight":
                targets[name] = (key, tuple(module.weight.shape))
    return targets, saved


def _info(name: str, shape: tuple[int, ...]) -> TensorInfo:
    """A float32 tensor's header entry (no file behind it: binding reads shapes only)."""
    return TensorInfo(name, Path("header-only.safetensors"), "F32", tuple(shape), 0, 4 * math.prod(shape))


def test_every_causal_lm_that_transformers_renames_binds_lora_and_saved_modules_to_its_checkpoint_keys():
    """For each such architecture: a LoRA on every renamed module, and a `modules_to_save` copy of
    it, bind to the key transformers writes for it, through `transformers_renames`."""
    covered, unbuildable = {}, []
    for model_type in _models_with_renames():
        model = _meta_model(model_type)
        if model is None:
            unbuildable.append(model_type)
            continue
        targets, saved = _renamed_targets(model)
        if not targets:
            continue
        config = model.config.to_dict()
        base = BaseWeights(Path(model_type), config, {k: _info(k, tuple(t.shape)) for k, t in saved.items()}, None)
        loras = {}
        for module, (_, shape) in targets.items():
            embedding = isinstance(model.get_submodule(module), torch.nn.Embedding)
            d_out, d_in = (shape[::-1] if embedding or is_conv1d(config.get("model_type"), module) else shape)
            a, b = _info(f"{module}.a", (2, d_in)), _info(f"{module}.b", (d_out, 2))
            loras[module] = LoraModule(module, "embedding" if embedding else "linear", a, b, 2, 2.0, 1.0)
        saved_modules = {f"{module}.weight": _info(f"{module}.weight", shape) for module, (_, shape) in targets.items()}
        adapter = AdapterInfo(Path("adapter"), {}, Path("adapter.safetensors"), loras, saved_modules)

        bound = {b.lora.module: b.tensor for b in bind_adapter(adapter, base)}
        assert bound == {module: key for module, (key, _) in targets.items()}, model_type
        assert {base.key(name) for name in saved_modules} == set(bound.values()), model_type
        covered[model_type] = len(targets)
    print(f"covered {covered}; transformers cannot build {unbuildable}")
    assert covered.get("gpt_neox") == 1  # lm_head <- embed_out.weight
    assert len(covered) >= 10
    # transformers 5.24 cannot build these from their defaults here (gemma3n needs PIL; qwen4_exp's default config fails)
    assert set(unbuildable) <= {"gemma3n", "qwen4_exp"}, unbuildable


def test_a_tensor_transformers_converts_is_not_a_rename():
    """Mixtral's per-expert checkpoint tensors are fused on load: not one tensor under another name."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("mixtral", num_hidden_layers=1, num_local_experts=2).to_dict()
    keys = ["model.layers.0.block_sparse_moe.experts.0.w1.weight", "model.layers.0.block_sparse_moe.gate.weight",
            "model.layers.0.self_attn.q_proj.weight"]
    assert transformers_renames(config, keys) == {"model.layers.0.mlp.gate.weight": keys[1]}


def test_unknown_architectures_rename_nothing():
    assert transformers_renames({"model_type": "no-such-model"}, ["embed_out.weight"]) == {}
    assert transformers_renames({}, ["embed_out.weight"]) == {}


# ---- GPT-NeoX end to end -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def neox(make_base) -> Path:
    return make_base(arch="gpt_neox")


def test_gpt_neox_base_stores_its_head_as_embed_out(neox):
    keys = read_checkpoint(neox)
    assert "embed_out.weight" in keys and "lm_head.weight" not in keys
    assert read_base(neox).key("lm_head.weight") == "embed_out.weight"


@pytest.mark.parametrize("lora", [
    dict(target_modules=["query_key_value", "lm_head"]),
    dict(target_modules=["dense_h_to_4h"], modules_to_save=["lm_head"]),
], ids=["lora-on-head", "head-in-modules-to-save"])
def test_gpt_neox_merge_equals_unmerged_peft_and_keeps_the_checkpoint_keys(neox, lora, tmp_path):
    adapter = save_peft_adapter(neox, tmp_path / "adapter", r=4, lora_alpha=8, **lora)
    assert validate_adapter(adapter, neox, max_rank=8)
    out = merge_streaming(neox, [AdapterRef(adapter)], tmp_path / "merged").out_dir

    assert set(read_checkpoint(out)) == set(read_checkpoint(neox))
    merged, reference = checkpoint_logits(out), unmerged_logits(neox, adapter)
    assert (merged - reference).abs().max().item() <= 1e-4
    assert (merged - checkpoint_logits(neox)).abs().max().item() > 1e-2  # the adapter does change the model


def test_gpt_neox_targets_are_checked_by_module_name(neox):
    check_target_modules(neox, ["query_key_value", "lm_head", "gpt_neox.layers.0.mlp.dense_4h_to_h"])
    with pytest.raises(InputError, match=r"unknown target module 'warp_drive'; this base has .*lm_head"):
        check_target_modules(neox, ["lm_head", "warp_drive"])


def test_an_adapter_naming_the_stored_key_binds_as_is(neox, tmp_path):
    """Adapters trained on transformers 4, where GPT-NeoX's head module was `embed_out`."""
    adapter = save_peft_adapter(neox, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["lm_head"])
    weights = adapter / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({k.replace(".lm_head.", ".embed_out."): v for k, v in load_file(str(weights)).items()}, str(weights))
    bound = bind_adapter(validate_adapter(adapter, neox, max_rank=8), read_base(neox))
    assert [b.tensor for b in bound] == ["embed_out.weight"]


def test_names_found_as_stored_never_import_transformers(llama_base, tmp_path):
    """The renames cost an import of transformers and torch: a base whose adapter names are all
    stored as is (every Llama, GPT-2) never pays it."""
    adapter = save_peft_adapter(llama_base, tmp_path / "adapter", r=4, lora_alpha=8,
                                target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    code = f"""
import json, sys
from pathlib import Path
from adapters.checkpoint import check_target_modules
from adapters.peft_format import validate_adapter
validate_adapter({str(adapter)!r}, {str(llama_base)!r}, max_rank=8)
check_target_modules(Path({str(llama_base)!r}), ["q_proj", "lm_head"])
print(json.dumps(sorted(m for m in ("torch", "transformers") if m in sys.modules)))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
