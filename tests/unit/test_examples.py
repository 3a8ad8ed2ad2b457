"""examples/: every config validates, `megatron-sapo plan` of the Qwen3-30B-A3B recipe prints the sizes its
layout implies, the baselines differ from the SAPO recipe only in `algo`, and the sbatch scripts are valid bash
whose geometry matches their config; the scripts are also run end to end against stub srun / scontrol / curl."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

from megatron_sapo.cli import main
from megatron_sapo.config import load_config, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml")))
SBATCH = sorted(glob.glob(os.path.join(ROOT, "examples", "slurm", "*.sbatch")))
SAPO_30B = os.path.join(ROOT, "examples", "qwen3_30b_a3b_sapo.yaml")
BASELINES = {"qwen3_30b_a3b_grpo_r2.yaml": ("grpo", "r2"), "qwen3_30b_a3b_gspo.yaml": ("gspo", "none")}


def test_the_recipes_are_there():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"tiny_moe_cpu.yaml", "qwen3_30b_a3b_sapo.yaml", *BASELINES} <= names
    assert {"train_multinode.sbatch", "sglang_servers.sbatch"} <= {os.path.basename(p) for p in SBATCH}


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_every_example_config_validates(path):
    cfg = load_config(path)  # validation is arithmetic on the config: no checkpoint or data file is opened
    assert cfg.parallel.world_size >= 1


def _plan(capsys, *overrides) -> dict[str, str]:
    assert main(["plan", SAPO_30B, *overrides]) == 0
    lines = capsys.readouterr().out.splitlines()
    return dict(line.split(": ", 1) for line in lines)


def _number(text: str) -> float:
    return float(re.match(r"[\d,.]+", text).group(0).replace(",", ""))


def test_plan_of_the_30b_recipe(capsys):
    cfg = load_config(SAPO_30B)
    m, p = cfg.model, cfg.parallel
    out = _plan(capsys)
    assert _number(out["world size"]) == 16 == p.tp * p.pp * p.cp * p.dp
    # the public Qwen3-30B-A3B: 30.5B parameters, 3.3B activated per token
    assert 30.4e9 < _number(out["parameters"]) < 30.6e9
    assert 3.2e9 < _number(out["activated per token"]) < 3.4e9
    assert _number(out["layers per pipeline stage"]) == m.num_layers // p.pp == 24
    assert out["experts per EP rank"].startswith(f"{m.num_experts // p.ep} of {m.num_experts}") and p.ep == 8
    # by hand: attention (q, k, v, o with 32 query and 4 KV heads of 128), norms, router; the embedding and
    # the output layer (untied) land one on each of the 2 stages; 16 of 128 experts in 24 of 48 layers
    layer = 2048 * 128 * (32 + 32 + 4 + 4) + 2 * 2048 + 2 * 128 + 2048 * 128
    dense_rank = (48 * layer + 2 * 151936 * 2048 + 2048) / (p.tp * p.pp)
    expert_rank = 24 * 16 * 3 * 2048 * 768
    assert _number(out["parameters per rank"]) == pytest.approx(dense_rank + expert_rank, abs=1)
    # bf16 weights, fp32 grads, Adam (fp32 main + 2 moments) sharded by the distributed optimizer over dp=4
    # for dense parameters; expert data parallel = tp*dp/ep = 1, so expert optimizer state is not sharded
    expected = (dense_rank + expert_rank) * (2 + 4) + dense_rank * 12 / 4 + expert_rank * 12
    state = out["weights+grads+optimizer per rank"]
    assert _number(state) == pytest.approx(expected / 2**30, abs=2e-3)
    assert _number(state) < 60  # of an H100's 80 GB, the rest for activations
    assert _number(out["per step"]) == cfg.rollout.prompts_per_step * cfg.rollout.n


def test_plan_follows_the_layout(capsys):
    base = _plan(capsys)
    ep4 = _plan(capsys, "parallel.ep=4")
    assert (
        ep4["experts per EP rank"].startswith("32 of 128") and "expert data parallel: 2" in ep4["experts per EP rank"]
    )
    assert _number(ep4["parameters per rank"]) > _number(base["parameters per rank"])
    pp4 = _plan(capsys, "parallel.pp=4", "parallel.dp=2", "parallel.ep=4")
    assert _number(pp4["layers per pipeline stage"]) == 12 and _number(pp4["world size"]) == 16
    no_dist = _plan(capsys, "optim.distributed_optimizer=false")
    assert _number(no_dist["weights+grads+optimizer per rank"]) > _number(base["weights+grads+optimizer per rank"])


def test_a_bad_layout_is_refused_by_plan(capsys):
    assert main(["plan", SAPO_30B, "parallel.ep=3"]) == 2
    assert "parallel.ep" in capsys.readouterr().err


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_differ_from_the_sapo_recipe_only_in_algo(name):
    sapo = _flat(to_dict(load_config(SAPO_30B)))
    other = _flat(to_dict(load_config(os.path.join(ROOT, "examples", name))))
    changed = {k for k in sapo if sapo[k] != other[k]}
    assert changed and all(k.startswith("algo.") or k == "run.dir" for k in changed), changed
    assert other["run.dir"] != sapo["run.dir"]  # separate run folders (and SGLang URL files)
    assert (other["algo.loss"], other["algo.routing_replay"]) == BASELINES[name]
    assert other["algo.minibatches"] == sapo["algo.minibatches"] == 4


# ----------------------------------------------------------------------------------------------------------
# sbatch scripts
# ----------------------------------------------------------------------------------------------------------
def _sbatch_options(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.M))


def _default_config(text: str) -> str:
    return re.search(r"^CONFIG=(\S+)$", text, flags=re.M).group(1)


@pytest.mark.parametrize("path", SBATCH, ids=os.path.basename)
def test_sbatch_script_is_valid_and_matches_its_config(path):
    subprocess.run(["bash", "-n", path], check=True)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for ref in set(re.findall(r"examples/[\w./-]+\.yaml", text)):
        assert os.path.exists(os.path.join(ROOT, ref)), ref
    cfg = load_config(os.path.join(ROOT, _default_config(text)))
    opts = _sbatch_options(text)
    gpus = int(opts["nodes"]) * int(opts["gpus-per-node"])
    if "megatron-sapo train" in text:  # one task per GPU, one per rank of the layout
        assert opts["ntasks-per-node"] == opts["gpus-per-node"]
        assert gpus == cfg.parallel.world_size
        assert "--requeue" in text and "checkpoint.resume=auto" in text
    else:  # the rollout servers fill their GPUs
        assert gpus == cfg.rollout.sglang.num_servers * cfg.rollout.sglang.tp


def _stub(directory: str, name: str, body: str) -> None:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/bash\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


@pytest.fixture
def slurm_env(tmp_path):
    """Stub scontrol / srun / curl on PATH; srun logs its arguments (and MASTER_ADDR) and runs `bash -c`."""
    if not os.path.exists(os.path.join(sys.prefix, "bin", "activate")):
        pytest.skip("the scripts activate a virtualenv (VENV); these tests run outside one")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _stub(stubs, "scontrol", 'if [[ $1 == show ]]; then printf "%s\\n" $STUB_HOSTS; else echo "$@" >>"$STUB_LOG"; fi\n')
    _stub(stubs, "srun", '{ printf "srun MASTER_ADDR=%s " "${MASTER_ADDR:-}"; printf "%q " "$@"; echo; }'
          ' >>"$STUB_LOG"\nwhile [[ $# -gt 0 && $1 != bash ]]; do shift; done\n[[ $# -gt 0 ]] && exec "$@"\n'
          'exit 0\n')  # fmt: skip
    _stub(stubs, "curl", "exit 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "MASTER_", "SGLANG_", "RUN_"))}
    env.update(
        PATH=f"{stubs}:{os.environ['PATH']}", VENV=sys.prefix, REPO=ROOT, RUN_ROOT=str(tmp_path / "runs"),
        STUB_LOG=str(tmp_path / "calls.log"), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[01-02]",
    )  # fmt: skip
    return env, tmp_path


def test_train_sbatch_runs_srun_with_the_config_and_overrides(slurm_env):
    env, tmp = slurm_env
    env.update(STUB_HOSTS="gpu01 gpu02", SLURM_NTASKS="16", SGLANG_URLS='["http://r0:30000"]')
    script = os.path.join(ROOT, "examples", "slurm", "train_multinode.sbatch")
    run = subprocess.run(["bash", script, "train.steps=3"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    calls = (tmp / "calls.log").read_text().splitlines()
    (train,) = [c for c in calls if "megatron-sapo train" in c]
    run_dir = tmp / "runs" / "qwen3_30b_a3b_sapo"
    assert train.startswith("srun MASTER_ADDR=gpu01 ")
    args = shlex.split(train.split("megatron-sapo train ", 1)[1])
    assert args == [
        "examples/qwen3_30b_a3b_sapo.yaml", f"run.dir={run_dir}", "checkpoint.resume=auto",
        'rollout.sglang.urls=["http://r0:30000"]', "train.steps=3",
    ]  # fmt: skip
    assert "world size: 16" in (run_dir / "plan-4242.txt").read_text()
    assert not [c for c in calls if c.startswith("requeue")]  # the trainer finished: no requeue


def test_train_sbatch_forwards_usr1_to_the_trainer_and_requeues_after_it_saved(slurm_env):
    """SLURM's `--signal=B:USR1@600` reaches the batch shell only: it relays USR1 to srun (a stub trainer that
    exits 75, preemption.EXIT_CODE, on it, as the trainer does after its checkpoint), then requeues the job."""
    from megatron_sapo.preemption import EXIT_CODE

    env, tmp = slurm_env
    env.update(STUB_HOSTS="gpu01 gpu02", SLURM_NTASKS="16", SGLANG_URLS='["http://r0:30000"]')
    ready = tmp / "trainer_ready"
    _stub(tmp / "bin", "srun", f'echo "srun $*" >>"$STUB_LOG"\n'
          f'trap \'echo "trainer got USR1" >>"$STUB_LOG"; exit {EXIT_CODE}\' USR1\n'
          f'touch {ready}\nwhile true; do sleep 0.1; done\n')  # fmt: skip
    script = os.path.join(ROOT, "examples", "slurm", "train_multinode.sbatch")
    proc = subprocess.Popen(["bash", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.stdout.read() if proc.poll() is not None else "srun was not started"
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_CODE, out
    calls = (tmp / "calls.log").read_text().splitlines()
    assert calls[-2:] == ["trainer got USR1", "requeue 4242"], calls
    assert "asking the trainer" in out and f"trainer exited {EXIT_CODE}: requeueing job 4242" in out


def test_train_sbatch_refuses_a_geometry_that_is_not_the_layout(slurm_env):
    env, tmp = slurm_env
    env.update(STUB_HOSTS="gpu01", SLURM_NTASKS="8", SGLANG_URLS='["http://r0:30000"]')
    script = os.path.join(ROOT, "examples", "slurm", "train_multinode.sbatch")
    run = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "config world size 16 != 8 tasks" in run.stderr
    assert not (tmp / "calls.log").exists() or "megatron-sapo train" not in (tmp / "calls.log").read_text()


def test_sglang_sbatch_starts_the_configured_servers_and_publishes_their_urls(slurm_env):
    env, tmp = slurm_env
    fake = tmp / "fake_sglang_python"
    _stub(tmp, fake.name, f'echo "$*" >>{tmp}/servers.log\n')
    env.update(STUB_HOSTS="rnode01", SLURM_NNODES="1", SLURM_GPUS_ON_NODE="8", SLURM_NODEID="0")
    script = os.path.join(ROOT, "examples", "slurm", "sglang_servers.sbatch")
    run = subprocess.run(["bash", script, f"rollout.sglang.python={fake}"], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    urls_file = tmp / "runs" / "qwen3_30b_a3b_sapo" / "sglang_urls.json"
    written = re.search(r"^wrote (\S+): (.*)$", run.stdout, flags=re.M)
    assert written.group(1) == str(urls_file)
    assert json.loads(written.group(2)) == [f"http://rnode01:{30000 + 10 * i}" for i in range(4)]
    assert not urls_file.exists()  # removed when the servers' job ends
    servers = sorted((tmp / "servers.log").read_text().splitlines(), key=lambda c: int(c.split("--port ")[1][:5]))
    assert len(servers) == 4
    for i, cmd in enumerate(servers):
        argv = shlex.split(cmd)
        assert argv[argv.index("--model-path") + 1] == "/models/Qwen3-30B-A3B-Base"
        assert argv[argv.index("--tp-size") + 1] == "2" and argv[argv.index("--base-gpu-id") + 1] == str(2 * i)
        assert "--enable-return-routed-experts" in argv and argv[-2:] == ["--mem-fraction-static", "0.85"]
