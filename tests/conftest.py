"""Shared test set-up: quiet warnings, one single-process megatron group per session."""

import os
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def megatron_single():
    """megatron-core parallel state for one process (TP=1, DP=1) on gloo.

    Set up once and reused; set up again only when an in-process entry point that a
    test ran (``pretrain_llama`` ``main``, ``eval_ppl``) tore the groups down when it ended.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_sat.parallel import initialize_parallel

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        initialize_parallel(tensor_model_parallel_size=1, seed=1234)
    yield


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(1)
    yield


# LOCAL_RANK stays: the single-process set-up exports it for DeepSpeed, which reads it in
# every later in-process engine, and without RANK/WORLD_SIZE it forms no world.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "ACCELERATE_USE_DEEPSPEED")


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    """Undo distributed variables an in-process set-up (accelerate, DeepSpeed) leaves behind.

    Otherwise every later subprocess a test starts would inherit a one-rank world on port
    29500, and one hung trainer holding that port fails the rest of the suite.
    """
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
