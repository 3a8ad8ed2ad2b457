"""More than one server: two real CPU servers behind sglang-router (generation through the router, weight syncs
to each server), and the same two servers driven without the router (requests spread by our client)."""

from __future__ import annotations

import copy
import os
import signal

import pytest

from megatron_sapo.rollout.base import SamplingParams
from megatron_sapo.rollout.sglang_client import SGLangClient, SGLangError

from .conftest import perturbed, wait_group_gone
from .test_generate import LOGPROB_TOL

PROMPTS = [[1, 5 + i, 6 + i, 7 + i] for i in range(8)]
PARAMS = SamplingParams(n=2, max_new_tokens=6, temperature=1.0)


def _rollout_cfg(tiny, **sglang):
    cfg = copy.deepcopy(tiny[0])
    for key, value in sglang.items():
        setattr(cfg.rollout.sglang, key, value)
    return cfg


def _served_generates(logs: list[str]) -> list[int]:
    """POST /generate lines in each launched server's log (the servers' own record of what they served)."""
    counts = []
    for path in logs:
        with open(path, encoding="utf-8", errors="replace") as f:
            counts.append(sum('"POST /generate HTTP' in line for line in f))
    return counts


def _versions(urls) -> list[str]:
    client = SGLangClient(timeout_s=30)
    return [str(client.get(u, "/get_model_info")["weight_version"]) for u in urls]


@pytest.fixture(scope="module")
def routed(tiny, kit_python, tmp_path_factory):
    """Two launched servers + sglang-router (round robin) in front of them; the engine asks for no routed experts."""
    from megatron_sapo.rollout.sglang_engine import SGLangEngine

    if not os.path.exists(os.path.join(os.path.dirname(kit_python), "sglang-router")):
        pytest.fail("the kit venv has no sglang-router: rebuild it with `bash tools/sglang_cpu_kit/setup.sh`")
    # the servers can return routed experts (asked for directly), the engine does not ask (see the next test)
    cfg = _rollout_cfg(tiny, num_servers=2, router=True, router_args=["--policy", "round_robin"],
                       return_routed_experts=False, base_port=31100,
                       extra_args=["--enable-return-routed-experts"])  # fmt: skip
    eng = SGLangEngine(cfg.rollout, cfg.model, work_dir=str(tmp_path_factory.mktemp("sglang_pair")),
                       tokenizer_path=tiny[1], eos_token_id=2, model_path=tiny[1], seed=0)  # fmt: skip
    pids = [p for p in eng.pids if p] + [eng.router.pid]
    yield eng
    eng.shutdown()
    for pid in pids:  # the servers and the router are gone
        wait_group_gone(pid, "server or router")


def test_router_generation_and_weight_sync_reach_both_servers(routed, initial_state):
    eng = routed
    assert len(eng.urls) == 2 and eng.gen_urls == [eng.router.url] and eng.health()
    logs = [s.log_path for s in eng.servers]
    eng.update_weights(initial_state, 0)  # disk; the post-sync check runs on each server directly
    assert _versions(eng.urls) == ["0", "0"]
    before = _served_generates(logs)
    samples = eng.generate(PROMPTS, PARAMS)
    after = _served_generates(logs)
    assert len(samples) == len(PROMPTS) * PARAMS.n and all(s.weight_version == 0 for s in samples)
    assert all(s.info["server"] == eng.router.url for s in samples)
    served = [a - b for a, b in zip(after, before)]
    print(f"/generate requests served per server through the router: {served}")
    assert all(n >= 2 for n in served) and sum(served) >= len(PROMPTS)  # both servers served (round robin)

    new_state = perturbed(initial_state, seed=21)
    eng.update_weights(new_state, 21)
    assert _versions(eng.urls) == ["21", "21"]  # the sync reached both servers, not just the router's pick
    assert eng.last_check["sync/logprob_abs_diff_max"] < LOGPROB_TOL  # both servers serve the new weights
    assert eng.last_check["sync/tokens_checked"] == 2 * eng.cfg.verify_sequences * 8
    assert all(s.weight_version == 21 for s in eng.generate(PROMPTS, PARAMS))


def test_killed_router_is_restarted(routed):
    """The router dies between calls: the next generate() finds it unreachable, restarts it (new PID, same URL)
    and every prompt group comes back once, from the unchanged weights."""
    eng = routed
    old_pid = eng.router.pid
    os.killpg(old_pid, signal.SIGKILL)
    eng.router.proc.wait(timeout=30)  # reaped (a killed child stays a zombie until its parent waits)
    samples = eng.generate(PROMPTS, PARAMS)
    assert eng.router.pid != old_pid and eng.health()
    assert [s.group for s in samples] == [g for g in range(len(PROMPTS)) for _ in range(PARAMS.n)]
    assert all(s.weight_version == eng.weight_version for s in samples)


def test_router_without_routed_experts_is_a_clear_error(routed, tiny, tmp_path):
    """sglang-router 0.3.2 drops return_routed_experts from /generate: asking for them through it must fail."""
    from megatron_sapo.rollout.sglang_engine import SGLangEngine

    probe = {"input_ids": [1, 5], "sampling_params": {"max_new_tokens": 2}, "return_routed_experts": True}
    for url in routed.urls:  # the servers themselves return them
        assert SGLangClient(timeout_s=60).post(url, "/generate", probe)["meta_info"]["routed_experts"]
    cfg = _rollout_cfg(tiny, urls=list(routed.urls), router=True, base_port=31200, return_routed_experts=True)
    with pytest.raises(SGLangError, match="drops return_routed_experts"):
        SGLangEngine(cfg.rollout, cfg.model, work_dir=str(tmp_path), eos_token_id=2)


@pytest.mark.parametrize("transport", ["tensor", "distributed"])
def test_two_servers_without_router(routed, tiny, tmp_path, initial_state, transport):
    """Our client spreads requests over both servers; each transport's sync reaches both."""
    from megatron_sapo.rollout.sglang_engine import SGLangEngine

    cfg = _rollout_cfg(tiny, urls=list(routed.urls), router=False, return_routed_experts=True)
    eng = SGLangEngine(cfg.rollout, cfg.model, work_dir=str(tmp_path), eos_token_id=2)
    try:
        assert eng.router is None and eng.gen_urls == list(routed.urls)
        eng.set_transport(transport)
        version = 30 if transport == "tensor" else 31
        eng.update_weights(perturbed(initial_state, seed=version), version)
        assert _versions(eng.urls) == [str(version)] * 2
        assert eng.last_check["sync/logprob_abs_diff_max"] < LOGPROB_TOL  # checked on both servers
        samples = eng.generate(PROMPTS, PARAMS)
        per_server = {u: sum(s.info["server"] == u for s in samples) for u in eng.urls}
        print(f"{transport}: samples per server without the router: {per_server}")
        assert all(n > 0 for n in per_server.values())
        assert all(s.weight_version == version and s.routed_experts is not None for s in samples)
    finally:
        eng.update_weights(initial_state, 0)  # back to the launch weights, as the router test set them
        eng.shutdown()
    routed.weight_version = 0
