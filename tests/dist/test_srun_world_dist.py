"""srun's variables alone (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID + MASTER_ADDR / MASTER_PORT) make
one torch.distributed world through megatron_sapo.cli._adopt_srun_world (tests/unit/test_cli_launch.py has the rest)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

WORKER = """
import os, sys
import torch.distributed as dist
from megatron_sapo import cli
assert cli._adopt_srun_world()
dist.init_process_group("gloo")  # env://, as megatron_sapo.megatron.parallel.init_torch_distributed does
import torch
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(dist.get_rank(), dist.get_world_size(), os.environ["LOCAL_RANK"], int(t.item()), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.dist
def test_two_srun_tasks_form_one_gloo_world(tmp_path):
    """Two processes with only srun's variables (and MASTER_ADDR / MASTER_PORT) meet in one world."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE")}
    procs = []
    for rank in range(2):
        env = dict(base, SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2",
                   SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [["0", "2", "0", "3"], ["1", "2", "1", "3"]]
