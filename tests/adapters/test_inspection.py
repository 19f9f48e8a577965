"""`adapters.inspection`: counts against transformers, shape checks, sharding, header-only reads."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapters.errors import InputError
from adapters.inspection import GROUPS, inspect_checkpoint, tensor_group

BASES = [
    pytest.param(dict(arch="llama", tie_embeddings=False), id="llama-untied"),
    pytest.param(dict(arch="llama", tie_embeddings=True), id="llama-tied"),
    pytest.param(dict(arch="gpt2", tie_embeddings=False), id="gpt2-untied"),
    pytest.param(dict(arch="gpt2", tie_embeddings=True), id="gpt2-tied"),
]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tamper(model_dir: Path, name: str, shape: tuple[int, ...]) -> None:
    """Rewrite model.safetensors with tensor `name` replaced by a zero tensor of `shape`."""
    file = model_dir / "model.safetensors"
    tensors = load_file(file)
    assert name in tensors
    tensors[name] = torch.zeros(shape, dtype=tensors[name].dtype)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("spec", BASES)
def test_total_equals_transformers_parameter_count(make_base, spec):
    base = make_base(**spec)
    report = inspect_checkpoint(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    assert report.total_parameters == sum(p.numel() for p in model.parameters())
    assert report.total_parameters == sum(g.parameters for g in report.groups.values())
    assert report.tied_head is spec["tie_embeddings"]
    assert report.problems == []
    # each group holds what transformers holds under the matching modules
    emb = model.get_input_embeddings().weight.numel()
    if spec["arch"] == "gpt2":
        emb += model.transformer.wpe.weight.numel()
    assert report.groups["embedding"].parameters == emb
    assert report.groups["lm_head"].parameters == (0 if spec["tie_embeddings"] else model.lm_head.weight.numel())
    norm = sum(p.numel() for n, p in model.named_parameters() if "norm" in n or ".ln_" in n)
    assert report.groups["norm"].parameters == norm
    attn = sum(p.numel() for n, p in model.named_parameters() if "attn" in n)
    assert report.groups["attention"].parameters == attn
    assert report.groups["other"].tensors == 0


def test_tied_head_saved_anyway_is_counted_once(make_base, tmp_path):
    """Some checkpoints store lm_head.weight although tie_word_embeddings=true: transformers
    ties it to the embedding, so it is one parameter matrix, not two."""
    base = _copy(make_base(arch="llama", tie_embeddings=True), tmp_path / "m")
    tensors = load_file(base / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    report = inspect_checkpoint(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    assert report.tied_head
    assert report.total_parameters == sum(p.numel() for p in model.parameters())
    head = next(t for t in report.tensors if t.name == "lm_head.weight")
    assert head.group == "lm_head" and not head.counted


@pytest.mark.parametrize(
    "arch,name,bad_shape,expected",
    [
        ("llama", "model.layers.1.self_attn.k_proj.weight", (48, 128), (64, 128)),
        ("llama", "model.layers.0.mlp.down_proj.weight", (352, 128), (128, 352)),
        ("llama", "model.embed_tokens.weight", (300, 128), (320, 128)),
        # GPT-2 Conv1D is [d_in, d_out]: the nn.Linear orientation is wrong here
        ("gpt2", "transformer.h.0.mlp.c_fc.weight", (352, 128), (128, 352)),
        ("gpt2", "transformer.h.1.attn.c_attn.weight", (384, 128), (128, 384)),
    ],
)
def test_tampered_shape_is_reported_by_name(make_base, tmp_path, arch, name, bad_shape, expected):
    base = _copy(make_base(arch=arch), tmp_path / "m")
    _tamper(base, name, bad_shape)
    report = inspect_checkpoint(base)
    assert len(report.problems) == 1, report.problems
    (problem,) = report.problems
    assert problem.tensor == name
    assert problem.expected == expected and problem.actual == bad_shape
    assert name in problem.message and str(list(expected)) in problem.message and str(list(bad_shape)) in problem.message


def test_wrong_config_is_reported_against_every_tensor_it_breaks(make_base, tmp_path):
    base = _copy(make_base(arch="llama"), tmp_path / "m")
    config = json.loads((base / "config.json").read_text())
    config["intermediate_size"] = 256
    (base / "config.json").write_text(json.dumps(config))
    report = inspect_checkpoint(base)
    names = {p.tensor for p in report.problems}
    assert names == {f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 1) for p in ("gate", "up", "down")}


@pytest.mark.parametrize(
    "change,fragment",
    [
        (dict(num_attention_heads=5, head_dim=None), "hidden_size (128) is not a multiple of num_attention_heads (5)"),
        (dict(num_key_value_heads=3), "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
        (dict(intermediate_size=None), "config.json lacks intermediate"),
    ],
)
def test_inconsistent_config_is_one_problem(make_base, tmp_path, change, fragment):
    base = _copy(make_base(arch="llama"), tmp_path / "m")
    config = json.loads((base / "config.json").read_text()) | change
    (base / "config.json").write_text(json.dumps(config))
    (problem,) = inspect_checkpoint(base).problems
    assert fragment in problem.message and problem.tensor is None


def test_layer_count_disagreement(make_base, tmp_path):
    base = _copy(make_base(arch="llama"), tmp_path / "m")
    config_path = base / "config.json"
    config = json.loads(config_path.read_text())

    config["num_hidden_layers"] = 1  # checkpoint has layers 0 and 1
    config_path.write_text(json.dumps(config))
    (problem,) = inspect_checkpoint(base).problems
    assert "layer 1" in problem.message and problem.tensor.startswith("model.layers.1.")

    config["num_hidden_layers"] = 3  # layer 2 has no tensors
    config_path.write_text(json.dumps(config))
    (problem,) = inspect_checkpoint(base).problems
    assert problem.tensor == "model.layers.2" and "no tensors" in problem.message


def test_tensor_missing_from_one_layer(make_base, tmp_path):
    base = _copy(make_base(arch="gpt2"), tmp_path / "m")
    tensors = load_file(base / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    (problem,) = inspect_checkpoint(base).problems
    assert problem.tensor == "transformer.h.1.mlp.c_fc.bias"


def test_untied_config_without_head_tensor(make_base, tmp_path):
    base = _copy(make_base(arch="llama", tie_embeddings=True), tmp_path / "m")
    config = json.loads((base / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (base / "config.json").write_text(json.dumps(config))
    report = inspect_checkpoint(base)
    assert not report.tied_head
    assert [p.tensor for p in report.problems] == ["lm_head.weight"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sharded_checkpoint_gives_the_same_report(make_base, tmp_path, arch):
    base = make_base(arch=arch)
    model = AutoModelForCausalLM.from_pretrained(base)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="300KB")
    shutil.copy(base / "config.json", sharded / "config.json")
    assert (sharded / "model.safetensors.index.json").exists()

    one, many = inspect_checkpoint(base), inspect_checkpoint(sharded)
    assert len(many.files) > 2 and len(one.files) == 1
    strip = lambda r: [(t.name, t.group, t.shape, t.dtype, t.counted) for t in r.tensors]  # noqa: E731
    assert strip(many) == strip(one)
    assert many.groups == one.groups
    assert many.total_parameters == one.total_parameters
    assert many.tied_head == one.tied_head
    assert many.problems == [] == one.problems
    assert len({t.file for t in many.tensors}) == len(many.files)


def test_sharded_tampered_shape_names_tensor(make_base, tmp_path):
    base = make_base(arch="llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="300KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shard = sharded / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = torch.zeros(350, 128)
    save_file(tensors, shard, metadata={"format": "pt"})
    (problem,) = inspect_checkpoint(sharded).problems
    assert problem.tensor == name and problem.actual == (350, 128) and problem.expected == (352, 128)


# --- header-only: a 70B checkpoint's headers, backed by sparse files --------------------------

LLAMA_70B = dict(hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=128256, layers=80)


def _llama_tensors(hidden, heads, kv_heads, intermediate, vocab, layers) -> dict[str, tuple[int, ...]]:
    hd = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * hd, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * hd, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * hd),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    return shapes


def _write_sparse_safetensors(file: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """A valid safetensors file (BF16) whose data region is a hole: header written, size set."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return offset


def test_70b_headers_are_read_without_touching_tensor_data(tmp_path):
    shapes = _llama_tensors(**LLAMA_70B)
    names = list(shapes)
    shards = [names[i::30] for i in range(30)]
    weight_map, claimed = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-00030.safetensors"
        claimed += _write_sparse_safetensors(tmp_path / file, {n: shapes[n] for n in shard})
        weight_map |= {n: file for n in shard}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": claimed}, "weight_map": weight_map}))
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=8192, num_attention_heads=64,
                  num_key_value_heads=8, intermediate_size=28672, vocab_size=128256, num_hidden_layers=80,
                  tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    on_disk = sum(f.stat().st_blocks * 512 for f in tmp_path.iterdir())
    assert claimed > 140e9 and on_disk < 10e6  # really sparse: the data was never written

    io = Path("/proc/self/io")
    read_before = int(io.read_text().split()[1])  # rchar: bytes this process read
    start = time.perf_counter()
    report = inspect_checkpoint(tmp_path)
    elapsed = time.perf_counter() - start
    read_bytes = int(io.read_text().split()[1]) - read_before

    assert report.total_parameters == 70_553_706_496  # Llama-3-70B
    assert report.total_bytes == claimed
    assert len(report.files) == 30 and report.problems == []
    assert elapsed < 2.0
    assert read_bytes < 5_000_000, f"read {read_bytes} bytes for {claimed} bytes of tensors"


# --- other families, made tiny by transformers itself ------------------------------------------

FAMILY_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)


@pytest.mark.parametrize(
    "model_type,extra,convention",
    [
        ("mistral", {}, "llama"),
        ("qwen2", {}, "llama"),  # q/k/v biases
        ("qwen3", {"head_dim": 24}, "llama"),  # per-head q_norm/k_norm, head_dim * heads != hidden
        ("phi3", {"pad_token_id": 0}, "llama"),  # fused qkv_proj and gate_up_proj
        ("gemma", {"head_dim": 32}, "llama"),  # tied by default
        ("mixtral", {"num_local_experts": 2}, None),  # MoE: listed and counted, not checked
        ("gpt_neox", {}, None),
    ],
)
def test_other_families_count_exactly_and_check_clean(tmp_path, model_type, extra, convention):
    from transformers import AutoConfig

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **FAMILY_SHAPE, **extra))
    model.save_pretrained(tmp_path)
    report = inspect_checkpoint(tmp_path)
    assert report.convention == convention
    assert report.total_parameters == sum(p.numel() for p in model.parameters())
    assert report.problems == []
    assert report.groups["other"].tensors == 0
    assert report.tied_head is (model.lm_head.weight is model.get_input_embeddings().weight)


# --- grouping of names from other families ---------------------------------------------------


@pytest.mark.parametrize(
    "name,group",
    [
        ("model.layers.3.self_attn.q_norm.weight", "norm"),
        ("model.layers.0.self_attn.qkv_proj.weight", "attention"),
        ("model.layers.0.mlp.gate_up_proj.weight", "ffn"),
        ("model.layers.0.block_sparse_moe.experts.3.w1.weight", "ffn"),
        ("h.0.attn.bias", "buffer"),
        ("h.0.attn.c_attn.bias", "attention"),
        ("model.layers.0.self_attn.rotary_emb.inv_freq", "buffer"),
        ("transformer.ln_f.weight", "norm"),
        ("gpt_neox.embed_in.weight", "embedding"),
        ("model.decoder.final_layer_norm.weight", "norm"),
        ("embed_out.weight", "lm_head"),
    ],
)
def test_tensor_group(name, group):
    assert tensor_group(name) == group and group in GROUPS


def test_unknown_architecture_is_listed_and_counted_unchecked(tmp_path):
    tensors = {"encoder.blocks.0.weird.weight": torch.zeros(3, 5), "encoder.final.weight": torch.zeros(7)}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery", "hidden_size": 999}))
    report = inspect_checkpoint(tmp_path)
    assert report.convention is None and report.problems == []
    assert report.total_parameters == 22 and report.groups["other"].tensors == 2


def test_real_gpt2_names_without_prefix_and_mask_buffers(tmp_path):
    """openai-community/gpt2's own layout: no `transformer.` prefix, causal-mask buffers saved."""
    hidden, inner, vocab, n_ctx = 8, 32, 11, 6
    tensors = {"wte.weight": torch.zeros(vocab, hidden), "wpe.weight": torch.zeros(n_ctx, hidden),
               "ln_f.weight": torch.zeros(hidden), "ln_f.bias": torch.zeros(hidden)}
    for i in range(2):
        p = f"h.{i}."
        tensors |= {p + "attn.bias": torch.zeros(1, 1, n_ctx, n_ctx), p + "attn.c_attn.weight": torch.zeros(hidden, 3 * hidden),
                    p + "attn.c_attn.bias": torch.zeros(3 * hidden), p + "attn.c_proj.weight": torch.zeros(hidden, hidden),
                    p + "attn.c_proj.bias": torch.zeros(hidden), p + "mlp.c_fc.weight": torch.zeros(hidden, inner),
                    p + "mlp.c_fc.bias": torch.zeros(inner), p + "mlp.c_proj.weight": torch.zeros(inner, hidden),
                    p + "mlp.c_proj.bias": torch.zeros(hidden), p + "ln_1.weight": torch.zeros(hidden),
                    p + "ln_1.bias": torch.zeros(hidden), p + "ln_2.weight": torch.zeros(hidden), p + "ln_2.bias": torch.zeros(hidden)}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="gpt2", n_embd=hidden, n_head=2, n_inner=None,
                                                          vocab_size=vocab, n_layer=2, n_positions=n_ctx)))
    report = inspect_checkpoint(tmp_path)
    assert report.problems == [] and report.tied_head  # GPT-2's default
    assert report.groups["buffer"].tensors == 2 and report.groups["buffer"].parameters == 0
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_head=2, vocab_size=vocab, n_layer=2, n_positions=n_ctx))
    assert report.total_parameters == sum(p.numel() for p in model.parameters())


# --- unusable input --------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        inspect_checkpoint(tmp_path / "nope")


def test_pickle_only_checkpoint_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="pytorch_model.bin"):
        inspect_checkpoint(tmp_path)


def test_truncated_safetensors_refused(make_base, tmp_path):
    base = _copy(make_base(arch="llama"), tmp_path / "m")
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        inspect_checkpoint(base)


def test_missing_config_refused(make_base, tmp_path):
    base = _copy(make_base(arch="llama"), tmp_path / "m")
    (base / "config.json").unlink()
    with pytest.raises(InputError, match="config.json"):
        inspect_checkpoint(base)


def _fake_hub(monkeypatch, repo_id: str, local: Path) -> list[str]:
    """Serve `local` as hub repo `repo_id` through huggingface_hub's metadata calls; snapshots are refused.

    The metadata is built from the files' raw headers (parsed here, not by loramill), as the hub's
    range reads would return them. Returns the log of hub calls.
    """
    import huggingface_hub
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata
    from huggingface_hub.utils import TensorInfo as HubTensorInfo

    calls: list[str] = []

    def header(file: Path) -> dict:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(n))

    def get_safetensors_metadata(repo, **_):
        assert repo == repo_id
        calls.append("metadata")
        index = local / "model.safetensors.index.json"
        weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else {}
        files = {}
        for file in sorted(local.glob("*.safetensors")):
            raw = header(file)
            meta = raw.pop("__metadata__", {})
            files[file.name] = SafetensorsFileMetadata(meta, {k: HubTensorInfo(v["dtype"], v["shape"], tuple(v["data_offsets"]))
                                                               for k, v in raw.items()})
        weight_map = weight_map or {name: f for f, m in files.items() for name in m.tensors}
        return SafetensorsRepoMetadata(None, index.exists(), weight_map, files)

    def hf_hub_download(repo, filename, **_):
        assert repo == repo_id and filename == "config.json"
        calls.append(filename)
        return str(local / filename)

    def snapshot_download(*_, **__):
        raise AssertionError("inspect must not download weights")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", get_safetensors_metadata)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_hub_id_is_inspected_from_headers_alone(make_base, tmp_path, monkeypatch, sharded):
    local = make_base(arch="llama")
    if sharded:
        model = AutoModelForCausalLM.from_pretrained(local)
        model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
        shutil.copy(local / "config.json", tmp_path / "sharded" / "config.json")
        local = tmp_path / "sharded"
    calls = _fake_hub(monkeypatch, "someorg/tiny-llama", local)
    remote = inspect_checkpoint("someorg/tiny-llama").to_dict()
    assert calls == ["metadata", "config.json"]
    expected = inspect_checkpoint(local).to_dict()
    assert remote.pop("path") == "someorg/tiny-llama" and expected.pop("path") == str(local)
    assert remote == expected


def test_hub_id_that_cannot_be_read_is_one_clear_error(monkeypatch):
    import huggingface_hub

    def unreachable(*_, **__):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", unreachable)
    with pytest.raises(InputError, match=r"someorg/missing: not a local directory .* \(OSError\)"):
        inspect_checkpoint("someorg/missing")
