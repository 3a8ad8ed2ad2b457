"""`megatron-sapo eval`: a Megatron checkpoint (streamed through the Megatron engine) and the HF folder of the same
weights give the same greedy answers; pass@k; outputs; bad input."""

import itertools
import json
import math

import pytest
import torch

from megatron_sapo.cli import main
from megatron_sapo.config import load_config
from megatron_sapo.data.tokenizer import build_tiny_tokenizer
from megatron_sapo.evaluate import pass_at_k, summarize
from megatron_sapo.rollout.local import build_hf_model
from megatron_sapo.rollout.weights import save_hf_checkpoint

CONFIG = "examples/tiny_moe_cpu.yaml"


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_pass_at_k_matches_enumeration():
    for n, correct, k in [(4, 0, 1), (4, 1, 1), (4, 1, 2), (5, 2, 3), (6, 6, 2), (6, 3, 6)]:
        outcomes = [True] * correct + [False] * (n - correct)
        subsets = list(itertools.combinations(outcomes, k))
        assert pass_at_k(n, correct, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError, match="pass@3 needs at least 3"):
        pass_at_k(2, 1, 3)


def test_summarize_groups_by_prompt_and_task():
    def row(task, reward, length=4, reason="stop", error=None):
        return {"task": task, "reward": reward, "response_len": length, "finish_reason": reason, "reward_error": error}

    rows = [row("a", 1.0), row("a", 0.0), row("a", 0.0), row("a", 0.0),  # prompt 1: 1 of 4 correct
            row("b", 0.5, 2, "length"), row("b", float("nan"), 2, "length", "ValueError: x"), row("b", 1.0, 2),
            row("b", 1.0, 2)]  # fmt: skip
    summary = summarize(rows, n=4, correct_at=1.0)
    assert summary["a"]["pass@1"] == 0.25 and summary["a"]["pass@4"] == 1.0
    assert summary["b"]["pass@1"] == 0.5 and summary["b"]["reward_mean"] == pytest.approx(2.5 / 3)
    assert summary["b"]["reward_failures"] == 1 and summary["b"]["stop_frac"] == 0.5
    assert summary["all"]["prompts"] == 2 and summary["all"]["pass@1"] == pytest.approx(0.375)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cfg = load_config(CONFIG)
    tokenizer = build_tiny_tokenizer(str(root / "tok"), vocab_size=cfg.model.vocab_size)
    torch.manual_seed(3)
    save_hf_checkpoint(build_hf_model(cfg.model).state_dict(), cfg.model, str(root / "hf"))
    torch.manual_seed(4)
    save_hf_checkpoint(build_hf_model(cfg.model).state_dict(), cfg.model, str(root / "hf_other"))
    assert main(["convert", CONFIG, "--from-hf", str(root / "hf"), "--to-checkpoint", str(root / "ck")]) == 0
    return root, tokenizer


def test_checkpoint_and_hf_folder_give_the_same_greedy_answers(folders):
    root, tokenizer = folders
    common = [f"data.tokenizer={tokenizer}", f"run.dir={root / 'run'}", "--limit", "12"]
    assert main(["eval", CONFIG, *common, "--checkpoint", str(root / "ck"), "--out", str(root / "a")]) == 0
    assert main(["eval", CONFIG, *common, "--hf", str(root / "hf"), "--out", str(root / "b")]) == 0
    assert main(["eval", CONFIG, *common, "--hf", str(root / "hf_other"), "--out", str(root / "c")]) == 0
    a, b, c = (_rows(root / x / "samples.jsonl") for x in "abc")
    assert len(a) == 12 and [r["prompt"] for r in a] == [r["prompt"] for r in b]
    assert [r["response"] for r in a] == [r["response"] for r in b]  # the same weights, two loading paths
    assert [r["response"] for r in a] != [r["response"] for r in c]  # other weights answer otherwise
    with open(root / "a" / "summary.json") as f:
        summary = json.load(f)
    assert summary["weights"] == str(root / "ck")
    expected = sum(r["reward"] >= 1.0 for r in a) / len(a)  # n = 1: pass@1 is the fraction correct
    assert summary["metrics"]["all"]["pass@1"] == pytest.approx(expected)
    assert summary["metrics"]["all"]["reward_mean"] == pytest.approx(sum(r["reward"] for r in a) / len(a))


def test_checkpoint_eval_at_a_two_rank_layout(folders):
    """parallel.ep=2 (dp=2): two processes load the checkpoint's expert shards and stream them to rank 0's engine."""
    root, tokenizer = folders
    common = [f"data.tokenizer={tokenizer}", f"run.dir={root / 'run'}", "--limit", "12"]
    layout = ["parallel.ep=2", "parallel.dp=2", "train.micro_batch_size=4"]
    assert main(["eval", CONFIG, *layout, *common, "--checkpoint", str(root / "ck"), "--out", str(root / "ep2")]) == 0
    assert main(["eval", CONFIG, *common, "--hf", str(root / "hf"), "--out", str(root / "ws1")]) == 0
    ep2, ws1 = _rows(root / "ep2" / "samples.jsonl"), _rows(root / "ws1" / "samples.jsonl")
    assert [r["response"] for r in ep2] == [r["response"] for r in ws1]


def test_sampling_n_per_prompt(folders):
    root, tokenizer = folders
    out = root / "sampled"
    args = ["eval", CONFIG, f"data.tokenizer={tokenizer}", "--hf", str(root / "hf"), "--limit", "5", "--n", "3",
            "--temperature", "1.0", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = _rows(out / "samples.jsonl")
    assert len(rows) == 15 and all(rows[i]["prompt"] == rows[i - i % 3]["prompt"] for i in range(15))
    with open(out / "summary.json") as f:
        metrics = json.load(f)["metrics"]["all"]
    assert "pass@3" in metrics and metrics["pass@3"] >= metrics["pass@1"]
    assert not math.isnan(metrics["response_len_mean"])


def test_bad_input_is_one_clear_line(folders, tmp_path, capsys):
    root, tokenizer = folders
    assert main(["eval", CONFIG, f"run.dir={tmp_path / 'empty'}"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", CONFIG, "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "copy:12=", "answer": "12", "task": "copy"}\n{not json\n')
    assert main(["eval", CONFIG, f"data.tokenizer={tokenizer}", "--hf", str(root / "hf"), "--data", str(bad)]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
