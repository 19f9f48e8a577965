"""`loramill engine --base PATH|NAME`: the serving engine as an HTTP server (vLLM's protocol subset).

Flags override `LORAMILL_ENGINE_*` settings. With `--port 0` the system picks a free port. When the
server listens it prints one line to stdout, `loramill engine ready on http://HOST:PORT ...`;
`GET /health` answers 200 from then on.
"""

from __future__ import annotations

import dataclasses
import sys

import click

_KNOBS = ("max_loras", "max_cpu_loras", "max_lora_rank", "max_num_seqs", "max_num_batched_tokens",
          "max_model_len", "max_waiting", "max_saved_module_bytes", "dtype", "device", "threads")


def register(main: click.Group) -> None:
    main.add_command(engine)
    main.add_command(vllm_env)


@click.command("vllm-env")
def vllm_env() -> None:
    """Build vLLM's CPU build in its own environment (once, cached by version); print its Python."""
    from loramill.vllm_env import ensure_vllm_env

    click.echo(ensure_vllm_env(log=lambda line: click.echo(line, err=True)))


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        from adapters.errors import InputError

        raise InputError(f"--lora-modules expects NAME=PATH, got {text!r}", param="lora_modules")
    return name, path


@click.command()
@click.option("--base", required=True, help="Base model: a checkpoint directory or a hub id.")
@click.option("--host", default=None, help="Default: LORAMILL_HOST (127.0.0.1).")
@click.option("--port", type=int, default=None, help="Default: LORAMILL_ENGINE_PORT (8100); 0 picks a free port.")
@click.option("--served-model-name", default=None, help="The base model's name in requests; default: --base as given.")
@click.option("--lora-modules", multiple=True, metavar="NAME=PATH", help="Adapters to load at startup (repeatable).")
@click.option("--max-loras", type=int, default=None, help="Adapter slots on the device.")
@click.option("--max-cpu-loras", type=int, default=None, help="Adapters kept converted in host memory.")
@click.option("--max-lora-rank", type=int, default=None, help="Largest adapter rank served (slots are padded to it).")
@click.option("--max-num-seqs", type=int, default=None, help="Requests decoded together.")
@click.option("--max-num-batched-tokens", type=int, default=None, help="Tokens per forward pass.")
@click.option("--max-model-len", type=int, default=None, help="Context length; default: the base model's.")
@click.option("--max-waiting", type=int, default=None, help="Waiting requests before answering 503.")
@click.option("--max-saved-module-bytes", type=int, default=None, help="Memory for modules_to_save copies.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None)
@click.option("--device", default=None, help="cuda, cuda:N or cpu; default: cuda when present.")
@click.option("--threads", type=int, default=None, help="Torch CPU threads.")
def engine(base: str, host: str | None, port: int | None, served_model_name: str | None,
           lora_modules: tuple[str, ...], **flags) -> None:
    """Serve a base model and LoRA adapters over vLLM's OpenAI-compatible protocol."""
    from adapters.checkpoint import read_config, resolve_model_dir
    from loramill.settings import get_settings
    from serving.config import EngineConfig
    from serving.models import check_architecture

    settings = get_settings()
    config = EngineConfig(**{k: flags[k] if flags[k] is not None else getattr(settings, f"engine_{k}")
                             for k in _KNOBS})
    config.validate()
    statics = [_lora_module(text) for text in lora_modules]
    base_dir = resolve_model_dir(base)
    check_architecture(read_config(base_dir))  # refuse before the heavy imports and the weights
    _serve(base_dir, served_model_name or base, statics, config, host or settings.host,
           settings.engine_port if port is None else port, settings.max_generation_tokens)


def _serve(base_dir, served_name: str, statics: list[tuple[str, str]], config, host: str, port: int,
           default_max_tokens: int) -> None:
    import asyncio
    import socket

    import torch
    import uvicorn

    from adapters.tokenizer import load_tokenizer
    from serving.engine import AsyncEngine, Engine
    from serving.models import load_model
    from serving.server import create_app

    if config.threads:
        torch.set_num_threads(config.threads)
    tokenizer = load_tokenizer(base_dir)  # before the model: a directory without one is refused at once
    model = load_model(base_dir, config)
    core = Engine(model, tokenizer, config, base_dir)
    async_engine = AsyncEngine(core, served_name)
    app = create_app(async_engine, max_model_len=model.max_model_len, default_max_tokens=default_max_tokens)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))

    async def main() -> None:
        for name, path in statics:
            await async_engine.load_adapter(name, path)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.02)
        if server.started:
            layout = dataclasses.asdict(config)
            click.echo(f"loramill engine ready on http://{host}:{port} serving '{served_name}' "
                       f"({model.device.type}, {str(model.dtype).removeprefix('torch.')}, "
                       f"max_loras={layout['max_loras']}, max_lora_rank={layout['max_lora_rank']}, "
                       f"max_num_seqs={layout['max_num_seqs']}, max_model_len={model.max_model_len})")
            sys.stdout.flush()
        await serving

    try:
        asyncio.run(main())
    finally:
        async_engine.shutdown()
