"""`loramill merge`: the happy path, --verify, a light import path, and every bad input.

Each bad input: a one-line `error: ...` on stderr, exit status != 0, and no output directory
(nor a temporary one beside it) left behind.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from loramill.cli import main
from tests.merge.helpers import checkpoint_logits, unmerged_logits

LORAMILL = str(Path(sys.executable).with_name("loramill"))


def _merge(*args: str):
    return CliRunner().invoke(main, ["merge", *args])


def _assert_refused(result, out: Path, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert len([line for line in lines if not line.startswith("merging")]) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def llama(make_base, make_adapter):
    base = make_base(arch="llama")
    return base, make_adapter(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def test_merge_writes_a_checkpoint_and_verifies_it(llama, tmp_path):
    base, adapter = llama
    out = tmp_path / "merged"
    result = _merge("--base", str(base), "--adapter", f"{adapter}:1.0", "--out", str(out), "--verify")
    assert result.exit_code == 0, result.output
    assert f"merged 1 adapter(s) (linear) into checkpoint {out}" in result.stdout
    assert "verify: max |logit diff|" in result.stdout and "perplexity on probe: unmerged" in result.stdout
    diff = float(result.stdout.split("max |logit diff| ")[1].split()[0])
    assert diff < 1e-4
    assert (checkpoint_logits(out) - unmerged_logits(base, adapter)).abs().max().item() <= 1e-4


def test_verify_failure_discards_the_output(llama, tmp_path, monkeypatch):
    base, adapter = llama
    from merge import verify

    monkeypatch.setitem(verify.RTOL, "float32", 0.0)  # any rounding at all now fails
    out = tmp_path / "merged"
    result = _merge("--base", str(base), "--adapter", str(adapter), "--out", str(out), "--verify", "--dtype", "float32")
    _assert_refused(result, out, "verification failed, output discarded")


def test_inexact_methods_report_without_failing(llama, make_adapter, tmp_path):
    base, adapter = llama
    other = make_adapter(base, seed=3, r=4, lora_alpha=8, target_modules=["q_proj"])
    out = tmp_path / "ties"
    result = _merge("--base", str(base), "--adapter", str(adapter), "--adapter", str(other), "--out", str(out),
                    "--method", "ties", "--density", "0.5", "--verify")
    assert result.exit_code == 0, result.output
    assert "inexact method, no tolerance" in result.stdout
    assert json.loads((out / "loramill-manifest.json").read_text())["method"] == {"name": "ties", "density": 0.5}


def test_merge_does_not_import_torch(llama, tmp_path):
    base, adapter = llama
    out = tmp_path / "merged"
    code = (
        "import sys; from loramill.cli import main; "
        f"main(['merge', '--base', {str(base)!r}, '--adapter', {str(adapter)!r}, '--out', {str(out)!r}], standalone_mode=False); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules); "
        "print('HEAVY', heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert (out / "loramill-manifest.json").exists()


def test_overwrite_replaces_an_existing_output(llama, tmp_path):
    base, adapter = llama
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = _merge("--base", str(base), "--adapter", str(adapter), "--out", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "loramill-manifest.json").exists()


def test_int8_writes_the_export_and_prints_its_perplexity_cost(llama, tmp_path):
    from merge.quantize import INT8_NAME, load_int8

    base, adapter = llama
    out = tmp_path / "int8"
    result = _merge("--base", str(base), "--adapter", str(adapter), "--out", str(out), "--int8", "--verify")
    assert result.exit_code == 0, result.output
    assert f"merged 1 adapter(s) (linear) into int8 checkpoint {out}" in result.stdout
    assert "verify: max |logit diff|" in result.stdout  # --verify checks the float merge the export is made from
    line = next(line for line in result.stdout.splitlines() if line.startswith("int8: "))
    merged_ppl, int8_ppl = (float(line.split(f"{k} ")[1].split()[0].rstrip(",")) for k in ("merged", "int8"))
    assert abs(int8_ppl / merged_ppl - 1) < 0.01 and merged_ppl != int8_ppl
    spec = json.loads((out / INT8_NAME).read_text())
    assert "model.layers.0.self_attn.q_proj.weight" in spec["quantized"]
    manifest = json.loads((out / "loramill-manifest.json").read_text())
    assert manifest["source"]["method"] == {"name": "linear"} and manifest["source"]["kind"] == "checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]  # the float merge it was made from is gone
    assert load_int8(out).config.tie_word_embeddings is False


# ---- bad inputs -----------------------------------------------------------------------------

def test_adapter_for_a_different_base(make_base, make_adapter, tmp_path):
    wide = make_base(arch="llama", hidden=64, heads=2, kv_heads=1, intermediate=160)
    adapter = make_adapter(wide, r=4, lora_alpha=8, target_modules=["q_proj"])
    base = make_base(arch="llama")
    out = tmp_path / "merged"
    result = _merge("--base", str(base), "--adapter", str(adapter), "--out", str(out))
    _assert_refused(result, out, "does not fit base model", "model.layers.0.self_attn.q_proj.weight", "[64, 64]", "[128, 128]")


def test_target_module_missing_from_base(make_base, make_adapter, llama, tmp_path):
    _, adapter = llama
    out = tmp_path / "merged"
    result = _merge("--base", str(make_base(arch="gpt2")), "--adapter", str(adapter), "--out", str(out))
    _assert_refused(result, out, "targets module 'model.layers.0.self_attn.q_proj'", "does not have")


def test_pickled_adapter_refused(llama, tmp_path):
    base, adapter = llama
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    out = tmp_path / "merged"
    _assert_refused(_merge("--base", str(base), "--adapter", str(pickled), "--out", str(out)), out,
                    "pickled adapter weights (adapter_model.bin) are refused")


def test_pickled_base_refused(llama, tmp_path):
    base, adapter = llama
    pickled = tmp_path / "base"
    shutil.copytree(base, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    out = tmp_path / "merged"
    _assert_refused(_merge("--base", str(pickled), "--adapter", str(adapter), "--out", str(out)), out,
                    "only pickled weights (pytorch_model.bin)")


@pytest.mark.parametrize("specs,fragment", [
    (["{a}:abc"], "adapter weight 'abc'"),
    (["{a}:nan"], "is not a finite number"),
    (["{a}:0.5", "{a}"], "weights given for 1 of 2 adapters"),
])
def test_bad_weights(llama, tmp_path, specs, fragment):
    base, adapter = llama
    out = tmp_path / "merged"
    args = [arg for spec in specs for arg in ("--adapter", spec.format(a=adapter))]
    _assert_refused(_merge("--base", str(base), *args, "--out", str(out)), out, fragment)


def test_existing_output_refused_and_kept(llama, tmp_path):
    base, adapter = llama
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _merge("--base", str(base), "--adapter", str(adapter), "--out", str(out))
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1].startswith("error: output")
    assert "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]


def test_unwritable_output_location(llama, tmp_path):
    base, adapter = llama
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "merged"
    result = _merge("--base", str(base), "--adapter", str(adapter), "--out", str(out))
    assert result.exit_code == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot write to") and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_truncated_base_safetensors(llama, tmp_path):
    base, adapter = llama
    broken = tmp_path / "base"
    shutil.copytree(base, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "merged"
    _assert_refused(_merge("--base", str(broken), "--adapter", str(adapter), "--out", str(out)), out,
                    "model.safetensors: truncated safetensors file")


def test_truncated_adapter_safetensors(llama, tmp_path):
    base, adapter = llama
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    weights = broken / "adapter_model.safetensors"
    (n,) = struct.unpack("<Q", weights.read_bytes()[:8])
    weights.write_bytes(weights.read_bytes()[: 8 + n + 10])
    out = tmp_path / "merged"
    _assert_refused(_merge("--base", str(base), "--adapter", str(broken), "--out", str(out)), out,
                    "adapter_model.safetensors: truncated safetensors file")


def test_nan_in_adapter_refused(llama, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    base, adapter = llama
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    out = tmp_path / "merged"
    _assert_refused(_merge("--base", str(base), "--adapter", str(broken), "--out", str(out)), out,
                    f"tensor {name!r} contains NaN or inf")
    assert torch.isnan(tensors[name]).any()


def test_float16_overflow_discards_the_output(make_base, make_adapter, tmp_path):
    base = make_base(arch="llama", dtype="float16")
    adapter = make_adapter(base, std=200.0, r=4, lora_alpha=8, target_modules=["o_proj"])
    out = tmp_path / "merged"
    _assert_refused(_merge("--base", str(base), "--adapter", str(adapter), "--out", str(out)), out,
                    "overflows F16", "output was discarded")


@pytest.mark.parametrize("args,fragment", [
    (["--method", "ties", "--drop-rate", "0.3"], "--drop-rate does not apply to method ties"),
    (["--method", "svd"], "method svd needs --rank"),
    (["--max-shard-size", "lots"], "--max-shard-size 'lots' is not a size"),
    (["--method", "svd", "--rank", "2", "--int8"], "--int8 exports a merged checkpoint; method svd writes an adapter"),
    (["--method", "dare_ties", "--seed", "-3"], "--seed must be in [0, 2147483647], got -3"),
    (["--method", "ties", "--density", "0"], "--density must be in (0, 1], got 0.0"),
])
def test_bad_options(llama, tmp_path, args, fragment):
    base, adapter = llama
    out = tmp_path / "merged"
    _assert_refused(_merge("--base", str(base), "--adapter", str(adapter), "--out", str(out), *args), out, fragment)


def test_missing_adapter_directory(llama, tmp_path):
    base, _ = llama
    out = tmp_path / "merged"
    _assert_refused(_merge("--base", str(base), "--adapter", str(tmp_path / "nope"), "--out", str(out)), out,
                    "is not a directory")


def test_real_process_exit_status(llama, tmp_path):
    base, adapter = llama
    out = tmp_path / "merged"
    done = subprocess.run([LORAMILL, "merge", "--base", str(base), "--adapter", f"{adapter}:x", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"error: adapter weight 'x' in --adapter {adapter}:x is not a number"]


@pytest.mark.parametrize("args,dtype,exact", [
    (["--dtype", "bfloat16"], "bfloat16", True),
    (["--method", "svd", "--rank", "4"], "float32", True),
    (["--method", "svd", "--rank", "1"], "float32", False),
])
def test_verify_tolerance_per_dtype_and_method(llama, tmp_path, args, dtype, exact):
    base, adapter = llama
    out = tmp_path / "merged"
    result = _merge("--base", str(base), "--adapter", str(adapter), "--out", str(out), "--verify", *args)
    assert result.exit_code == 0, result.output
    assert f"({dtype}, " in result.stdout
    assert ("inexact method, no tolerance" in result.stdout) is not exact
