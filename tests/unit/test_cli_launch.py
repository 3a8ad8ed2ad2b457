"""How `megatron-sapo train` joins a world started by srun (one task per GPU): SLURM's variables become
torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), never over a torchrun's, never in the batch shell."""

from __future__ import annotations

import os

import pytest

from megatron_sapo import cli
from megatron_sapo.config import ConfigError, load_config

SRUN_TASK = {  # task 11 of `srun --nodes=2 --ntasks-per-node=8` (what slurmstepd sets, abridged)
    "SLURM_NTASKS": "16",
    "SLURM_STEP_NUM_TASKS": "16",
    "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
    "SLURM_PROCID": "11",
    "SLURM_LOCALID": "3",
    "SLURM_NODEID": "1",
    "MASTER_ADDR": "gpu01",
}


def test_srun_task_gets_torchrun_variables():
    env = dict(SRUN_TASK)
    assert cli._adopt_srun_world(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("11", "16", "3", "8")
    assert env["MASTER_PORT"] == "29500"
    env = dict(SRUN_TASK, MASTER_PORT="31000")
    cli._adopt_srun_world(env)
    assert env["MASTER_PORT"] == "31000"


@pytest.mark.parametrize(
    "env",
    [
        dict(SRUN_TASK, RANK="5", WORLD_SIZE="16"),  # torchrun inside srun (one task per node): its values stand
        {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")},  # the batch shell: no step
        dict(SRUN_TASK, SLURM_STEP_NUM_TASKS="1", SLURM_NTASKS="1"),  # srun -n 1
        {},  # no SLURM at all
    ],
    ids=["torchrun-in-srun", "batch-shell", "single-task", "plain"],
)
def test_other_launches_are_left_alone(env):
    before = dict(env)
    assert not cli._adopt_srun_world(env)
    assert env == before


def test_srun_without_master_addr_is_one_clear_error():
    env = {k: v for k, v in SRUN_TASK.items() if k != "MASTER_ADDR"}
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        cli._adopt_srun_world(env)


@pytest.mark.parametrize(
    "value,expected", [("8(x2)", 8), ("8", 8), ("8,8", 8), ("8(x2),4", None), ("", None), ("x", None)]
)
def test_tasks_on_this_node(value, expected):
    assert cli._tasks_on_this_node({"SLURM_STEP_TASKS_PER_NODE": value}) == expected


def test_train_under_srun_adopts_instead_of_relaunching(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so that the values written below are removed afterwards
        monkeypatch.delenv(key)
    for key, value in SRUN_TASK.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(cli, "_relaunch_with_torchrun", lambda *a: pytest.fail("relaunched under srun"))
    cfg = load_config(None, ["parallel.dp=16", "rollout.prompts_per_step=8", "rollout.n=8", "train.micro_batch_size=1"])
    assert cli._relaunch_if_needed(cfg, []) is None
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("11", "16", "3")
