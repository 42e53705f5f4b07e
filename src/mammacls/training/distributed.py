"""Training on several processes with torchrun: one process per GPU (or CPU share), PyTorch DDP.

``torchrun --nproc-per-node N -m mammacls train ...`` starts N copies of the command with
RANK / LOCAL_RANK / WORLD_SIZE and a rendezvous in their environment; ``world()`` joins
the process group (NCCL on GPUs, gloo on CPUs) and says who this process is. Rank 0
alone logs, saves, calibrates and exports; the others train and wait.
``mammacls train --nproc-per-node N`` hands its own command line to torch's launcher.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any

from mammacls.errors import MammaclsError, param


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world(device: str = "auto") -> World:
    """This process's place in the run, joining the process group on first call under torchrun."""
    if not launched_by_torchrun():
        return SINGLE
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if device == "cuda" and not torch.cuda.is_available():
            raise MammaclsError(f"{param('device')} cuda: CUDA is not available here")
        if use_cuda:
            if local_rank >= torch.cuda.device_count():
                raise MammaclsError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                                    "start at most one process per GPU")
            torch.cuda.set_device(local_rank)  # "cuda" means this process's GPU from here on
        # generous: with one fold per process, rank 0 may wait hours for the slowest fold
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=12))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())


def shutdown() -> None:
    if launched_by_torchrun():
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def broadcast(value: Any, current: World) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object; only between our own processes)."""
    if not current.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(current: World) -> None:
    if current.distributed:
        import torch.distributed as dist

        dist.barrier()


def sum_over_ranks(values: list[float], current: World) -> list[float]:
    if not current.distributed:
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if current.backend == "nccl":  # NCCL reduces GPU tensors only
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def wrap_for_training(module, current: World, device: str):
    """``module`` in DistributedDataParallel when there are several processes (gradients averaged)."""
    if not current.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[current.local_rank] if device.startswith("cuda") else None)


def launch(nproc_per_node: int, command: list[str]) -> int:
    """Run ``python -m mammacls <command>`` in ``nproc_per_node`` processes with torch's own launcher."""
    if nproc_per_node < 1:
        raise MammaclsError(f"{param('nproc_per_node')} must be at least 1")
    if launched_by_torchrun():
        raise MammaclsError(f"{param('nproc_per_node')}: already running under torchrun; drop the option")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc_per_node}",
                                         "--module", "mammacls", *command])
    try:
        run(args)
    except ChildFailedError as failure:
        first = next(iter(failure.failures.values()), None)
        code = getattr(first, "exitcode", 1) or 1
        return code if code > 0 else 1
    return 0


def strip_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``--option VALUE`` / ``--option=VALUE``."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(option + "="):
            out.append(item)
    return out


def command_line() -> list[str]:
    """The mammacls command line of this process (what follows the program name)."""
    return list(sys.argv[1:])
