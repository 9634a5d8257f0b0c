"""Launchers: torchrun/deepspeed, OpenMPI, MPICH and Slurm environments form the right world.

The unit part feeds launcher environments (as ``mpirun``, ``srun`` and the DeepSpeed
launchers export them) to :func:`discover_world`. The process part starts 2 real
trainer processes with only OpenMPI's or Slurm's variables (no RANK/WORLD_SIZE/MASTER_ADDR,
as ``mpirun``/``srun python`` leave them) and checks they train as one world of 2
(the data-parallel loss is reduced across both, the global batch is split between them).
A real ``deepspeed --launcher openmpi`` run (mpirun underneath) is added when OpenMPI is
installed (``apt-get install openmpi-bin``); it is skipped otherwise.
"""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from test_train_common import REPO, TINY, make_data, read_metrics

from megatron_sat.training.configs import ConfigError
from megatron_sat.training.launch_env import discover_world, first_slurm_host


def test_discover_world_from_each_launcher():
    w = discover_world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "n0", "MASTER_PORT": "1234"})
    assert (w.launcher, w.world_size, w.rank, w.local_rank, w.master_addr) == ("torch", 4, 3, 1, "n0")
    ompi = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    w = discover_world(ompi)
    assert (w.launcher, w.world_size, w.rank, w.local_rank, w.master_addr) == \
        ("openmpi", 2, 1, 1, "127.0.0.1")  # one node: no MASTER_ADDR needed
    w = discover_world({"PMI_SIZE": "8", "PMI_RANK": "5", "MPI_LOCALRANKID": "1",
                        "MPI_LOCALNRANKS": "4", "MASTER_ADDR": "h1"})
    assert (w.launcher, w.world_size, w.rank, w.local_rank, w.local_world_size) == \
        ("mpich", 8, 5, 1, 4)
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16",
             "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    w = discover_world(slurm)
    assert (w.launcher, w.world_size, w.rank, w.local_rank, w.local_world_size) == \
        ("slurm", 16, 9, 1, 8)
    assert w.master_addr == "gpu07" and w.master_port == 20000 + 123456 % 20000
    assert first_slurm_host("node[3,5-6],login1") == "node3"
    # srun torchrun: one Slurm task per node, several torch ranks each: fine
    w = discover_world({**slurm, "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2",
                        "SLURM_PROCID": "1", "RANK": "9", "WORLD_SIZE": "16",
                        "MASTER_ADDR": "gpu07"})
    assert (w.launcher, w.world_size) == ("torch", 16)
    assert discover_world({}).launcher == "single"


@pytest.mark.parametrize("env,needle", [
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "x", "SLURM_PROCID": "0",
      "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}, "srun started 2 processes but WORLD_SIZE=1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "OMPI_COMM_WORLD_SIZE": "4",
      "OMPI_COMM_WORLD_RANK": "0"}, "openmpi started 4 processes but WORLD_SIZE=2"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "SLURM_PROCID": "0",
      "SLURM_NTASKS": "4"}, "launcher environments disagree on the world size"),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, "MASTER_ADDR is not set"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x"}, "outside WORLD_SIZE"),
])
def test_launcher_mismatch_is_one_line_error(env, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        discover_world(env)
    assert "\n" not in str(e.value)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in list(env):
        if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT") or k.startswith(("OMPI_", "PMI_", "SLURM_")):
            env.pop(k)
    return env


def _launcher_env(kind: str, rank: int, port: int) -> dict:
    if kind == "openmpi":
        return {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": str(rank),
                "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                "MASTER_PORT": str(port)}
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_LOCALID": str(rank), "SLURM_STEP_TASKS_PER_NODE": "2",
            "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost",
            "SLURM_JOB_ID": "77", "MASTER_PORT": str(port)}


def _args(tmp_path, tag):
    data = make_data(str(tmp_path / "data"))
    return TINY + ["--data-path", data, "--split", "90,10,0", "--data-cache-path",
                   tmp_path / f"cache_{tag}", "--global-batch-size", "4", "--train-iters", "2",
                   "--log-interval", "1", "--eval-iters", "0", "--zero-stage", "1",
                   "--metrics-file", tmp_path / f"{tag}.jsonl"]


@pytest.mark.parametrize("kind", ["openmpi", "slurm"])
def test_mpi_and_slurm_environments_form_one_world(tmp_path, kind):
    args = [str(a) for a in _args(tmp_path, kind)]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "pretrain_llama.py"), *args],
                              cwd=REPO, env={**_clean_env(), **_launcher_env(kind, r, port)},
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    assert f"world of 2 processes ({kind} launcher): TP 1 x DP 2" in outs[0][0]
    assert "world of 2" not in outs[1][0]  # only rank 0 logs
    rows = [r for r in read_metrics(tmp_path / f"{kind}.jsonl") if r["kind"] == "train"]
    assert [r["consumed_samples"] for r in rows] == [4, 8]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI (mpirun) not installed")
def test_deepspeed_launcher_openmpi_forms_one_world(tmp_path):
    """``deepspeed --launcher openmpi``: mpirun starts the ranks with only OMPI_* set.

    ``--force_multi`` makes DeepSpeed use the multi-node runner on one host; ssh checks
    are off and the address is given, as no ssh server is assumed.
    """
    args = [str(a) for a in _args(tmp_path, "ompi")]
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    mpi_args = "--oversubscribe" + (" --allow-run-as-root" if os.geteuid() == 0 else "")
    env = _clean_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "deepspeed"),
                           "--force_multi", "--no_ssh_check", "--master_addr", "127.0.0.1",
                           "--launcher", "openmpi", "--hostfile", str(tmp_path / "hostfile"),
                           "--launcher_args", mpi_args, "pretrain_llama.py", *args],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world of 2 processes (openmpi launcher): TP 1 x DP 2" in proc.stdout
    rows = [r for r in read_metrics(tmp_path / "ompi.jsonl") if r["kind"] == "train"]
    assert [r["consumed_samples"] for r in rows] == [4, 8]


def test_world_mismatch_from_the_command_line(capsys, monkeypatch):
    """``srun -n 2 deepspeed --num_gpus 1 ...``: two separate one-rank worlds, refused."""
    from megatron_sat.training.main import main

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}.items():
        monkeypatch.setenv(k, v)
    rc = main(["--model", "tiny", "--data-path", "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "srun started 2 processes but WORLD_SIZE=1" in err
