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

Two ways the N processes hold the model (`sharding`; "auto" asks `choose_sharding`):

- "ddp" (`AcceleratedRanks`): each process holds the whole frozen base; DDP all-reduces the
  gradients of what trains (the LoRA weights) during the last micro-batch's backward.
- "fsdp" (`ShardedRanks`), for a base that does not fit one device: each frozen base tensor is cut
  into N dim-0 shards, one per process; a decoder layer's full weights exist on a process only
  while that layer runs forward or backward. The LoRA weights stay whole and replicated (FSDP
  ignores them) and their gradients are averaged after the last micro-batch, which is exactly
  DDP's mean above. So the optimizer, checkpoints, the saved adapter and resume are those of DDP:
  rank 0 holds every LoRA weight and writes them in PEFT's format, with no gathering step.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the API reads MAX_DEVICES without loading it
    import torch

MAX_DEVICES = 64  # processes one run may ask for (a node's GPUs, or a few nodes'); the worker's setting caps it lower
SHARDINGS = ("auto", "ddp", "fsdp")  # how N processes hold the base; see the module docstring
FSDP_ABOVE = 0.5  # "auto" shards the base when its weights exceed this fraction of one device's memory


def choose_sharding(requested: str, base_bytes: int, device_bytes: int | None) -> str:
    """The sharding to train with: `requested` unless it is "auto", which picks "fsdp" when the base's
    weights (`base_bytes`, from the checkpoint's headers) take more than `FSDP_ABOVE` of the smallest
    device's memory (`device_bytes`), else "ddp".

    Half, because a DDP rank needs room beside the weights for activations (a few GB at long
    sequences), the LoRA weights with their gradients and Adam moments, and the CUDA context.
    `device_bytes` None (CPU ranks): "ddp", since the ranks share the host's memory and there is no
    device to fit; DDP also skips FSDP's per-layer all-gathers.
    """
    if requested != "auto":
        return requested
    if device_bytes is None:
        return "ddp"
    return "fsdp" if base_bytes > FSDP_ABOVE * device_bytes else "ddp"


def local_bytes(tensors) -> int:
    """Bytes these tensors take on this process: a sharded (DTensor) parameter counts its local shard only."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


class Ranks:
    """One process: the whole batch, no communication."""

    world = 1
    rank = 0
    shards_base = False  # True: the base is loaded into host memory and `wrap` moves this process's shards to `device`

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

    def wrap(self, module: torch.nn.Module, layers: list[torch.nn.Module]) -> torch.nn.Module:
        """`module` as the processes train it together (DDP, or FSDP sharding each of `layers` — the decoder
        blocks — and the rest); itself for one process. Called before the optimizer is built."""
        return module

    def no_sync(self, module: torch.nn.Module):
        """Accumulate gradients locally (no all-reduce) inside this context."""
        return nullcontext()

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """After the last micro-batch's backward: make `params`' gradients their mean over the processes
        (DDP did it during that backward, so only FSDP's replicated LoRA weights need it)."""

    def main_first(self):
        """The main process runs the body first (fills a cache), then the others."""
        return nullcontext()

    def close(self) -> None:
        pass


class AcceleratedRanks(Ranks):
    """One of `WORLD_SIZE` processes, through accelerate's `Accelerator` and its DDP wrapping.

    DDP keeps a whole copy of the frozen base per process and all-reduces the gradients of what
    requires grad (the LoRA weights only: a few MB per step).
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

    def wrap(self, module, layers):
        return self.accelerator.prepare_model(module)

    def no_sync(self, module):
        return self.accelerator.no_sync(module)

    def main_first(self):
        return self.accelerator.main_process_first()

    def close(self) -> None:
        self.accelerator.end_training()


class ShardedRanks(AcceleratedRanks):
    """One of `WORLD_SIZE` processes holding 1/N of the frozen base: torch's FSDP2 (`fully_shard`) on the
    process group accelerate opened.

    Why not accelerate's `FullyShardedDataParallelPlugin`: accelerate (1.15) turns FSDP on only for
    GPU-like distributed types (`AcceleratorState.__init__`: a CPU/gloo run stays `MULTI_CPU`, the
    plugin is dropped and `prepare_model` gives DDP), so that path could never run on the gloo ranks
    the tests use. Calling `fully_shard` directly is one code path on NCCL and gloo, the tested one;
    accelerate still opens the process group and places each rank on its device.

    What one process holds, base `P` bytes over `N` processes: its shards of every base tensor (`P/N`,
    plus padding of dim 0 to a multiple of N); one decoder layer's gathered weights while that layer
    runs (two in backward's prefetch); the root's (embeddings, final norm, LM head: the rest of the
    base) gathered through each micro-batch's forward and backward, since the loss reads the head's
    weight directly (`adapters.lm_loss`); the whole LoRA weights, their gradients and Adam's two
    moments; activations of its share of the micro-batch. The root is resharded after each forward
    too, so no forward — training or the evaluation's no-grad one — leaves gathered weights behind:
    rank 0's state-dict read when it saves a checkpoint (which reshards, locally) then cannot put the
    processes out of step.

    Loading: every process reads the whole base into host memory (`shards_base`), `wrap` moves its
    shard of each tensor to the device and the rest is freed; host memory peaks at N copies of the base
    while the processes load; device memory holds the shards plus what is gathered at the time.
    """

    shards_base = True

    def wrap(self, module, layers):
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        replicated = [p for p in module.parameters() if p.requires_grad]
        for p in replicated:  # FSDP leaves ignored parameters where they are (host memory, with the base)
            p.data = p.data.to(self.device)
        _flat_in_place([p.data for p in replicated], lambda flat: torch.distributed.broadcast(flat, src=0))
        # every process starts from rank 0's LoRA weights, as DDP makes them
        mesh = init_device_mesh(self.device.type, (self.world,))
        for layer in layers:
            fully_shard(layer, mesh=mesh, ignored_params=set(replicated))
        return fully_shard(module, mesh=mesh, reshard_after_forward=True, ignored_params=set(replicated))

    def no_sync(self, module):
        return nullcontext()  # FSDP reduces no gradient (the base is frozen); LoRA's wait for average_gradients

    def average_gradients(self, params):
        import torch

        def mean(flat: torch.Tensor) -> None:  # a sum, then the division: gloo has no AVG
            torch.distributed.all_reduce(flat)
            flat /= self.world

        _flat_in_place([p.grad for p in params], mean)


def _flat_in_place(tensors: list[torch.Tensor], collective) -> None:
    """Run `collective` on one flat copy of `tensors` (one message, not one per LoRA matrix) and copy it back."""
    import torch

    flat = torch.cat([t.reshape(-1) for t in tensors])
    collective(flat)
    for t, value in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(value.view_as(t))
