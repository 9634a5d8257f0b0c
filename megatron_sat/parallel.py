"""Process groups: start torch.distributed and megatron-core model parallelism.

Why here: the trainer, the tools and the tests all need the same start-up (gloo on CPU,
NCCL on GPU, megatron's TP/DP groups, the CPU shim, seeded TP RNG), and DeepSpeed needs
a Megatron-LM-style ``mpu`` object that ``megatron.core.parallel_state`` does not
provide by itself (REFERENCE.md §1).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_sat import cpu_shim


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_parallel(tensor_model_parallel_size: int = 1, seed: int = 1234,
                        backend: str | None = None, timeout_s: int = 600) -> None:
    """Start torch.distributed from the launcher's env (or as 1 process) and megatron's groups.

    Works under ``deepspeed`` (pdsh, openmpi, mpich, slurm launchers), ``torchrun``,
    ``mpirun``, ``srun`` and plain ``python`` (world size 1); see ``training.launch_env``.
    """
    from megatron.core import parallel_state, tensor_parallel

    cpu_shim.install()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        from megatron_sat.training.launch_env import (check_formed_world, discover_world,
                                                      export_world)

        # deepspeed (any --launcher), torchrun, mpirun, srun: their variables -> torch's.
        world = discover_world()
        export_world(world)
        if torch.cuda.is_available():
            torch.cuda.set_device(world.local_rank)
        if world.multi_process:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
            check_formed_world(world)
        else:
            # One plain process: a private store on a free port.  The environment is
            # left alone, so child processes this one starts never inherit a port.
            os.environ.setdefault("LOCAL_RANK", "0")
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % tensor_model_parallel_size != 0:
        raise ValueError(
            f"world size {world} is not divisible by --tensor-model-parallel-size "
            f"{tensor_model_parallel_size}; launch a multiple of TP processes"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class MPU:
    """The Megatron-LM ``mpu`` interface DeepSpeed's ``initialize(mpu=...)`` expects.

    Why: DeepSpeed shards ZeRO state over the data-parallel group and reduces gradient
    norms over the model-parallel group; it finds both through these names.
    """

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps

    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()

    def get_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self):
        return self._ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size()

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0
