"""The data directory: one per user (platformdirs), whatever directory a command runs in; a command
that fails leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

from tests.services import loramill, loramill_env


def _env_without_data_dir(home: Path) -> dict[str, str]:
    env = loramill_env("unused")
    del env["LORAMILL_DATA_DIR"]
    env["XDG_DATA_HOME"] = str(home / "xdg-data")  # where platformdirs puts user data on Linux
    return env


def test_the_default_is_the_per_user_data_directory_from_any_working_directory(tmp_path, llama_base):
    env = _env_without_data_dir(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    created = loramill(env, "tenant", "create", "acme", cwd=one)
    assert created.returncode == 0, created.stderr
    added = loramill(env, "model", "add", "tiny", str(llama_base), cwd=two)
    assert added.returncode == 0, added.stderr
    # the same database from the second directory: the tenant made in the first is there
    keys = loramill(env, "tenant", "key", "list", "acme", cwd=two)
    assert keys.returncode == 0 and keys.stdout.count("active") == 1, keys.stderr
    assert (tmp_path / "xdg-data" / "loramill" / "loramill.db").is_file()
    assert not any((d / ".loramill").exists() for d in (one, two))

    from loramill.settings import Settings

    assert Settings(_env_file=None).data_dir.is_absolute()


def test_a_failing_command_creates_nothing(tmp_path):
    data = tmp_path / "nested" / "data"
    env = loramill_env(data)
    refused = loramill(env, "model", "add", "tiny", str(tmp_path / "no-such-model"), cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1
    unknown = loramill(env, "tenant", "key", "create", "nobody", cwd=tmp_path)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: ")
    assert not (tmp_path / "nested").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failing_command_keeps_an_existing_store(tmp_path):
    env = loramill_env(tmp_path / "data")
    assert loramill(env, "tenant", "create", "acme").returncode == 0
    again = loramill(env, "tenant", "create", "acme")
    assert again.returncode == 2 and again.stderr.startswith("error: ")
    assert loramill(env, "tenant", "key", "list", "acme").stdout.count("active") == 1
