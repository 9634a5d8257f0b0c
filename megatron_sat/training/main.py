"""Entry point behind ``pretrain_llama.py``: parse, start processes, train, report.

Why a wrapper: user mistakes (bad flags, missing data, a checkpoint of another shape)
must end as one line naming the problem and the fix, not as a traceback from deep inside
DeepSpeed, and must do so on every launcher (deepspeed, torchrun, mpirun, srun, python).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional, Sequence


def _quiet() -> None:
    for pattern in (".*Transformer Engine.*", ".*Apex.*", ".*apex.*", ".*TorchScript.*"):
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _set_cpu_threads() -> None:
    """Share the cores between the processes of this node when no GPU is present."""
    import torch

    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def _prog() -> str:
    """The name the user typed: the console script, else the Megatron-style root script."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith("megatron-sat") else "pretrain_llama.py"


def _error(msg: str, code: int) -> int:
    if os.environ.get("RANK", "0") == "0":
        print(f"{_prog()}: error: {msg}", file=sys.stderr, flush=True)
    return code


def _preflight(cfg) -> None:
    """Check every input file before any process group or model exists, on every rank:
    a bad file then costs seconds, not a cluster start-up, and ends in one line."""
    from megatron_sat.training.data import check_prefixes
    from megatron_sat.training.engine import deepspeed_config
    from megatron_sat.training.resume import preflight_checkpoint

    check_prefixes(cfg.data, cfg.batch.seq_length)
    deepspeed_config(cfg)
    preflight_checkpoint(cfg)


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet()
    from megatron_sat.tools.cli import ToolError
    from megatron_sat.training.arguments import parse_args
    from megatron_sat.training.checkpointing import CheckpointSaveError
    from megatron_sat.training.configs import ConfigError
    from megatron_sat.training.loop import TrainingAborted

    from megatron_sat.training.launch_env import discover_world, export_world

    try:
        # First, so RANK/LOCAL_WORLD_SIZE are known under mpirun/srun too (one error line).
        world = discover_world()
        export_world(world)
        cfg = parse_args(argv, world_size=world.world_size)
        _preflight(cfg)
    except (ConfigError, ToolError) as e:
        return _error(str(e), 2)
    if os.environ.get("RANK", "0") == "0":
        for note in cfg.notes:
            print(f" > {note}", flush=True)
    _set_cpu_threads()
    from megatron_sat.parallel import destroy_parallel, initialize_parallel

    try:
        initialize_parallel(cfg.parallel.tensor_model_parallel_size, cfg.seed)
        if world.rank == 0:
            print(f" > world of {world.world_size} processes ({world.launcher} launcher): "
                  f"TP {cfg.parallel.tensor_model_parallel_size} x DP "
                  f"{cfg.parallel.data_parallel_size}", flush=True)
        from megatron_sat.training.loop import pretrain

        pretrain(cfg)
    except (ConfigError, ToolError) as e:
        return _error(str(e), 2)
    except CheckpointSaveError as e:
        return _error(str(e), 1)
    except TrainingAborted as e:
        return _error(str(e), 3)
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
