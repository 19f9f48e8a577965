"""Training on N processes: `launch` starts them and relays; `python -m adapters.distributed` is one of them.

    caller (CLI / worker: holds the job's lease)        rank 0                     ranks 1..N-1
      launch(cfg) ── N × python -m adapters.distributed <control> ──▶ LoraTrainer(ranks=AcceleratedRanks | ShardedRanks)
      reads <control>/events.jsonl  ◀── start, progress ── writes files, reports    compute only
      should_stop() or progress() says stop ──▶ touches <control>/stop ──▶ rank 0 sees it before the next
                                                   micro-batch and broadcasts it: all ranks stop there
      result.json / error-<rank>.json  ◀── at the end

Why plain subprocesses (not `accelerate launch` or torch.multiprocessing): each rank is a child of
the caller with `PR_SET_PDEATHSIG=SIGKILL`, so killing the caller (a worker that dies, a user's
^C or `kill -9`) kills every rank at once, and the caller kills the rest when one rank fails, so
a crashed rank never leaves the others blocked in a collective. Each child gets the environment
`torchrun`/`accelerate launch` would give it (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`); accelerate's `Accelerator` reads it and opens
the process group (gloo on the CPU, NCCL with one GPU per rank on CUDA). One host only.

`launch` settles `cfg.sharding` before the ranks start: "auto" becomes "fsdp" when the base's
weights (summed from its safetensors headers, nothing loaded) exceed `adapters.ranks.FSDP_ABOVE` of
the smallest GPU's memory, else "ddp" (always on the CPU); rank 0's start event carries the choice.

Only the caller talks to the job store: the ranks never see the lease. Progress, cancellation
and lease loss therefore behave as for one process (the caller's `progress` / `should_stop`
callbacks are the same ones), checkpoints and the adapter are written by rank 0, and a resumed
run resumes every rank from the same checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from adapters.checkpoint import read_checkpoint, resolve_model_dir
from adapters.errors import InputError
from adapters.ranks import choose_sharding
from adapters.training import ProgressCallback, TrainingConfig, TrainingProgress, TrainingResult

CONFIG = "config.json"
EVENTS = "events.jsonl"
STOP = "stop"
RESULT = "result.json"


def _config_json(cfg: TrainingConfig) -> str:
    return json.dumps(asdict(cfg))


def _config_from(values: dict) -> TrainingConfig:
    if isinstance(values["targets"], list):
        values = {**values, "targets": tuple(values["targets"])}
    return TrainingConfig(**values)


def launch(cfg: TrainingConfig, *, progress: ProgressCallback | None = None,
           should_stop: Callable[[], bool] | None = None,
           on_start: Callable[[TrainingConfig], None] | None = None, poll_s: float = 0.2) -> TrainingResult:
    """Train `cfg` on `cfg.devices` processes and return rank 0's result (see the module docstring).

    Raises `InputError` as the ranks raised it (bad data, divergence), `RuntimeError` when a rank
    dies otherwise, and whatever `progress`/`should_stop` raise (e.g. a lost lease) — in every case
    after killing the ranks.
    """
    if torch.cuda.is_available() and cfg.devices > torch.cuda.device_count():
        raise InputError(f"devices {cfg.devices} is more than the {torch.cuda.device_count()} GPUs this machine has",
                         param="devices")
    cfg = _settle_sharding(cfg)
    control = Path(tempfile.mkdtemp(prefix="loramill-ranks-"))
    procs: list[subprocess.Popen] = []
    try:
        (control / CONFIG).write_text(_config_json(cfg))
        env = _rank_env(cfg.devices)
        for rank in range(cfg.devices):
            with open(control / f"rank-{rank}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "adapters.distributed", str(control)],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent))
        events = _EventReader(control / EVENTS)
        stop = False

        def relay() -> bool:
            """Hand rank 0's new events to the callbacks; True when `progress` asks to stop."""
            asked = False
            for kind, value in events.read():
                if kind == "start" and on_start is not None:
                    on_start(_config_from(value))
                elif kind == "progress" and progress is not None and progress(_progress_from(value)):
                    asked = True
            return asked

        while True:
            finished = all(p.poll() is not None for p in procs)
            failed = [rank for rank, p in enumerate(procs) if p.returncode not in (None, 0)]
            stop = relay() or stop
            if not stop and should_stop is not None and should_stop():
                stop = True
            if stop:
                (control / STOP).touch()
            if finished or failed or (control / RESULT).exists():  # the result is rank 0's last write: tearing
                break  # down the ranks (process group, interpreter) takes ~10 s under load; the finally cuts it
            time.sleep(poll_s)
        relay()  # what rank 0 wrote after the last read, up to its result
        if failed and not (control / RESULT).exists():
            raise _failure(control, procs, failed)
        return _result_from(json.loads((control / RESULT).read_text()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        shutil.rmtree(control, ignore_errors=True)


def _settle_sharding(cfg: TrainingConfig) -> TrainingConfig:
    """`cfg` with "auto" sharding replaced by "ddp" or "fsdp" (`adapters.ranks.choose_sharding`)."""
    if cfg.sharding != "auto":
        return cfg
    device_bytes = None
    if torch.cuda.is_available():
        device_bytes = min(torch.cuda.get_device_properties(i).total_memory for i in range(cfg.devices))
    base_bytes = sum(t.nbytes for t in read_checkpoint(resolve_model_dir(cfg.base)).values())
    return replace(cfg, sharding=choose_sharding(cfg.sharding, base_bytes, device_bytes))


def _rank_env(world: int) -> dict[str, str]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))  # N ranks share the cores
    # the ranks import this package as the caller does, wherever the caller was started from
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the process that launched it dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class _EventReader:
    """New complete lines of rank 0's events file since the last read."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read(self) -> list[tuple[str, dict]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [next(iter(json.loads(line).items())) for line in complete.splitlines()]


def _progress_from(values: dict) -> TrainingProgress:
    checkpoint = values.get("checkpoint")
    return TrainingProgress(**{**values, "checkpoint": Path(checkpoint) if checkpoint else None})


def _result_from(values: dict) -> TrainingResult:
    return TrainingResult(**{**values, "adapter_dir": Path(values["adapter_dir"]) if values["adapter_dir"] else None,
                             "metrics_path": Path(values["metrics_path"]),
                             "checkpoints": [Path(c) for c in values["checkpoints"]]})


def _failure(control: Path, procs: list[subprocess.Popen], failed: list[int]) -> Exception:
    for rank in failed:  # a rank's InputError is the user's to fix: raise it as such
        error = control / f"error-{rank}.json"
        if error.exists():
            values = json.loads(error.read_text())
            return InputError(values["message"], param=values["param"], code=values["code"])
    rank = failed[0]
    tail = (control / f"rank-{rank}.log").read_text(errors="replace").strip().splitlines()[-20:]
    return RuntimeError(f"training process {rank} of {len(procs)} exited with code {procs[rank].returncode}:\n"
                        + "\n".join(tail))


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, default=str))
    os.replace(tmp, path)


def _rank_main(control: Path) -> int:
    """One rank: train, rank 0 reporting through `control`; exit 0, or 3 after writing an InputError."""
    from adapters.ranks import AcceleratedRanks, ShardedRanks
    from adapters.training import LoraTrainer

    rank = int(os.environ["RANK"])
    cfg = _config_from(json.loads((control / CONFIG).read_text()))
    stop_file = control / STOP

    def report(p: TrainingProgress) -> bool:
        with open(control / EVENTS, "a") as f:
            f.write(json.dumps({"progress": asdict(p)}, default=str) + "\n")
        return stop_file.exists()

    try:
        ranks = ShardedRanks() if cfg.sharding == "fsdp" else AcceleratedRanks()
        trainer = LoraTrainer(cfg, report, None, should_stop=stop_file.exists, ranks=ranks)
        try:
            if ranks.is_main:
                with open(control / EVENTS, "a") as f:
                    f.write(json.dumps({"start": asdict(trainer.cfg)}) + "\n")
            result = trainer.run()
        finally:
            trainer.close()
        if ranks.is_main:
            _write_json(control / RESULT, asdict(result))
        ranks.close()
        return 0
    except InputError as exc:
        _write_json(control / f"error-{rank}.json", {"message": str(exc), "param": exc.param, "code": exc.code})
        return 3


if __name__ == "__main__":
    sys.exit(_rank_main(Path(sys.argv[1])))
