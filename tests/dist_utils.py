"""Run a test function in N real processes on gloo (torch.multiprocessing, spawn)."""

import os
import socket
import traceback

import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, errfile):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        import warnings

        warnings.filterwarnings("ignore")
        import torch

        torch.set_num_threads(1)
        fn(rank, world_size, *args)
    except BaseException:
        with open(f"{errfile}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise


def run_distributed(fn, world_size, *args, tmp_path):
    """Spawn ``fn(rank, world_size, *args)`` on ``world_size`` processes; raise on failure."""
    errfile = os.path.join(str(tmp_path), "dist_error")
    try:
        mp.start_processes(_entry, args=(world_size, _free_port(), fn, args, errfile),
                           nprocs=world_size, join=True, start_method="spawn")
    except Exception as exc:
        msgs = []
        for r in range(world_size):
            p = f"{errfile}.{r}"
            if os.path.exists(p):
                msgs.append(f"--- rank {r} ---\n" + open(p).read())
        raise AssertionError("distributed test failed:\n" + "\n".join(msgs)) from exc
