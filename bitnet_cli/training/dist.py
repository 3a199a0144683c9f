"""Data-parallel training on torch.distributed; the only module that reads RANK and WORLD_SIZE.

torchrun (or `bitnet train --nproc-per-node N`, which calls torchrun's own launcher) starts one
process per device and tells each, through its environment, its rank and the world size. The
model never knows: `wrap` puts DistributedDataParallel around it from the outside, and the
training loop asks this module who it is and when to agree with the others.

Every rank runs the same loop on its own share of each global batch (see tasks/rows.py);
DDP averages the gradients, so the optimizer steps are those of one process on the whole batch.
Only rank 0 writes: metrics, state and checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from bitnet_cli.errors import BitnetError, Reported


@dataclass(frozen=True)
class Share:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current() -> Share:
    """This process's place in the job, from the variables torchrun sets (none: a lone process)."""
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", 1))
    return Share(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                 world_size=world_size,
                 local_world_size=int(env.get("LOCAL_WORLD_SIZE", world_size)))


def on_this_machine(nproc: int) -> Share:
    """The job `--nproc-per-node N` starts: N processes, all here."""
    return Share(world_size=nproc, local_world_size=nproc)


def check_world(share: Share, batch_size: int, device: torch.device) -> None:
    """Fail early, with what to do, on a job that cannot run as asked."""
    world_size, local_world_size = share.world_size, share.local_world_size
    if world_size < 2:
        return
    if device.type == "mps":
        raise BitnetError("multi-process training runs on CUDA (NCCL) or CPU (gloo), not on "
                          "Apple GPUs; pass --device cpu, or train in one process")
    if device.type == "cuda" and local_world_size > torch.cuda.device_count():
        raise BitnetError(f"--nproc-per-node {local_world_size} asks for more processes than "
                          f"this machine's {torch.cuda.device_count()} GPU(s); use at most "
                          f"{torch.cuda.device_count()}, or --device cpu")
    if batch_size % world_size:
        raise BitnetError(f"a batch of {batch_size} sequences cannot be split evenly over "
                          f"{world_size} processes; pass a --batch-size divisible by {world_size} "
                          "(the batch is the global one, shared out over the processes)")


def start(share: Share, device: torch.device) -> torch.device:
    """Join the process group (NCCL for CUDA tensors, gloo for CPU ones) and return the device
    this rank trains on: its own GPU on a CUDA machine."""
    if not share.distributed:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", share.local_rank)
        torch.cuda.set_device(device)
    _join()
    return device


def _join() -> None:
    """Join the process group once: gloo carries CPU tensors, NCCL (where there is one) CUDA's."""
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    # Ranks wait for rank 0 while it evaluates or saves; allow for a slow checkpoint.
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo",
                            timeout=timedelta(minutes=30))


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, share: Share, device: torch.device) -> nn.Module:
    """The module the training step calls: the model itself, or DDP around it."""
    if not share.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel
    # No buffer broadcast before each forward: the only buffers are the RoPE tables, which
    # every rank computes alike and nothing changes.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def gradient_sync(module: nn.Module, sync: bool):
    """Within gradient accumulation, only the last micro-step needs to all-reduce gradients."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place); the tensor itself in a lone process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """Whether the flag is set on any rank: every rank gets the same answer, so all of them stop
    at the same step when a signal reaches only some. (A CPU tensor, so it goes over gloo and
    never waits for the GPU.)"""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def main_first(share: Share, work) -> str:
    """Run `work()` (which returns text) on rank 0 alone and give its result to every rank.
    If it fails there, rank 0 raises the error and the others raise Reported."""
    if not share.distributed:
        return work()
    _join()
    failure, text = None, ""
    if share.is_main:
        try:
            text = work()
        except BaseException as e:  # noqa: BLE001 — re-raised below, once the others know
            failure = e
    # Text travels as bytes in tensors (no pickle): first the length (-1: failed), then bytes.
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    length = torch.tensor([-1 if failure else len(data)], dtype=torch.int64)
    dist.broadcast(length, src=0)
    if length.item() < 0:
        if failure is not None:
            raise failure
        raise Reported("rank 0 could not start the run (its message says why)")
    if not share.is_main:
        data = torch.empty(int(length.item()), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return bytes(data.tolist()).decode()


_PEER_GONE = re.compile(r"Connection (closed|reset)[a-z ]*|Broken pipe|timed out|NCCL error")
SUPERVISED = "BITNET_SUPERVISED"  # set by `launch`, which reports a lost worker itself


def peer_failure(error: BaseException) -> str | None:
    """If an exception is a collective failing because another rank went away, what happened."""
    if not (dist.is_initialized() and isinstance(error, RuntimeError)):
        return None
    found = _PEER_GONE.search(str(error))
    return f"lost contact with another worker ({found.group(0)})" if found else None


def lost_peer_error(message: str) -> BitnetError:
    """The error to stop with after losing a peer: quiet when the launcher will say it."""
    return Reported(message) if os.environ.get(SUPERVISED) else BitnetError(message)


def launch(nproc: int, argv: list[str]) -> tuple[int, str | None]:
    """Run `python -m bitnet_cli ARGV` as `nproc` workers on this machine with torchrun's own
    launcher. Returns the exit code to leave with (0; 130 when the run was interrupted; 1) and,
    when a worker failed, which one and how."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun would pick 1 thread per worker and warn about it; share the cores out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # The workers speak for themselves; torchrun's own progress notes are noise here.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ[SUPERVISED] = "1"
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--module",
         "bitnet_cli", *argv])
    try:
        run(args)
    except SignalException:  # Ctrl-C or SIGTERM to the launcher: the workers saved and stopped
        return 130, None
    except ChildFailedError as e:
        failures = sorted(e.failures.items(), key=lambda item: item[1].timestamp)
        if all(f.exitcode == 130 for _, f in failures):
            return 130, None
        rank, first = failures[0]
        if first.exitcode < 0:
            how = f"was killed by {signal.Signals(-first.exitcode).name}"
        else:
            how = f"exited with code {first.exitcode}"
        return 1, f"worker {rank} (pid {first.pid}) {how}"
    return 0, None
