"""Sample collation (label alignment) and the checkpoint bookkeeping of the run folder."""

import os
import types

import pytest
import torch

from megatron_sapo.config import ConfigError
from megatron_sapo.data.collate import collate_samples, minibatches
from megatron_sapo.rollout.base import Sample
from megatron_sapo.run_state import complete_checkpoints, find_resume_checkpoint, mark_complete, prune_checkpoints


def _sample(prompt, response, group=0):
    return Sample(prompt, response, [-0.1 * (i + 1) for i in range(len(response))], "stop", group, 0)


def test_collate_aligns_mask_and_log_probs_with_labels():
    batch = collate_samples([_sample([1, 5, 6], [7, 8, 2]), _sample([1, 9], [2])], pad_id=0)
    torch.testing.assert_close(batch["tokens"], torch.tensor([[1, 5, 6, 7, 8, 2], [1, 9, 2, 0, 0, 0]]))
    labels = batch["tokens"][:, 1:]
    mask = batch["loss_mask"]
    # the mask selects exactly the response tokens among the labels
    assert labels[0][mask[0] > 0].tolist() == [7, 8, 2]
    assert labels[1][mask[1] > 0].tolist() == [2]
    assert batch["rollout_log_probs"][0][mask[0] > 0].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert torch.all(batch["rollout_log_probs"][mask == 0] == 0)


def test_minibatches_split_contiguously_and_reject_uneven():
    batch = {"tokens": torch.arange(8).view(8, 1), "advantages": torch.arange(8.0)}
    parts = minibatches(batch, 4)
    assert [p["tokens"].view(-1).tolist() for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="do not split into 3"):
        minibatches(batch, 3)


def _cfg(run_dir, resume="auto"):
    return types.SimpleNamespace(
        run=types.SimpleNamespace(dir=str(run_dir)), checkpoint=types.SimpleNamespace(resume=resume)
    )


def test_only_complete_checkpoints_are_resumed_and_pruned(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step_{step}").mkdir(parents=True)
    mark_complete(str(tmp_path), str(root / "step_1"))
    mark_complete(str(tmp_path), str(root / "step_2"))
    # step_3 was being written when the run died: it has no marker
    assert find_resume_checkpoint(_cfg(tmp_path)).endswith("step_2")
    assert (root / "latest").read_text().strip() == "step_2"
    assert find_resume_checkpoint(_cfg(tmp_path, "none")) is None
    with pytest.raises(ConfigError, match="checkpoint.resume=.*not a complete checkpoint"):
        find_resume_checkpoint(_cfg(tmp_path, str(root / "step_3")))
    mark_complete(str(tmp_path), str(root / "step_3"))
    (root / "step_4").mkdir()  # an incomplete leftover newer than nothing complete: kept
    prune_checkpoints(str(tmp_path), keep=2)
    assert [os.path.basename(p) for p in complete_checkpoints(str(tmp_path))] == ["step_2", "step_3"]
    assert (root / "step_4").exists()


def test_empty_run_folder_starts_fresh(tmp_path):
    assert find_resume_checkpoint(_cfg(tmp_path)) is None
