"""`loramill base create`: options reach the model, bad options give one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapters.checkpoint import read_checkpoint
from loramill.cli import main

LORAMILL = str(Path(sys.executable).with_name("loramill"))
SMALL = ["--layers", "1", "--hidden", "64", "--heads", "4", "--intermediate", "96"]


def test_console_script_creates_a_loadable_model(tmp_path):
    out = tmp_path / "m"
    run = subprocess.run([LORAMILL, "base", "create", str(out), "--arch", "llama", "--tie-embeddings", "--kv-heads", "2",
                          "--vocab", "300", "--max-positions", "64", "--dtype", "bfloat16", "--seed", "3", *SMALL],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"created llama base model (tied head) at {out}"
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"], config["vocab_size"], config["max_position_embeddings"],
            config["tie_word_embeddings"], config["dtype"]) == (1, 64, 4, 2, 96, 300, 64, True, "bfloat16")
    assert json.loads((out / "loramill-base.json").read_text())["seed"] == 3

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_gpt2_uses_full_heads_and_untied_head(tmp_path):
    out = tmp_path / "g"
    result = CliRunner().invoke(main, ["base", "create", str(out), "--arch", "gpt2", "--no-tie-embeddings", *SMALL])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["n_layer"], config["n_embd"], config["n_head"], config["n_inner"]) == ("gpt2", 1, 64, 4, 96)
    assert config["tie_word_embeddings"] is False
    assert read_checkpoint(out)["lm_head.weight"].shape == (320, 64)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--vocab", "100"], "vocab must be at least 259"),
        (["--hidden", "66", "--heads", "4"], "hidden (66) must be divisible by heads (4)"),
        (["--heads", "4", "--kv-heads", "3"], "heads (4) must be divisible by kv_heads (3)"),
        (["--layers", "0"], "layers must be positive"),
        (["--intermediate", "-5"], "intermediate must be positive"),
    ],
)
def test_bad_option_one_line_exit_2(tmp_path, args, fragment):
    out = tmp_path / "m"
    result = CliRunner().invoke(main, ["base", "create", str(out), *args])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert result.stdout == ""
    assert not out.exists()


def test_existing_non_empty_out_dir_one_line_exit_2(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "weights.safetensors").write_bytes(b"precious")
    run = subprocess.run([LORAMILL, "base", "create", str(out), *SMALL], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: output {out} already exists (pass --overwrite to replace it)"]
    assert (out / "weights.safetensors").read_bytes() == b"precious"


def test_bad_options_fail_before_loading_torch(tmp_path):
    """Refusals come at once: no torch/transformers import before the options and OUT are checked."""
    code = ("import sys\nfrom loramill.cli import main\n"
            "try:\n    main(['base', 'create', sys.argv[1], '--vocab', '10'])\nexcept SystemExit as e:\n    code = e.code\n"
            "print('torch imported:', 'torch' in sys.modules, 'exit:', code)")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "torch imported: False exit: 2", run.stdout + run.stderr
    assert run.stderr.startswith("error: vocab must be at least 259")


def test_overwrite_replaces_existing_out_dir(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = CliRunner().invoke(main, ["base", "create", str(out), "--overwrite", *SMALL])
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_unknown_arch_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["base", "create", str(tmp_path / "m"), "--arch", "t5"])
    assert result.exit_code == 2 and "'t5' is not one of" in result.stderr
    assert not (tmp_path / "m").exists()
