"""`loramill inspect PATH [--json]`: table, JSON, exit 1 on shape problems, exit 2 on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adapters.inspection import inspect_checkpoint
from loramill.cli import main

LORAMILL = str(Path(sys.executable).with_name("loramill"))


def _inspect(*args: str):
    return CliRunner().invoke(main, ["inspect", *args])


@pytest.mark.parametrize("arch,tied", [("llama", False), ("gpt2", True)])
def test_table_lists_groups_totals_and_head(make_base, arch, tied):
    base = make_base(arch=arch, tie_embeddings=tied)
    report = inspect_checkpoint(base)
    result = _inspect(str(base))
    assert result.exit_code == 0, result.output
    out = result.stdout
    for group in ("embedding", "attention", "ffn", "norm"):
        total = report.groups[group]
        assert f"{group}  ({total.tensors} tensor{'s' if total.tensors != 1 else ''}, {total.parameters:,} parameters)" in out
    assert ("lm_head  (" in out) is not tied
    for t in report.tensors:
        assert t.name in out
    assert f"total: {report.total_parameters:,} parameters in {len(report.tensors)} tensors (F32 x{len(report.tensors)})" in out
    assert f"head: {'tied' if tied else 'untied'}" in out
    assert "problems: none" in out


def test_json_is_the_report(make_base):
    base = make_base(arch="llama", tie_embeddings=True)
    result = _inspect(str(base), "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    report = inspect_checkpoint(base)
    assert data == json.loads(json.dumps(report.to_dict()))
    assert data["tied_head"] is True and data["problems"] == []
    assert data["total_parameters"] == sum(g["parameters"] for g in data["groups"].values())
    assert {t["name"]: t["shape"] for t in data["tensors"]}["model.embed_tokens.weight"] == [320, 128]


def test_shape_problem_exits_1_and_names_the_tensor(make_base, tmp_path):
    base = shutil.copytree(make_base(arch="llama"), tmp_path / "m")
    tensors = load_file(base / "model.safetensors")
    tensors["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(128, 128)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})

    result = _inspect(str(base))
    assert result.exit_code == 1
    assert "problems: 1" in result.stdout
    assert ("model.layers.0.self_attn.v_proj.weight: shape [128, 128], expected [64, 128] "
            "= [num_key_value_heads * head_dim, hidden_size] from config.json") in result.stdout

    result = _inspect(str(base), "--json")
    assert result.exit_code == 1
    (problem,) = json.loads(result.stdout)["problems"]
    assert problem["tensor"] == "model.layers.0.self_attn.v_proj.weight"
    assert problem["expected"] == [64, 128] and problem["actual"] == [128, 128]


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def test_nonexistent_path(tmp_path):
    line = _one_line_error(_inspect(str(tmp_path / "missing")))
    assert line == f"error: {tmp_path / 'missing'} does not exist"


def test_pickle_only_checkpoint(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    line = _one_line_error(_inspect(str(tmp_path)))
    assert "only pickled weights (pytorch_model.bin)" in line and "safetensors only" in line


def test_truncated_safetensors(make_base, tmp_path):
    base = shutil.copytree(make_base(arch="gpt2"), tmp_path / "m")
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[:-1000])
    line = _one_line_error(_inspect(str(base)))
    assert "model.safetensors: truncated safetensors file" in line


def test_corrupt_header(tmp_path):
    (tmp_path / "model.safetensors").write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    (tmp_path / "config.json").write_text("{}")
    assert "corrupt safetensors header" in _one_line_error(_inspect(str(tmp_path)))


def test_console_script_is_fast_and_torch_free(make_base):
    """`inspect` reads headers only: the installed script runs without importing torch."""
    base = make_base(arch="llama")
    code = ("import sys\nfrom loramill.cli import main\n"
            "try:\n    main(['inspect', sys.argv[1]])\nexcept SystemExit as e:\n    code = e.code\n"
            "print('torch imported:', 'torch' in sys.modules, 'exit:', code)")
    run = subprocess.run([sys.executable, "-c", code, str(base)], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip().endswith("torch imported: False exit: 0"), run.stdout + run.stderr

    run = subprocess.run([LORAMILL, "inspect", str(base), "--json"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and json.loads(run.stdout)["convention"] == "llama"
