"""This process's place in a torchrun job: one process per GPU (or CPU share)
training one model with DistributedDataParallel."""

from __future__ import annotations

import os

import torch

from skinlesion.training.loader import ArrayLoader, shard


class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0

    def start(self, device: torch.device) -> None:
        if self.world > 1:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            if device.type == "cpu":  # share the cores instead of oversubscribing them
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))

    def finish(self) -> None:
        """Wait until every rank is done (rank 0 writes the last files), so that no rank
        takes the process group down while another still uses it: gloo aborts a process
        whose peer left first."""
        if self.world > 1:
            torch.distributed.barrier()

    def stop(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def sum(self, values: list[float], device) -> list[float]:
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (all the same shape), in rank order."""
        if self.world == 1:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return parts

    def gather_rows(self, loader: ArrayLoader, rows: torch.Tensor) -> torch.Tensor:
        """Put the per-rank outputs of an unshuffled sharded ``loader`` back in data order."""
        if self.world == 1:
            return rows
        full = torch.empty((len(loader.images), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        for rank, part in enumerate(self.gather(rows)):
            full[shard(torch.arange(len(loader.images)), rank, self.world).to(rows.device)] = part
        return full

    def in_sync(self, model: torch.nn.Module, device) -> bool:
        """Whether every rank holds the same weights (DDP's promise, checked)."""
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().view(1).to(device)
        values = torch.cat(self.gather(checksum))
        return bool((values == values[0]).all())
