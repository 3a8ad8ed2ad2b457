"""The config tree: YAML round trip, overrides, and every validation rule naming its key."""

import dataclasses

import pytest

from megatron_sapo.config import Config, ConfigError, load_config, save_config, to_dict, validate


def _write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(
        None, ["algo.tau_neg=1.1", "parallel.tp=2", "parallel.etp=2", "parallel.sp=true", "rollout.sglang.urls=[a, b]"]
    )
    out = tmp_path / "resolved.yaml"
    save_config(cfg, str(out))
    again = load_config(str(out))
    assert again == cfg
    assert again.algo.tau_neg == 1.1 and again.parallel.tp == 2 and again.rollout.sglang.urls == ["a", "b"]


def test_yaml_file_and_overrides_compose(tmp_path):
    path = _write(tmp_path, "algo:\n  loss: grpo\n  eps_low: 0.1\nparallel:\n  ep: 2\n  dp: 2\n")
    cfg = load_config(path, ["algo.eps_low=0.15"])
    assert cfg.algo.loss == "grpo" and cfg.algo.eps_low == 0.15 and cfg.parallel.ep == 2
    assert isinstance(cfg.algo.eps_low, float)


@pytest.mark.parametrize(
    ("loss", "expected"),
    [("grpo", (0.2, 0.27)), ("gspo", (3e-4, 4e-4)), ("gspo_token", (3e-4, 4e-4)), ("sapo", (None, None))],
)
def test_unset_clip_bounds_take_the_chosen_losses_defaults(loss, expected):
    """SAPO.md: GRPO clips at 0.2 / 0.27, GSPO's sequence ratio at about 3e-4 / 4e-4; `algo.loss=gspo` alone
    must not inherit GRPO's bounds (a ~500x looser trust region). Explicit values win."""
    a = load_config(None, [f"algo.loss={loss}"]).algo
    assert (a.eps_low, a.eps_high) == expected
    if loss != "sapo":
        a = load_config(None, [f"algo.loss={loss}", "algo.eps_high=0.05"]).algo
        assert (a.eps_low, a.eps_high) == (expected[0], 0.05)


def test_the_loss_spec_leaves_unset_clip_bounds_to_the_loss():
    """A Config built without load_config (the Python API) keeps them None; the engine's LossSpec then passes
    none, so the loss function's keyword defaults (what loss_defaults reads) apply. Set ones are passed."""
    import inspect

    from megatron_sapo.algo import POLICY_LOSSES, loss_defaults
    from megatron_sapo.megatron.loss_glue import LossSpec

    cfg = Config()
    cfg.algo.loss = "gspo"
    assert cfg.algo.eps_low is None and LossSpec.from_config(cfg).hyper == {}
    cfg.algo.eps_high = 0.01
    assert LossSpec.from_config(cfg).hyper == {"eps_high": 0.01}
    params = inspect.signature(POLICY_LOSSES.get("gspo")).parameters
    assert loss_defaults("gspo") == {"eps_low": params["eps_low"].default, "eps_high": params["eps_high"].default}
    cfg.algo.loss = "sapo"
    assert LossSpec.from_config(cfg).hyper == {"tau_pos": 1.0, "tau_neg": 1.05}


def test_int_is_accepted_for_float_but_not_the_reverse(tmp_path):
    assert load_config(None, ["algo.tau_pos=2"]).algo.tau_pos == 2.0
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3  # a string to PyYAML
    with pytest.raises(ConfigError, match="'optim.lr'.*expected a number, got 'fast'"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"'parallel.tp'.*expected an integer"):
        load_config(None, ["parallel.tp=1.5"])


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = _write(tmp_path, "algo:\n  loss: sapo\n  tau_nge: 1.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "'algo.tau_nge'" in msg and "cfg.yaml, line 3" in msg and "did you mean 'algo.tau_neg'" in msg


def test_unknown_section_and_wrong_types(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'algoo'"):
        load_config(None, ["algoo.loss=sapo"])
    path = _write(tmp_path, "parallel:\n  sp: yes please\n")
    with pytest.raises(ConfigError, match=r"'parallel.sp' \(.*line 2\): expected true or false"):
        load_config(path)
    with pytest.raises(ConfigError, match="'rollout.engine'.*not one of"):
        load_config(None, ["rollout.engine=vllm"])
    with pytest.raises(ConfigError, match="'algo' .*expected a section"):
        load_config(None, ["algo=3"])


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "algo: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(None, ["algo.tau_neg"])


# (overrides, key the message must name, a phrase of the rule)
BAD = [
    (["parallel.tp=3"], "parallel.tp", "num_attention_heads=4 must be divisible by tp=3"),
    (["parallel.tp=2", "parallel.sp=true"], "parallel.etp", "set parallel.etp=2"),
    (["model.num_query_groups=2", "parallel.tp=4", "parallel.sp=true"], "parallel.tp", "num_query_groups=2"),
    (["model.vocab_size=510", "parallel.tp=4", "parallel.sp=true"], "parallel.tp", "vocab_size=510"),
    (["parallel.pp=3"], "parallel.pp", "num_layers=2 must be divisible by pp*vpp=3"),
    (["model.num_layers=4", "parallel.pp=2", "parallel.vpp=3"], "parallel.pp", "pp*vpp=6"),
    (["parallel.vpp=2"], "parallel.vpp", "needs pp > 1"),
    (["parallel.ep=3", "parallel.dp=3", "rollout.n=3"], "parallel.ep", "num_experts=4 must be divisible by ep=3"),
    (["parallel.ep=2"], "parallel.ep", "tp*cp*dp=1 must be divisible by ep*etp=2"),
    (["parallel.tp=2", "parallel.etp=2"], "parallel.sp", "need sequence parallel"),
    (["parallel.sp=true"], "parallel.sp", "needs tp > 1"),
    (["model.num_experts=0", "parallel.ep=2", "parallel.dp=2"], "parallel.ep", "needs an MoE model"),
    (["parallel.dp=0"], "parallel.dp", "must be >= 1"),
    (["model.moe_topk=5"], "model.moe_topk", "must be in [1, num_experts=4]"),
    (["model.hidden_size=66"], "model.hidden_size", "divisible by num_attention_heads"),
    (["model.num_query_groups=3"], "model.num_query_groups", "divisible by it"),
    (["model.num_experts=-1"], "model.num_experts", "must be >= 0"),
    (["algo.loss=ppo"], "algo.loss", "not one of ['grpo', 'gspo', 'gspo_token', 'sapo']"),
    (["algo.agg=mean"], "algo.agg", "not one of"),
    (["algo.advantage=gae"], "algo.advantage", "not one of"),
    (["algo.tau_pos=0"], "algo.tau_pos", "must be > 0"),
    (["algo.tau_neg=-1"], "algo.tau_neg", "must be > 0"),
    (["algo.eps_low=1.0"], "algo.eps_low", "must be in [0, 1)"),
    (["algo.eps_high=-0.1"], "algo.eps_high", "must be >= 0"),
    (["algo.kl_coef=-1"], "algo.kl_coef", "must be >= 0"),
    (["algo.entropy_coef=-1"], "algo.entropy_coef", "must be >= 0"),
    (["algo.minibatches=0"], "algo.minibatches", "must be >= 1"),
    (["algo.tis_cap=-2"], "algo.tis_cap", "must be >= 0"),
    (["algo.routing_replay=r2", "model.num_experts=0"], "algo.routing_replay", "needs an MoE model"),
    (["algo.routing_replay=r3"], "algo.routing_replay", "only rollout.engine=sglang"),
    (["algo.old_logprobs=rollout", "algo.routing_replay=r2"], "algo.old_logprobs", "whose routing r2 replays"),
    (["algo.old_logprobs=rollout", "algo.tis_cap=2"], "algo.old_logprobs", "would correct nothing"),
    (["rollout.engine=sglang", "rollout.local_process=true"], "rollout.local_process", "needs rollout.engine=local"),
    (["rollout.n=1"], "rollout.n", "need n >= 2"),
    (["rollout.prompts_per_step=0"], "rollout.prompts_per_step", "must be >= 1"),
    (["rollout.max_new_tokens=0"], "rollout.max_new_tokens", "must be >= 1"),
    (["rollout.temperature=0"], "rollout.temperature", "must be > 0"),
    (["rollout.top_p=1.5"], "rollout.top_p", "must be in (0, 1]"),
    (["rollout.async_steps=2"], "rollout.async_steps", "must be 0 or 1"),
    (["train.micro_batch_size=0"], "train.micro_batch_size", "must be >= 1"),
    (
        ["rollout.n=3", "rollout.prompts_per_step=3"],
        "algo.minibatches",
        "split evenly into 4 mini-batches",
    ),
    (["parallel.dp=16"], "parallel.dp", "must split evenly over dp=16"),
    (["train.micro_batch_size=3"], "train.micro_batch_size", "micro-batches of 3"),
    (["model.max_seq_len=40"], "model.max_seq_len", "exceeds max_seq_len=40"),
    (["train.steps=-1"], "train.steps", "must be >= 0"),
    (["optim.lr=0"], "optim.lr", "must be > 0"),
    (["checkpoint.every=-1"], "checkpoint.every", "must be >= 0"),
    (["diagnostics.router_every=-1"], "diagnostics.router_every", "must be >= 0"),
    (["data.paths=[a.jsonl]", "data.weights=[1, 2]"], "data.weights", "one weight per path"),
    (["rollout.sglang.num_servers=0"], "rollout.sglang.num_servers", "must be >= 1"),
    (["rollout.sglang.tp=0"], "rollout.sglang.tp", "must be >= 1"),
    (["rollout.sglang.retries=-1"], "rollout.sglang.retries", "must be >= 0"),
    (["rollout.sglang.max_restarts=-1"], "rollout.sglang.max_restarts", "must be >= 0"),
    (["rollout.sglang.verify_sequences=-1"], "rollout.sglang.verify_sequences", "must be >= 0"),
    (["rollout.sglang.bucket_mb=0"], "rollout.sglang.bucket_mb", "must be > 0"),
    (["rollout.sglang.verify_tol=0"], "rollout.sglang.verify_tol", "must be > 0"),
    (["rollout.sglang.retry_backoff_s=-1"], "rollout.sglang.retry_backoff_s", "must be >= 0"),
]


@pytest.mark.parametrize("overrides,key,rule", BAD, ids=[b[1] + ":" + b[2][:25] for b in BAD])
def test_every_validation_rule_names_its_key(overrides, key, rule):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert f"'{key}'" in str(err.value)
    assert rule in str(err.value)


def test_defaults_and_good_layouts_validate():
    """Each layout loads (validation raises otherwise) with the world size its tp * pp * cp * dp asks for."""
    assert validate(Config()).parallel.world_size == 1
    for good, world in (
        (["parallel.tp=2", "parallel.sp=true", "parallel.etp=2"], 2),
        (["parallel.ep=2", "parallel.dp=2"], 2),
        (["parallel.tp=2", "parallel.sp=true", "parallel.pp=2", "parallel.ep=2"], 4),
        (["model.num_layers=4", "parallel.pp=2", "parallel.vpp=2"], 2),
        (["parallel.cp=2", "parallel.tp=2", "parallel.sp=true", "parallel.etp=2", "train.pack_sequences=true"], 4),
        (["parallel.cp=2", "parallel.ep=2", "algo.routing_replay=r2", "diagnostics.router_every=1"], 2),
    ):
        assert load_config(None, good).parallel.world_size == world, good


def test_defaults_follow_the_paper():
    algo = Config().algo
    assert (algo.loss, algo.tau_pos, algo.tau_neg, algo.agg) == ("sapo", 1.0, 1.05, "seq-mean-token-mean")
    assert algo.minibatches == 4
    assert dataclasses.is_dataclass(Config().rollout.sglang)
    assert to_dict(Config())["parallel"]["tp"] == 1
