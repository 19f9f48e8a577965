"""docker-compose.yml describes the real deployment; no Docker engine runs here, so check it by
parsing: every command exists in this project and every LORAMILL_ variable is a known setting."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import click
import pytest
import yaml

from loramill.cli import main
from loramill.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def _loramill_command(argv: list[str]) -> click.Command:
    command: click.Command = main
    args = argv[1:]
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        assert args[0] in command.commands, f"loramill has no command {args[0]!r}"
        command, args = command.commands[args[0]], args[1:]
    options = {opt for param in command.params for opt in getattr(param, "opts", [])}
    for arg in args:
        if arg.startswith("--"):
            assert arg in options, f"{' '.join(argv)}: unknown option {arg}"
    return command


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_command_exists_in_the_project(name):
    service = SERVICES[name]
    argv = service.get("command")
    if not argv or "build" not in service:
        return  # third-party images: redis, postgres
    if argv[0] == "loramill":
        _loramill_command(argv)
    else:
        pytest.fail(f"{name}: unexpected command {argv[0]}")
    for check in service.get("healthcheck", {}).get("test", [])[1:2]:
        if check == "celery":
            args = service["healthcheck"]["test"]
            module = args[args.index("-A") + 1]
            assert hasattr(importlib.import_module(module), "app")


def test_every_environment_variable_is_a_setting():
    fields = {f"LORAMILL_{name.upper()}" for name in Settings.model_fields}
    env = COMPOSE["x-loramill-env"]
    assert env, "shared environment block is empty"
    unknown = sorted(set(env) - fields)
    assert not unknown, f"docker-compose.yml sets unknown settings: {unknown}"
    for name, service in SERVICES.items():
        for key in service.get("environment", {}) if "build" in service else {}:
            assert key in fields, f"{name}: {key} is not a setting"
    Settings(**{k[len("LORAMILL_"):].lower(): v for k, v in env.items() if "${" not in str(v)})


def test_roles_share_the_artifact_volume_and_the_gpu_worker_reserves_a_gpu():
    mounts = {name: SERVICES[name]["volumes"] for name in ("api", "train-worker", "merge-worker")}
    assert len({tuple(m) for m in mounts.values()}) == 1
    devices = SERVICES["train-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "train" in SERVICES["train-worker"]["command"] and "merge" in SERVICES["merge-worker"]["command"]


def test_the_dockerfile_copies_only_paths_that_exist():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (\S+)", dockerfile, flags=re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"Dockerfile copies missing {part}"
