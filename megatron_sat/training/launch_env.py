"""Which processes form the world: read it from whichever launcher started us.

Why: ``torchrun`` and DeepSpeed's default (pdsh) launcher export ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``, but ``deepspeed --launcher openmpi|slurm``, ``mpirun`` and ``srun python``
do not: they export their own variables (``OMPI_COMM_WORLD_*``, ``PMI_*``, ``SLURM_*``).
Without this module each such process would silently become a one-rank world, all of them
on GPU 0 and writing the same ``--save``. We translate the launcher's variables into
torch's (what ``deepspeed.init_distributed(auto_mpi_discovery=True)`` does with mpi4py,
without needing mpi4py) and refuse, in one line, environments that contradict each other.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

from megatron_sat.training.configs import ConfigError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchWorld:
    launcher: str  # "torch" (torchrun, deepspeed/pdsh), "openmpi", "mpich", "slurm", "single"
    world_size: int
    rank: int
    local_rank: int
    local_world_size: int
    master_addr: Optional[str] = None
    master_port: Optional[int] = None

    @property
    def multi_process(self) -> bool:
        """A rendezvous is needed only for two or more processes.

        A world of one (``torchrun --nproc_per_node 1``, or distributed variables left in
        the environment by a parent process) starts on a private store instead: it must
        never listen on a shared ``MASTER_PORT`` that another job on the node may hold.
        """
        return self.world_size > 1


def _int(env: Mapping[str, str], name: str) -> Optional[int]:
    v = env.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"environment variable {name}={v!r} is not an integer; check the "
                          f"launcher") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm hostlist (``node[07-09,12],gpu3`` -> ``node07``)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], text=True,
                                 capture_output=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ConfigError(f"cannot read the first host of SLURM_NODELIST={nodelist!r}; "
                          f"export MASTER_ADDR=<first node> in the job script")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _mpi_family(env: Mapping[str, str]) -> list[tuple[str, int, int, int, Optional[int]]]:
    """(launcher, world, rank, local_rank, local_world) for each launcher env present."""
    found = []
    if "OMPI_COMM_WORLD_SIZE" in env:
        found.append(("openmpi", _int(env, "OMPI_COMM_WORLD_SIZE"),
                      _int(env, "OMPI_COMM_WORLD_RANK") or 0,
                      _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0,
                      _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")))
    if "PMI_SIZE" in env and "PMI_RANK" in env:
        found.append(("mpich", _int(env, "PMI_SIZE"), _int(env, "PMI_RANK"),
                      _int(env, "MPI_LOCALRANKID") or 0, _int(env, "MPI_LOCALNRANKS")))
    slurm_world = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")
    if slurm_world is not None and "SLURM_PROCID" in env:
        local_world = _int(env, "SLURM_NTASKS_PER_NODE")
        if local_world is None and env.get("SLURM_STEP_TASKS_PER_NODE"):
            local_world = int(re.match(r"\d+", env["SLURM_STEP_TASKS_PER_NODE"]).group(0))
        found.append(("slurm", slurm_world, _int(env, "SLURM_PROCID"),
                      _int(env, "SLURM_LOCALID") or 0, local_world))
    return found


def _mpi4py_rank0_address() -> Optional[str]:
    """Rank 0's address, broadcast with mpi4py when it is installed (what DeepSpeed's
    ``mpi_discovery`` does); None without mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    import socket

    comm = MPI.COMM_WORLD
    addr = socket.gethostbyname(socket.gethostname()) if comm.Get_rank() == 0 else None
    return comm.bcast(addr, root=0)


def _master(env: Mapping[str, str], launcher: str, world: int, local_world: Optional[int]
            ) -> tuple[str, int]:
    port = _int(env, "MASTER_PORT")
    if port is None:
        job = _int(env, "SLURM_JOB_ID")
        port = DEFAULT_PORT if job is None else 20000 + job % 20000
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"], port
    if local_world is not None and local_world == world:
        return "127.0.0.1", port  # one node
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") \
        or env.get("SLURM_NODELIST")
    if launcher == "slurm" and nodelist:
        return first_slurm_host(nodelist), port
    addr = _mpi4py_rank0_address()
    if addr:
        return addr, port
    raise ConfigError(f"started by {launcher} with {world} processes on several nodes but "
                      f"MASTER_ADDR is not set; export MASTER_ADDR=<first node's address> "
                      f"(mpirun -x MASTER_ADDR), install mpi4py, or launch with "
                      f"deepspeed/torchrun")


def discover_world(env: Optional[Mapping[str, str]] = None) -> LaunchWorld:
    """The world the launcher intends; a one-line :class:`ConfigError` if it is ambiguous."""
    env = os.environ if env is None else env
    mpi = _mpi_family(env)
    sizes = {name: w for name, w, *_ in mpi}
    if len(set(sizes.values())) > 1:
        raise ConfigError("launcher environments disagree on the world size ("
                          + ", ".join(f"{n}: {w}" for n, w in sizes.items())
                          + "); start the trainer with one launcher")
    for name, world, rank, local_rank, local_world in mpi:
        if world < 1 or not 0 <= rank < world or (local_world and local_rank >= local_world):
            raise ConfigError(f"{name} environment is inconsistent (rank {rank}, world {world}, "
                              f"local rank {local_rank}); check the launcher")
    if "WORLD_SIZE" in env and "RANK" in env:
        world, rank = _int(env, "WORLD_SIZE"), _int(env, "RANK")
        local_rank = _int(env, "LOCAL_RANK") or 0
        local_world = _int(env, "LOCAL_WORLD_SIZE") or world
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}; check the launcher")
        step = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_PROCID" in env else None
        bigger = [(n, w) for n, w in list(sizes.items()) + [("srun", step)]
                  if w is not None and w > world and (n != "slurm" or step is None)]
        if bigger:
            n, w = bigger[0]
            raise ConfigError(f"{n} started {w} processes but WORLD_SIZE={world}: they would "
                              f"train as separate worlds writing the same --save; launch the "
                              f"trainer once per world (one launcher), or drop the outer {n}")
        if world > 1 and not env.get("MASTER_ADDR"):
            raise ConfigError(f"WORLD_SIZE={world} but MASTER_ADDR is not set; launch with "
                              f"torchrun or deepspeed, or export MASTER_ADDR and MASTER_PORT")
        return LaunchWorld("torch", world, rank, local_rank, local_world,
                           env.get("MASTER_ADDR"), _int(env, "MASTER_PORT") or DEFAULT_PORT)
    if mpi:
        name, world, rank, local_rank, local_world = mpi[0]
        addr, port = _master(env, name, world, local_world)
        return LaunchWorld(name, world, rank, local_rank, local_world or world, addr, port)
    return LaunchWorld("single", 1, 0, 0, 1)


def export_world(world: LaunchWorld) -> None:
    """Write the world in torch's variables, so torch, DeepSpeed and megatron agree."""
    if not world.multi_process:
        return
    os.environ.update(RANK=str(world.rank), WORLD_SIZE=str(world.world_size),
                      LOCAL_RANK=str(world.local_rank),
                      LOCAL_WORLD_SIZE=str(world.local_world_size),
                      MASTER_ADDR=str(world.master_addr), MASTER_PORT=str(world.master_port))


def check_formed_world(world: LaunchWorld) -> None:
    """After rendezvous: the process group must be the world the launcher announced."""
    import torch.distributed as dist

    if dist.get_world_size() != world.world_size or dist.get_rank() != world.rank:
        raise ConfigError(f"torch.distributed formed a world of {dist.get_world_size()} (rank "
                          f"{dist.get_rank()}) but the {world.launcher} launcher announced "
                          f"{world.world_size} (rank {world.rank}); check MASTER_ADDR/MASTER_PORT")
