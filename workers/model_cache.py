"""The last base model a worker trained on stays loaded, so consecutive jobs on one base skip the load."""

from __future__ import annotations

import gc
import threading


class BaseModelCache:
    """Holds at most one loaded base model, keyed by its directory. Not shared across processes."""

    def __init__(self):
        self._path: str | None = None
        self._model = None
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, path: str):
        from adapters.training import load_base_model

        with self._lock:
            if self._path != path:
                self._model, self._path = None, None
                gc.collect()
                _empty_device_cache()
                self._model = load_base_model(path)
                self._path = path
                self.loads += 1
            return self._model


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


base_models = BaseModelCache()
