"""Bad input gives clear errors that name the culprit."""

from __future__ import annotations

import os

import pytest

from megatron_sapo.rollout.base import SamplingParams
from megatron_sapo.rollout.sglang_client import SGLangClient, SGLangRequestError, SGLangUnreachable
from megatron_sapo.rollout.sglang_server import ServerProcess, SGLangStartupError, free_ports


def test_unreachable_url(tiny, tmp_path):
    from megatron_sapo.rollout.sglang_engine import SGLangEngine

    cfg, path = tiny
    port = free_ports(39000, 1)[0]
    cfg.rollout.sglang.urls = [f"http://127.0.0.1:{port}"]
    try:
        match = rf"rollout.sglang.urls\[0\]=http://127.0.0.1:{port} is unreachable"
        with pytest.raises(SGLangUnreachable, match=match):
            SGLangEngine(cfg.rollout, cfg.model, work_dir=str(tmp_path), tokenizer_path=path, eos_token_id=2)
    finally:
        cfg.rollout.sglang.urls = []


def test_server_dying_at_startup_reports_log_tail(kit_python, tmp_path):
    missing = str(tmp_path / "no_such_model")
    server = ServerProcess(kit_python, missing, free_ports(39100, 1)[0], str(tmp_path / "server.log"), device="cpu")
    server.start()
    try:
        with pytest.raises(SGLangStartupError) as err:
            server.wait_healthy(timeout_s=300)
    finally:
        server.stop()
    message = str(err.value)
    assert "exited with code" in message and "during start-up" in message
    assert str(tmp_path / "server.log") in message and "no_such_model" in message  # the log's tail names it
    assert server.pid is None


def test_missing_interpreter(tmp_path):
    server = ServerProcess(str(tmp_path / "nope" / "python"), "m", free_ports(39200, 1)[0], str(tmp_path / "s.log"))
    with pytest.raises(SGLangStartupError, match="rollout.sglang.python"):
        server.start()


def test_unknown_sampling_parameter(engine):
    with pytest.raises(SGLangRequestError, match="bogus_param"):
        engine.generate([[1, 5, 6]], SamplingParams(n=2, max_new_tokens=4), {"bogus_param": 1})
    assert engine.health()


def test_prompt_longer_than_context(engine, tiny):
    cfg, _ = tiny
    ctx = cfg.model.max_seq_len
    too_long = [1] + [5] * (ctx - 4)
    with pytest.raises(ValueError, match=rf"prompt 1 has {ctx - 3} tokens; .* > the model's context length {ctx}"):
        engine.generate([[1, 5], too_long], SamplingParams(n=1, max_new_tokens=8))
    # the server itself refuses it too, with its own message (an engine bypassed by another client)
    with pytest.raises(SGLangRequestError, match="context length"):
        SGLangClient().post(engine.urls[0], "/generate", {"input_ids": [1] * (ctx + 5), "sampling_params": {}})
    assert engine.health()


def test_token_ids_outside_vocabulary(engine, tiny):
    # refused before sending: an out-of-range id crashes the SGLang 0.5.23 server (embedding IndexError)
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside the vocabulary \[0, 64\): \[70\]"):
        engine.generate([[1, 70]], SamplingParams(n=1, max_new_tokens=2))
    assert engine.health()


def test_port_in_use(kit_python, engine, tmp_path):
    port = int(engine.urls[0].rsplit(":", 1)[1])
    server = ServerProcess(kit_python, "m", port, os.path.join(tmp_path, "s.log"))
    with pytest.raises(SGLangStartupError, match=f"port {port} .* in use"):
        server.start()
