"""Where one training process stands among the processes training the same adapter.

`Ranks` is the one-process case: every method is the identity, so the training loop reads the
same for one process and for N. `AcceleratedRanks` is one of N processes started by
`adapters.distributed` (or by `accelerate launch`): accelerate reads the process group from the
environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) and opens it on
gloo (CPU) or NCCL (CUDA, one GPU per process).

Data parallelism, as the loop uses it: every process builds the same global micro-batches (same
seed, same order) and trains on its contiguous share of each one's rows. With `n` the supervised
tokens of the whole optimizer step, each process back-propagates `world · loss_sum_share / n`;
DDP averages the gradients over the `world` processes, so every process holds

    ∇ (Σ_shares loss_sum_share) / n = ∇ loss_sum_global / n

— the one-process gradient, summed in a different order (hence equal within fp32 rounding,
not bit for bit).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the API reads MAX_DEVICES without loading it
    import torch

MAX_DEVICES = 64  # processes one run may ask for (a node's GPUs, or a few nodes'); the worker's setting caps it lower


class Ranks:
    """One process: the whole batch, no communication."""

    world = 1
    rank = 0

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def is_main(self) -> bool:
        """The process that writes files (checkpoints, metrics, the adapter) and reports progress."""
        return self.rank == 0

    def share(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """This process's contiguous share of a micro-batch's rows (dim 0); None when it has none
        (a last batch with fewer rows than processes)."""
        return batch

    def sum(self, value: float) -> float:
        """`value` summed over the processes (every process gets the sum)."""
        return value

    def agree(self, flag: bool) -> bool:
        """The main process's `flag`, on every process: how a stop reaches all of them at the same point."""
        return flag

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` as the processes train it together (DDP); itself for one process."""
        return module

    def no_sync(self, module: torch.nn.Module):
        """Accumulate gradients locally (no all-reduce) inside this context."""
        return nullcontext()

    def main_first(self):
        """The main process runs the body first (fills a cache), then the others."""
        return nullcontext()

    def close(self) -> None:
        pass


class AcceleratedRanks(Ranks):
    """One of `WORLD_SIZE` processes, through accelerate's `Accelerator` and its DDP wrapping.

    DDP keeps a whole copy of the frozen base per process and all-reduces the gradients of what
    requires grad (the LoRA weights only: a few MB per step). Sharding the base itself over the
    GPUs (FSDP, for a base that does not fit one) is not done here: see README, Training.
    """

    def __init__(self):
        import torch
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        super().__init__(self.accelerator.device)

    def share(self, batch):
        rows = batch["input_ids"].shape[0]
        first, last = rows * self.rank // self.world, rows * (self.rank + 1) // self.world
        if first == last:
            return None
        return {k: v[first:last] for k, v in batch.items()}

    def sum(self, value: float) -> float:
        import torch

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def agree(self, flag: bool) -> bool:
        import torch

        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())

    def wrap(self, module):
        return self.accelerator.prepare_model(module)

    def no_sync(self, module):
        return self.accelerator.no_sync(module)

    def main_first(self):
        return self.accelerator.main_process_first()

    def close(self) -> None:
        self.accelerator.end_training()
