"""How transformers lays a causal LM's tensors out in a checkpoint, where that differs from its modules.

Two facts, each decided here and nowhere else:

- **Conv1D layout.** GPT-2-style models build some projections from transformers' `Conv1D`,
  which stores its weight `[d_in, d_out]` (`y = x W + b`), the transpose of `nn.Linear`'s
  `[d_out, d_in]`. A LoRA delta `s · B A` ([d_out, d_in]) lands on such a weight transposed.
  `CONV1D_MODULES` names those modules per `model_type`; a test checks it against the modeling
  source of every causal LM in the installed transformers.

- **Checkpoint keys.** Some architectures store a tensor under another key than the module that
  owns it: GPT-NeoX's head is the module `lm_head`, stored as `embed_out.weight`. transformers
  renames such keys when it loads (`transformers.conversion_mapping`: the transforms registered
  for the model's class and `model_type`, for each sub-model, plus the legacy ones) and renames
  them back when it saves. Adapters name modules (`lm_head`); merges must read and write the
  checkpoint's keys (`embed_out.weight`). `transformers_renames` applies transformers' own
  tables and its own renaming function, so the mapping is exactly what `from_pretrained` does.

  That costs what those tables cost: importing `transformers.conversion_mapping` imports torch
  and transformers' loading code (seconds, about 300 MB), and the transforms depend on the
  model's sub-modules, so the architecture is built once on the `meta` device (no weights). So
  the renames are looked up only when a name is not found as is (`BaseWeights.key`,
  `check_target_modules`), and the result is cached per config.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Iterable

# transformers' `Conv1D` modules (weight [d_in, d_out]) of each causal LM, by model_type
# (gpt-sw3 checkpoints load as `GPT2LMHeadModel`).
_GPT2_CONV1D = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
CONV1D_MODULES: dict[str, frozenset[str]] = {
    "gpt2": _GPT2_CONV1D,
    "gpt-sw3": _GPT2_CONV1D,
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
}


def is_conv1d(model_type: str | None, module: str) -> bool:
    """Whether `module` (a dotted module name or its last component) of a `model_type` model is a
    `Conv1D`, so that its weight is stored `[d_in, d_out]`."""
    return module.rsplit(".", 1)[-1] in CONV1D_MODULES.get(model_type or "", ())


def transformers_renames(config: dict, checkpoint_keys: Iterable[str]) -> dict[str, str]:
    """`{model key: checkpoint key}` for every checkpoint tensor transformers loads under another name.

    `config` is the checkpoint's config.json; `checkpoint_keys` its tensor names. Each key goes
    through what `from_pretrained` does to it (`convert_and_load_state_dict_in_model`): every
    `WeightRenaming` in turn, then at most one `WeightConverter`, in transformers' key order.
    Only one-to-one renames are returned; a tensor a `WeightConverter` fuses, splits or reshapes
    (MoE experts, fused projections) is not the same tensor under another name and is left out,
    as is everything when transformers cannot build the architecture (unknown or remote code).

    Imports transformers and torch on first use (see the module docstring).
    """
    loaded = _conversions(json.dumps(config, sort_keys=True))
    if loaded is None:
        return {}
    transforms, base_model_prefix, model_keys = loaded
    from copy import deepcopy

    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = deepcopy(transforms)  # renamings keep state across keys (GroupWeightRename)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamed = {}
    for key in sorted(checkpoint_keys, key=dot_natural_key):
        model_key, converted = rename_source_key(key, renamings, converters, base_model_prefix, model_keys)
        if model_key not in model_keys and key in model_keys:  # as transformers: keep a key the model has
            model_key, converted = rename_source_key(key, [], [], base_model_prefix, model_keys)
        if converted is None and model_key != key and model_key in model_keys:
            renamed[model_key] = key
    return renamed


@lru_cache(maxsize=16)
def _conversions(config_json: str):
    """(transforms, base_model_prefix, {model key: True}) for the causal LM `config_json` describes,
    or None when transformers cannot build it."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = json.loads(config_json)
    try:
        model_config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except Exception:  # noqa: BLE001 — unknown, remote-code or broken architecture: transformers renames nothing
        return None
    return get_model_conversion_mapping(model), model.base_model_prefix, dict.fromkeys(model.state_dict(), True)
