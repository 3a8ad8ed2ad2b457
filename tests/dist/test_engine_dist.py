"""MegatronEngine across parallel layouts on gloo: loss, gradients, metrics, optimizer steps, checkpoints.

Two torchrun launches (1 and 4 processes, ~2 minutes together on 2 cores) run tests/dist/worker.py; the
tests below assert on what they wrote. float32 tolerance: the spike measured <= 7e-7 relative.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.batches import max_rel_diff

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
GRAD_TOL = 1e-4  # relative to each tensor's max |ref|
LOSS_TOL = 1e-5


def _launch(nproc: int, phase: str, out_dir: Path) -> None:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run(
        [*cmd, str(WORKER), phase, str(out_dir)], env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"torchrun {phase} ({nproc} processes) failed:\n{tail}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine_dist")
    _launch(1, "ref", out)
    _launch(4, "multi", out)
    load = lambda name: torch.load(out / f"{name}.pt", weights_only=False)  # noqa: E731
    return load("ref"), load("multi")


LAYOUTS = [
    "tp2_sp_dp2",
    "pp2_dp2",
    "ep2_dp4",
    "tp2_ep2_sp",
    "tp2_ep2_etp2_sp",
    "pp2_vpp2_tp2",
    "cp2_tp2_sp",
    "cp2_ep2_dp2",
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sapo_loss_and_gradients_match_single_process(results, layout):
    _, multi = results
    got = multi[f"{layout}/sapo"]
    assert got["loss_diff"] <= LOSS_TOL, got["loss_diff"]
    assert got["grad_rel"] <= GRAD_TOL, got["grad_rel"]
    assert multi[f"{layout}/log_probs"] <= 1e-5


@pytest.mark.parametrize("layout", ["tp2_ep2_sp", "pp2_dp2", "cp2_tp2_sp"])
def test_packed_sequences_match_single_process(results, layout):
    """train.pack_sequences at TP2xEP2+SP, PP2 (x DP2) and CP2xTP2+SP: loss, gradients and log-probs of the unpacked
    single-process run (tests/unit/test_packing.py has the negative control)."""
    _, multi = results
    got = multi[f"packed/{layout}"]
    assert got["loss_diff"] <= LOSS_TOL and got["grad_rel"] <= GRAD_TOL, got
    assert got["log_probs"] <= 1e-5, got
    # routing recorded on packed rows: per sequence as unpacked (but near-ties flipped by rounding)
    assert got["routing_same"] >= 0.98 and got["probs_diff"] <= 1e-4, got


@pytest.mark.parametrize("loss", ["grpo", "gspo"])
def test_grpo_gspo_match_at_tp2_ep2(results, loss):
    ref, multi = results
    got = multi[f"tp2_ep2_sp/{loss}"]
    assert got["loss_diff"] <= LOSS_TOL and got["grad_rel"] <= GRAD_TOL, got
    # the clipped losses really differ from SAPO's: the comparison is not vacuous
    assert max_rel_diff(ref[f"{loss}_grads"], ref["sapo_grads"]) > 1e-2
    assert ref[f"{loss}_metrics"]["clip_frac"] > 0


def test_negative_control_batched_p2p_with_vpp_is_caught(results):
    """PP2+VPP2 with batch_p2p_comm=True on gloo (the engine never picks it) gives wrong gradients, and
    the comparison above catches that."""
    _, multi = results
    assert multi["negative/pp2_vpp2_tp2_batch_p2p"]["grad_rel"] > 1e-2


def test_negative_control_cp_chunks_out_of_megatrons_layout_are_caught(results):
    """CP2 with contiguous halves instead of megatron's load-balanced chunks (its rope's layout): the
    log-probs comparison of the CP layouts above would catch it."""
    _, multi = results
    assert multi["negative/cp2_contiguous_chunks"] > 1e-2


def test_microbatches_and_plain_full_batch_reference(results):
    """4 micro-batches == 1 micro-batch == one plain autograd pass of compute_policy_loss on the full
    batch (loss and every gradient), single process, no aux loss."""
    ref, _ = results
    loss4, grads4 = ref["noaux_mbs2"]
    loss1, grads1 = ref["noaux_mbs8"]
    loss_plain, grads_plain = ref["plain"]
    assert abs(loss4 - loss1) <= LOSS_TOL and abs(loss4 - loss_plain) <= LOSS_TOL
    assert max_rel_diff(grads4, grads1) <= GRAD_TOL
    assert max_rel_diff(grads4, grads_plain) <= GRAD_TOL
    # the aux-loss model's gradients differ: the aux loss is really in the layout comparisons
    assert max_rel_diff(ref["sapo_grads"], grads4) > 1e-2


def test_metrics_reduced_across_microbatches_and_ranks(results):
    """Engine metrics (4 micro-batches; and TP2xEP2 x DP2) equal compute_policy_loss's metrics on the full
    batch computed directly from the reference log-probs."""
    from megatron_sapo.algo import compute_policy_loss

    ref, multi = results
    b = ref["batch"]
    _, direct = compute_policy_loss(
        "sapo", ref["log_probs"], b["old_log_probs"], b["advantages"], b["loss_mask"], tau_pos=1.0, tau_neg=1.05
    )
    for metrics in (ref["sapo_metrics"], multi["tp2_ep2_sp/sapo"]["metrics"]):
        for name in ("ratio_mean", "ratio_std", "ratio_max", "ratio_min", "gate_mean", "gate_min", "approx_kl"):
            assert metrics[name] == pytest.approx(float(direct[name]), rel=1e-4, abs=1e-6), name
        assert metrics["n_tokens"] == float(b["loss_mask"].sum())


def test_optimizer_steps_track_single_process(results):
    ref, multi = results
    assert multi["opt_losses"] == pytest.approx(ref["opt_losses"], abs=1e-4)
    assert ref["opt_losses"][2] < ref["opt_losses"][0] - 1e-2  # the steps did move the loss


def test_checkpoint_resume_across_layouts(results):
    """Saved at TP1 after step 1 -> loaded at TP2xPP2xEP2 (EP1 -> EP2: single -> chained optimizer): the
    next two losses equal the uninterrupted run's; saved there after step 2 -> loaded at TP2xDP2: step 3."""
    ref, multi = results
    first = multi["resume_tp1_to_tp2pp2ep2"]
    assert first["extra"] == {"step": 1}
    assert first["losses"] == pytest.approx(ref["opt_losses"][1:], abs=1e-5)
    second = multi["resume_tp2pp2ep2_to_tp2dp2"]
    assert second["extra"] == {"step": 2}
    assert second["losses"] == pytest.approx(ref["opt_losses"][2:], abs=1e-5)


def test_weights_streamed_to_rank_zero_only(results):
    """The weight sync's streamed gather at TP2xPP2xEP2: rank 0 receives every tensor once, bucket by bucket,
    equal to the all-gathered model; the other ranks get as many empty buckets."""
    _, multi = results
    streamed = multi["gather_dst0"]
    assert streamed["all_ranks_ok"] and streamed["same_count"]
    assert streamed["buckets"] > 5  # the 0.05 MB limit cuts the tiny model into several buckets


def test_gloo_uneven_gather_patch(results):
    _, multi = results
    assert multi["gloo_uneven"] == {"patched_ok": True, "original_ok": False}


# ----------------------------------------------------------------------------------------------------------
# routing capture / replay / router diagnostics (tests/dist/router_checks.py)
# ----------------------------------------------------------------------------------------------------------
ROUTER_LAYOUTS = ["tp2_sp_dp2", "tp2_etp2_nosp_dp2", "ep2_dp4", "pp2_dp2", "tp2_ep2_sp", "cp2_tp2_sp"]


def test_router_reference_is_not_vacuous(results):
    ref, _ = results
    free, r2 = ref["router"]["free"], ref["router"]["r2"]
    assert free["router/var_route"] > 0 and free["router/var_logratio"] > 0
    assert all(free[f"router/layer{i}/change_rate"] > 0 for i in range(4))
    assert r2["router/var_route"] == 0.0 and all(r2[f"router/layer{i}/change_rate"] == 0.0 for i in range(4))
    mask = ref["batch"]["loss_mask"] > 0
    assert bool((ref["router"]["ids"][mask] >= 0).all())
    # at W1 the training forward routes differently from W0 (so the capture comparison below has teeth)
    assert not torch.equal(ref["router"]["train_ids"][mask], ref["router"]["ids"][mask])


@pytest.mark.parametrize("layout", ROUTER_LAYOUTS)
def test_routing_capture_and_router_metrics_match_single_process(results, layout):
    """Captured routing (token order restored) is identical; the router metrics equal the single-process
    ones (change rates exactly); r2 replay is exact at this layout."""
    ref, multi = results
    got, want = multi[f"router/{layout}"], ref["router"]
    mask = ref["batch"]["loss_mask"] > 0
    assert torch.equal(got["ids"][mask], want["ids"][mask])
    torch.testing.assert_close(got["probs"][mask], want["probs"][mask], rtol=1e-4, atol=1e-5)
    for kind in ("free", "r2"):
        assert sorted(got[kind]) == sorted(want[kind])
        for name, value in want[kind].items():
            if name.endswith("change_rate"):
                assert got[kind][name] == value, (kind, name)
            else:
                assert got[kind][name] == pytest.approx(value, rel=1e-3, abs=1e-6), (kind, name)
    assert got["r2"]["router/var_route"] == 0.0
    # the training forward's capture: the same routing and log-probs as the single process; under replay
    # exactly the replayed ids (every layout megatron-core lets train: not TP without SP)
    assert ("train_ids" in got) == (layout != "tp2_etp2_nosp_dp2")
    if layout == "tp2_etp2_nosp_dp2":
        return
    assert torch.equal(got["train_ids"][mask], want["train_ids"][mask])
    torch.testing.assert_close(got["train_lp"][mask], want["train_lp"][mask], rtol=1e-4, atol=1e-5)
    assert torch.equal(got["train_r2_ids"][mask], want["ids"][mask])
