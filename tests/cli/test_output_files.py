"""What the commands write and print around their output: files 0644 (not mkstemp's 0600), and no
progress bar drawn before an error."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from adapters.fsutil import atomic_write_bytes
from jobs.artifacts import LocalArtifactStore
from loramill.cli import main


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_atomic_writes_and_stored_artifacts_are_0644(tmp_path):
    atomic_write_bytes(tmp_path / "manifest.json", b"{}")
    assert _mode(tmp_path / "manifest.json") == 0o644
    store = LocalArtifactStore(tmp_path / "artifacts")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    store.import_dir("adapters/t/a", tmp_path / "adapter")
    store.import_file("files/t/f.jsonl", tmp_path / "manifest.json")
    written = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    assert len(written) == 2 and {_mode(p) for p in written} == {0o644}


def test_a_merged_checkpoint_and_its_manifest_are_0644(llama_base, peft_adapter, tmp_path):
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", "--base", str(llama_base), "--adapter", str(peft_adapter), "--out", str(out)])
    assert result.exit_code == 0, result.output
    files = sorted(p for p in out.iterdir())
    assert any(p.name.endswith(".json") and "manifest" in p.name for p in files)
    assert {p.name: _mode(p) for p in files} == {p.name: 0o644 for p in files}


def test_merge_prints_no_progress_bar_before_an_error(llama_base, tmp_path):
    for adapter in (tmp_path / "missing-adapter", llama_base):  # nothing there; a base model, not an adapter
        result = CliRunner().invoke(main, ["merge", "--base", str(llama_base), "--adapter", str(adapter),
                                           "--out", str(tmp_path / "merged")])
        assert result.exit_code == 2, result.output
        assert "merging" not in result.output
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_merge_onto_an_adapter_given_as_base_is_one_error_line(peft_adapter, tmp_path):
    result = CliRunner().invoke(main, ["merge", "--base", str(peft_adapter), "--adapter", str(peft_adapter),
                                       "--out", str(tmp_path / "merged")])
    assert result.exit_code == 2, result.output
    assert "merging" not in result.output and "is a LoRA adapter, not a base model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
