"""`megatron-sapo convert`: HF -> Megatron dist checkpoint -> HF, exact, and bad input."""

import torch

from megatron_sapo.cli import main
from megatron_sapo.config import load_config
from megatron_sapo.rollout.local import build_hf_model
from megatron_sapo.rollout.weights import load_hf_state, save_hf_checkpoint

CONFIG = "examples/tiny_moe_cpu.yaml"


def test_convert_round_trip_hf_to_checkpoint_to_hf(tmp_path, capsys):
    cfg = load_config(CONFIG)
    model = build_hf_model(cfg.model)
    save_hf_checkpoint(model.state_dict(), cfg.model, str(tmp_path / "hf"))
    fp32 = "model.dtype=fp32"  # exact round trip, also on a GPU ("auto" is bf16 there)
    assert (
        main(["convert", CONFIG, fp32, "--from-hf", str(tmp_path / "hf"), "--to-checkpoint", str(tmp_path / "ck")]) == 0
    )
    assert main(["convert", CONFIG, fp32, "--checkpoint", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "hf2")]) == 0
    again = load_hf_state(str(tmp_path / "hf2"))
    assert again.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(again[name], tensor), name


def test_convert_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["convert", CONFIG, "--checkpoint", str(tmp_path / "nope"), "--to-hf", str(tmp_path / "x")]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert main(["convert", CONFIG, "--to-hf", str(tmp_path / "x")]) == 2
    assert "exactly one source" in capsys.readouterr().err
