"""The embedded default: `loramill serve` with no broker runs its own worker process, and keeps it alive.

- **One per data dir** (`hold_embedded_lock`): a second `serve` on the same data directory is
  refused, since its worker would compete for the same filesystem queue.
- **Dies with serve**: the worker asks the kernel to kill it when its parent dies
  (`loramill --parent-pid`, a parent-death signal), so a `kill -9` of `serve` leaves no orphan
  training on. Engines started here (`EmbeddedEngines`) do the same.
- **Brought back when it dies** (`EmbeddedWorker`): a supervisor thread waits on the process;
  when it exits unexpectedly, every running job's lease is expired (it was the only worker),
  the reconciler queues those jobs again, and a new worker starts (after a back-off that grows
  while it keeps dying). `/readyz` reports the worker `ready` only while the process lives and
  has said it is consuming (a ready file holding its pid).
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from adapters.errors import InputError
from adapters.fsutil import atomic_write_bytes
from jobs.reconciler import Reconciler

log = logging.getLogger(__name__)
READY_FILE = "embedded-worker.ready"
WORKER_LOG = "worker.log"  # the embedded worker's output, in the data directory


def engine_log_name(base: str) -> str:
    """The embedded engine for base model `base` logs here, in the data directory."""
    return f"engine-{base}.log"
BACKOFF_S = (1, 2, 5, 10, 30)  # waits before restarts that follow one another
STABLE_AFTER_S = 60  # a worker that lived this long resets the back-off


def hold_embedded_lock(data_dir: Path):
    """An exclusive lock on `<data_dir>/embedded.lock` for this process's life: one embedded worker per data dir."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "embedded.lock", "w")  # noqa: SIM115 — kept open: the lock lives with it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(f"another `loramill serve` runs the embedded worker for {data_dir.resolve()}") from None
    return handle


def child_command(*args: str) -> list[str]:
    """A `loramill` command line for a child of this process that dies with it."""
    return [sys.executable, "-c", "from loramill.cli import main; main()", "--parent-pid", str(os.getpid()), *args]


class EmbeddedWorker:
    """A `loramill worker` child process kept running; `probe()` raises unless it is up and consuming."""

    def __init__(self, data_dir: Path, reconciler: Reconciler, env: dict[str, str]):
        self.data_dir, self.reconciler, self.env = data_dir.resolve(), reconciler, env
        self.ready_file = self.data_dir / READY_FILE
        self.log_file = self.data_dir / WORKER_LOG
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="embedded-worker", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        with open(self.log_file, "ab") as output:  # the child keeps its own descriptor
            self.process = subprocess.Popen(child_command("worker", "--queues", "train,merge", "--pool", "solo",
                                                          "--concurrency", "1", "--ready-file", str(self.ready_file)),
                                            env=self.env, stdout=output, stderr=subprocess.STDOUT)
        log.warning("embedded worker pid %d on %s, logging to %s", self.process.pid, self.data_dir / "broker", self.log_file)

    def _supervise(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            code = self.process.wait()
            if self._stopping.is_set():
                return
            log.error("embedded worker pid %d exited with %s; its jobs are queued again", self.process.pid, code)
            self.reconciler.expire_all_leases()
            self.reconciler.run_once()
            failures = 0 if time.monotonic() - started > STABLE_AFTER_S else failures + 1
            if self._stopping.wait(BACKOFF_S[min(failures, len(BACKOFF_S)) - 1] if failures else 0):
                return
            self.restarts += 1
            self._spawn()

    def probe(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            raise RuntimeError("the embedded worker is not running; it is being restarted")
        try:
            ready = self.ready_file.read_text().strip() == str(process.pid)
        except FileNotFoundError:
            ready = False
        if not ready:
            raise RuntimeError(f"the embedded worker (pid {process.pid}) is starting")

    def stop(self, timeout_s: float = 30) -> None:
        self._stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)


def worker_ready_probe(data_dir: Path):
    """`/readyz`'s worker check in an API process that did not start the embedded worker (`serve --workers N`):
    ready while the pid in its ready file lives."""
    ready_file = data_dir.resolve() / READY_FILE

    def probe() -> None:
        try:
            pid = int(ready_file.read_text().strip())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            raise RuntimeError("the embedded worker is not running or starting") from None

    return probe


def child_env(data_dir: Path) -> dict[str, str]:
    return {**os.environ, "LORAMILL_DATA_DIR": str(data_dir.resolve())}


def _answering(url_file: Path) -> str | None:
    """The URL in `url_file` when an engine there answers `/health` (another API process started it)."""
    import httpx

    try:
        url = url_file.read_text().strip()
        return url if httpx.get(f"{url}/health", timeout=2).status_code == 200 else None
    except (OSError, httpx.HTTPError):
        return None


class EmbeddedEngines:
    """Engine processes this API starts itself, one per base model, on first use (`loramill engine`).

    The embedded default for serving: no engine to start and nothing to configure. Each engine
    listens on a free loopback port, logs to `<data_dir>/engine-<base>.log`, dies with the process
    that started it, and is started again on the next request for its base if it died. It stays up
    while the API runs.

    **One per base for all API processes on the data dir** (`loramill serve --workers N`): the
    start is serialised by a file lock (`engine-<base>.lock`), and the engine's URL is left in
    `engine-<base>.url`; an API process that finds there an engine answering `/health` uses it
    instead of starting its own.
    """

    def __init__(self, data_dir: Path, env: dict[str, str], *, start_timeout_s: float):
        self.data_dir, self.env, self.start_timeout_s = data_dir.resolve(), env, start_timeout_s
        self.processes: dict[str, tuple[subprocess.Popen, str]] = {}
        self._lock = threading.Lock()

    async def launch(self, base: str, path: str) -> str:
        import asyncio

        return await asyncio.to_thread(self._start, base, path)

    def _start(self, base: str, path: str) -> str:
        with self._lock, open(self.data_dir / f"engine-{base}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            running = self.processes.get(base)
            if running is not None and running[0].poll() is None:
                return running[1]
            url_file = self.data_dir / f"engine-{base}.url"
            shared = _answering(url_file)
            if shared is not None:
                return shared
            log_file = open(self.data_dir / engine_log_name(base), "ab")  # noqa: SIM115 — the child keeps it
            process = subprocess.Popen(child_command("engine", "--base", path, "--served-model-name", base,
                                                     "--host", "127.0.0.1", "--port", "0"),
                                       env=self.env, stdout=subprocess.PIPE, stderr=log_file, text=True)
            log_file.close()
            url = self._wait_ready(process, base)
            self.processes[base] = (process, url)
            atomic_write_bytes(url_file, url.encode())
            return url

    def _wait_ready(self, process: subprocess.Popen, base: str) -> str:
        """The engine's URL from its `loramill engine ready on http://…` line (its stdout), or 503."""
        from jobs.errors import Unavailable

        found: list[str] = []

        def read() -> None:
            for line in process.stdout:
                if " ready on " in line and not found:
                    found.append(line.split(" ready on ", 1)[1].split()[0])

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not found and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not found:
            process.kill()
            raise Unavailable(f"The inference engine for {base!r} did not start; see {engine_log_name(base)} in the data "
                              "directory", code="engine_unavailable")
        log.warning("embedded engine for %s: pid %d on %s", base, process.pid, found[0])
        return found[0]

    def stop(self) -> None:
        with self._lock:
            for process, _ in self.processes.values():
                process.terminate()
            for process, _ in self.processes.values():
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
            self.processes.clear()
