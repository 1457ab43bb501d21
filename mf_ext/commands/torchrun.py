"""A command's run under torchrun (RANK, WORLD_SIZE set): the process group around it."""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.distributed as dist

from mf_ext import distributed
from mf_ext.commands.errors import CliError


def launch(body: Callable[..., int], args: argparse.Namespace, device: torch.device,
           command: str, needs_torchrun: bool) -> int:
    """body(args, device) in a plain process; under torchrun, body(args, device, rank=...,
    world_size=...) inside the process group init_from_environment makes (gloo on the CPU,
    nccl for CUDA). `needs_torchrun`: the options ask for several processes (--shard-factors),
    which a plain process refuses clearly."""
    if not distributed.launched_by_torchrun():
        if needs_torchrun:
            raise CliError(f"--shard-factors splits the model across processes: launch with "
                           f"torchrun (e.g. torchrun --nproc_per_node 2 -m mf_ext {command} ...)")
        return body(args, device)
    device = distributed.init_from_environment(str(device))
    try:
        status = body(args, device, rank=dist.get_rank(), world_size=dist.get_world_size())
        # Rank 0 may still be testing and saving: tearing the group down while it does made
        # the early ranks abort at exit now and then ("terminate called ...").
        dist.barrier()
        return status
    finally:
        dist.destroy_process_group()
