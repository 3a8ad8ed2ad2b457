"""Engine pieces that need no server (they run even without the kit)."""

from __future__ import annotations

import base64

import pytest
import torch

from megatron_sapo.rollout.base import weight_buckets, with_last
from megatron_sapo.rollout.sglang_client import SGLangClient, SGLangRequestError, SGLangUnreachable
from megatron_sapo.rollout.sglang_engine import decode_routed_experts
from megatron_sapo.rollout.sglang_server import free_ports


def test_decode_routed_experts_round_trip():
    routing = torch.randint(0, 8, (7, 3, 2), dtype=torch.int32)
    data = base64.b64encode(routing.numpy().tobytes()).decode()
    assert torch.equal(decode_routed_experts(data, num_layers=3, topk=2), routing)
    with pytest.raises(Exception, match="not a multiple of layers\\*topk=6"):
        decode_routed_experts(base64.b64encode(b"\0" * 4 * 5).decode(), num_layers=3, topk=2)


def test_buckets_keep_order_and_size():
    state = {f"w{i}": torch.zeros(256) for i in range(10)}  # 1 KiB each
    groups = list(weight_buckets(state, bucket_mb=3 / 1024))
    assert [len(g) for g in groups] == [3, 3, 3, 1]
    assert [n for g in groups for n in g] == list(state)
    assert len(list(weight_buckets({"big": torch.zeros(10_000)}, bucket_mb=1 / 1024))) == 1  # its own bucket
    streamed = [{"a": torch.zeros(1)}, {}, {"b": torch.zeros(1)}]  # the trainer's buckets pass through, empty skipped
    assert [list(b) for b in weight_buckets(iter(streamed), bucket_mb=1e-9)] == [["a"], ["b"]]
    assert list(with_last(iter("xyz"))) == [("x", False), ("y", False), ("z", True)]
    assert list(with_last([])) == []


def test_client_errors_name_the_server():
    port = free_ports(39300, 1)[0]
    client = SGLangClient(timeout_s=2, retries=1, backoff_s=0.01)
    with pytest.raises(SGLangUnreachable, match=f"POST http://127.0.0.1:{port}/generate failed: ConnectionRefused"):
        client.post(f"http://127.0.0.1:{port}", "/generate", {})
    with pytest.raises(SGLangRequestError, match="not an http"):
        client.post("localhost:1", "/generate", {})


def test_server_environment_drops_the_trainers_world(monkeypatch):
    """A server started from rank 0 of a torchrun/srun trainer must not join the trainer's world (with
    RANK/WORLD_SIZE/MASTER_PORT inherited, SGLang's own process group waited for the other ranks forever)."""
    from megatron_sapo.rollout.sglang_server import ServerProcess

    world = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511",
             "TORCHELASTIC_RUN_ID": "x", "PYTHONPATH": "/trainer/site"}  # fmt: skip
    for key, value in world.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HOME", "/cache/hf")
    env = ServerProcess("python", "model", 30000, "server.log").environment()
    assert not set(world) & set(env)
    assert env["HF_HOME"] == "/cache/hf" and env["SGLANG_USE_CPU_ENGINE"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert ServerProcess("python", "model", 30000, "server.log").environment()["OMP_NUM_THREADS"] == "8"  # inherited
    pinned = ServerProcess("python", "model", 30000, "server.log", cpu_threads=1).environment()
    assert pinned["OMP_NUM_THREADS"] == "1"  # rollout.sglang.cpu_threads
