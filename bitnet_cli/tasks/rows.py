"""Training data as numbered rows: row n of a run's data is the same whoever makes it.

A stream's whole position is then one counter, and data-parallel training needs no
coordination: of each global batch of B rows, rank r of W makes only rows
[n + r*B/W, n + (r+1)*B/W), so the ranks read disjoint shares whose union is exactly the batch
a single process would have trained on.
"""

from __future__ import annotations

import torch


class RowStream:
    """Endless, resumable (inputs, labels) batches; subclasses define `make_rows(first, count)`.

    `batch_size` is the global batch; `rank` and `world_size` pick this process's share of it.
    """

    def __init__(self, seed: int, batch_size: int, rank: int = 0, world_size: int = 1):
        assert batch_size % world_size == 0, "dist.check_world checks this before training"
        self.seed, self.batch_size = seed, batch_size
        self.rank, self.world_size = rank, world_size
        self.rows = 0  # rows of the global stream consumed by every rank together

    def make_rows(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        share = self.batch_size // self.world_size
        batch = self.make_rows(self.rows + self.rank * share, share)
        self.rows += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.rows = state["seed"], state["rows"]


class DeviceBatches:
    """A stream's batches on the training device, the next one made ahead of time.

    The loop calls `prefetch()` once a step's work is queued: on a GPU, which computes while
    the host goes on, the next batch is then made and its copy started (from pinned memory,
    without waiting) while the step runs. `state_dict()` is the position of the batches handed
    out, not counting the one made ahead, so a checkpoint resumes at the right batch.
    """

    def __init__(self, stream: RowStream, device: torch.device):
        self.stream, self.device = stream, device
        self.pinned = device.type == "cuda"
        self.ahead = None  # (stream state before it, (inputs, labels) on the device)

    def prefetch(self) -> None:
        if self.ahead is None:
            state = self.stream.state_dict()
            batch = tuple(self._to_device(t) for t in self.stream.next_batch())
            self.ahead = (state, batch)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.prefetch()
        (_, batch), self.ahead = self.ahead, None
        return batch

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.pinned:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def state_dict(self) -> dict:
        return self.ahead[0] if self.ahead is not None else self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ahead = None
        self.stream.load_state_dict(state)
