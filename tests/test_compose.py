"""docker-compose.yml describes the real deployment; no Docker engine runs here, so check it by
parsing: every command exists in this project and every LORAMILL_ variable is a known setting."""

from __future__ import annotations

import importlib
import json
import re
import tomllib
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
    test = service.get("healthcheck", {}).get("test", [])
    if test[:1] == ["CMD-SHELL"] and test[1].startswith("celery "):
        args = test[1].split()
        assert hasattr(importlib.import_module(args[args.index("-A") + 1]), "app")
        # the node it pings is the one the command names (in a container, %h is $HOSTNAME)
        assert args[args.index("-d") + 1] == argv[argv.index("--node-name") + 1].replace("%h", "$$HOSTNAME")


def test_every_environment_variable_is_a_setting(monkeypatch):
    fields = {f"LORAMILL_{name.upper()}" for name in Settings.model_fields}
    env = COMPOSE["x-loramill-env"]
    assert env, "shared environment block is empty"
    unknown = sorted(set(env) - fields)
    assert not unknown, f"docker-compose.yml sets unknown settings: {unknown}"
    for name, service in SERVICES.items():
        for key in service.get("environment", {}) if "build" in service else {}:
            assert key in fields, f"{name}: {key} is not a setting"
    for key, value in env.items():  # read the way a container reads them: from its environment
        if "${" not in str(value):
            monkeypatch.setenv(key, str(value))
    Settings()


def test_roles_share_the_artifact_volume_and_gpu_roles_reserve_a_gpu():
    mounts = {name: SERVICES[name]["volumes"] for name in ("api", "train-worker", "merge-worker", "engine", "vllm")}
    assert len({tuple(m) for m in mounts.values()}) == 1
    for name in ("train-worker", "engine", "vllm"):
        devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_api_reaches_the_engine_for_each_base_it_serves():
    """Each base's URL is the engine that serves it under the base's registered name (what the API sends as
    `model`): loramill's engine for "base", a vLLM server for the other."""
    env = COMPOSE["x-loramill-env"]
    urls = json.loads(env["LORAMILL_ENGINE_URLS"])
    engine, vllm = SERVICES["engine"]["command"], SERVICES["vllm"]["command"]
    assert urls == {_flag(engine, "--served-model-name"): f"http://engine:{_flag(engine, '--port')}",
                    _flag(vllm, "--served-model-name"): f"http://vllm:{_flag(vllm, '--port')}"}
    for argv in (engine, vllm):  # the engine loads the base from where the API registered it: the shared volume
        assert (_flag(argv, "--base") if "--base" in argv else _flag(argv, "--model")).startswith("/data/models/")
    assert env["LORAMILL_EMBEDDED_ENGINES"] == "false"  # the API starts no engine of its own in production
    assert "train" in SERVICES["train-worker"]["command"] and "merge" in SERVICES["merge-worker"]["command"]


def test_rabbitmq_is_the_documented_alternative_broker_and_outlasts_any_job():
    """`--profile rabbitmq` with the documented amqp URL reaches the rabbitmq service as its user; its
    consumer timeout is at least Redis's visibility timeout (a job's message stays unacknowledged)."""
    rabbitmq, env = SERVICES["rabbitmq"], COMPOSE["x-loramill-env"]
    assert rabbitmq["profiles"] == ["rabbitmq"]
    header = (ROOT / "docker-compose.yml").read_text()
    (user, password, host, port), = re.findall(r"LORAMILL_BROKER_URL=amqp://(\w+):(\w+)@(\w+):(\d+)/ docker compose "
                                               r"--profile rabbitmq up", header)
    assert (user, password) == (rabbitmq["environment"]["RABBITMQ_DEFAULT_USER"],
                                rabbitmq["environment"]["RABBITMQ_DEFAULT_PASS"])
    assert host == rabbitmq["hostname"] and port == "5672"
    erl_args = rabbitmq["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"].split()
    consumer_timeout_ms = int(erl_args[erl_args.index("consumer_timeout") + 1])
    assert consumer_timeout_ms >= int(env["LORAMILL_VISIBILITY_TIMEOUT_S"]) * 1000
    assert env["LORAMILL_BROKER_URL"] == "${LORAMILL_BROKER_URL:-redis://redis:6379/0}"  # Redis unless told
    for name in ("api", "train-worker", "merge-worker"):
        assert SERVICES[name]["depends_on"]["rabbitmq"] == {"condition": "service_healthy", "required": False}


def test_the_vllm_engine_loads_adapters_at_run_time_as_the_api_asks():
    """vLLM's image at the version the suite tests (`loramill.vllm_env`), LoRA on, runtime loading allowed, and
    adapter ranks up to what the API accepts."""
    from loramill.vllm_env import VLLM_VERSION

    vllm = SERVICES["vllm"]
    assert vllm["image"] == f"vllm/vllm-openai:v{VLLM_VERSION}"
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    argv = vllm["command"]
    assert "--enable-lora" in argv and int(_flag(argv, "--max-loras")) >= 1
    assert int(_flag(argv, "--max-lora-rank")) >= int(COMPOSE["x-loramill-env"]["LORAMILL_MAX_RANK"])
    assert int(_flag(argv, "--max-cpu-loras")) >= int(_flag(argv, "--max-loras"))
    assert _flag(argv, "--generation-config") == "vllm"  # OpenAI's request defaults, as loramill's engine has them
    api_bound = COMPOSE["x-loramill-env"].get("LORAMILL_MAX_GENERATION_TOKENS",
                                              Settings.model_fields["max_generation_tokens"].default)
    assert json.loads(_flag(argv, "--override-generation-config")) == {"max_new_tokens": int(api_bound)}
    assert vllm["healthcheck"]["test"][-1].endswith(f":{_flag(argv, '--port')}/health')")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first use builds vLLM's environment
def test_vllm_accepts_the_compose_flags(vllm_python):
    """The vllm service's arguments parsed by vLLM's own argument parser (the version the image pins)."""
    import subprocess

    from loramill.vllm_env import SERVER_MODULE

    vllm = SERVICES["vllm"]
    assert vllm["entrypoint"] == ["python3", "-m", SERVER_MODULE]  # the module the suite's vLLM server runs
    check = ("import sys; from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args\n"
             "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
             "args = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])\n"
             "validate_parsed_serve_args(args)\n"
             "assert args.enable_lora and args.max_loras == int(sys.argv[sys.argv.index('--max-loras') + 1])")
    done = subprocess.run([str(vllm_python), "-c", check, *vllm["command"]], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_dockerfile_copies_every_package_and_only_paths_that_exist():
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set()
    for src in re.findall(r"^COPY (\S+)", dockerfile, flags=re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"Dockerfile copies missing {part}"
            copied.add(part)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"Dockerfile does not copy {sorted(packages - copied)}"


@pytest.mark.slow
def test_the_worker_healthcheck_reaches_a_real_worker(tmp_path, broker_url):
    """The compose healthcheck's `celery inspect ping -d <node>` answered by a real `loramill worker`, on either broker."""
    import os
    import socket
    import subprocess
    import sys

    from tests.services import stop

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LORAMILL_")},
           "LORAMILL_DATA_DIR": str(tmp_path / "data"), "LORAMILL_BROKER_URL": broker_url}
    worker = subprocess.Popen([sys.executable, "-c", "from loramill.cli import main; main()", "worker", "--queues",
                               "merge", "--pool", "solo", "--node-name", "loramill-merge@%h"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        node = f"loramill-merge@{socket.gethostname()}"
        for _ in range(30):
            ping = subprocess.run([sys.executable, "-m", "celery", "-A", "workers.celery_app", "inspect", "ping", "-d",
                                   node, "--timeout", "2"], env=env, capture_output=True, text=True)
            if ping.returncode == 0:
                break
        assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
    finally:
        stop(worker)
