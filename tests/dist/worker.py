"""Multi-process checks of MegatronEngine, launched by tests/dist/test_engine_dist.py through torchrun.

Two launches (each torchrun start costs 10-45 s of imports on 2 cores, so each checks many things):
  ref   (1 process):  the single-process reference. Weights W0, old log-probs, SAPO/GRPO/GSPO loss
                      and gradients, micro-batches 1 vs 4 vs a plain full-batch autograd reference, three
                      optimizer steps with a checkpoint after the first.
  multi (4 processes): the same quantities at TP2+SP x DP2, PP2 x DP2, EP2 x DP4, TP2xEP2+SP,
                      TP2xEP2xETP2+SP, PP2+VPP2xTP2+SP (plus the batch_p2p_comm=True negative control),
                      optimizer steps at TP2xPP2xEP2+SP, checkpoint resume across layouts.
Results (plain numbers) go to OUT/<phase>.pt from rank 0; the pytest side asserts on them.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from megatron_sapo.config import Config, ParallelConfig  # noqa: E402
from megatron_sapo.megatron import compat, context_parallel, weights  # noqa: E402
from megatron_sapo.megatron.engine import MegatronEngine  # noqa: E402
from megatron_sapo.megatron.parallel import init_parallel, init_torch_distributed  # noqa: E402
from tests.batches import max_rel_diff  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import router_checks  # noqa: E402

N, S, VOCAB = 8, 33, 512
LOSSES = {
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "grpo": {"eps_low": 0.2, "eps_high": 0.27},
    "gspo": {"eps_low": 3e-4, "eps_high": 4e-4},
}


def make_config(aux: bool = True, distopt: bool = False, mbs: int = 2, **parallel) -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.vocab_size, m.max_seq_len = 4, 64, 4, VOCAB, 64
    m.num_experts, m.moe_topk, m.moe_ffn_hidden_size = 4, 2, 64
    m.moe_shared_expert_ffn_hidden_size = 32
    m.moe_router_load_balancing = "aux_loss" if aux else "none"
    m.moe_aux_loss_coeff = 1e-2
    cfg.parallel = ParallelConfig(**parallel)
    cfg.train.micro_batch_size = mbs
    cfg.optim.lr, cfg.optim.clip_grad = 1e-3, 1.0
    cfg.optim.distributed_optimizer = distopt
    cfg.train.steps, cfg.algo.minibatches = 3, 1
    return cfg


def make_batch() -> dict:
    """8 right-padded sequences: prompts of 3-8 tokens, responses of 6-22 tokens, then padding; the last one
    fills the row, so that the model input (S-1 = 32 positions) needs no rounding for SP or CP: megatron's
    load-balancing loss counts padding positions too, so rounding would change the aux-loss reference."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.zeros(N, S, dtype=torch.long)
    loss_mask = torch.zeros(N, S - 1)
    for i in range(N):
        prompt = 3 + i % 6
        response = S - prompt if i == N - 1 else 6 + (5 * i) % 17
        tokens[i, : prompt + response] = torch.randint(1, VOCAB, (prompt + response,), generator=g)
        loss_mask[i, prompt - 1 : prompt - 1 + response] = 1.0
    advantages = torch.randn(N, generator=g)
    return {"tokens": tokens, "loss_mask": loss_mask, "advantages": advantages}


def set_loss(engine: MegatronEngine, name: str) -> None:
    engine.loss_spec.name, engine.loss_spec.hyper = name, dict(LOSSES[name])


def grads_of(engine: MegatronEngine, batch: dict, loss: str = "sapo") -> tuple[dict, dict]:
    set_loss(engine, loss)
    metrics = engine.forward_backward(batch)
    return metrics, weights.gather_global(engine.model, "grad")


def log0(*args) -> None:
    if dist.get_rank() == 0:
        print(f"[{time.strftime('%X')}]", *args, flush=True)


class Layout:
    """An engine at one layout, torn down (megatron's groups) on exit."""

    def __init__(self, cfg: Config, weights0: dict | None, batch_p2p_comm: bool | None = None):
        self.par = init_parallel(cfg.parallel, seed=cfg.train.seed)
        if batch_p2p_comm is not None:
            self.par.batch_p2p_comm = batch_p2p_comm
        self.engine = MegatronEngine(cfg, parallel=self.par)
        if weights0 is not None:
            self.engine.load_global_state_dict(weights0)

    def __enter__(self) -> MegatronEngine:
        return self.engine

    def __exit__(self, *exc) -> None:
        self.engine = None
        self.par.teardown()


# ----------------------------------------------------------------------------------------------------------
# phase ref: one process
# ----------------------------------------------------------------------------------------------------------
def plain_reference(engine: MegatronEngine, batch: dict) -> tuple[float, dict]:
    """Full batch through the model in one plain forward, log_softmax, compute_policy_loss, autograd."""
    from megatron_sapo.algo import compute_policy_loss

    for m in engine.model:
        m.zero_grad_buffer()
    tokens = batch["tokens"][:, :-1]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = engine.model[0](tokens, positions, None)
    log_probs = torch.log_softmax(logits.float(), -1).gather(-1, batch["tokens"][:, 1:, None]).squeeze(-1)
    spec = engine.loss_spec
    loss, _ = compute_policy_loss(
        spec.name,
        log_probs,
        batch["old_log_probs"],
        batch["advantages"],
        batch["loss_mask"],
        agg=spec.agg,
        **spec.hyper,
    )
    loss.backward()  # DDP's hooks accumulate into main_grad (dp = 1: no scaling)
    return float(loss), weights.gather_global(engine.model, "grad")


def phase_ref(out_dir: str) -> dict:
    res: dict = {}
    batch = make_batch()
    with Layout(make_config(), None) as eng:
        w0 = eng.global_state_dict()
        lp = eng.compute_log_probs(batch)
        g = torch.Generator().manual_seed(3)
        batch["old_log_probs"] = (lp + 0.3 * torch.randn(lp.shape, generator=g)) * batch["loss_mask"]
        for loss in LOSSES:
            metrics, grads = grads_of(eng, batch, loss)
            res[f"{loss}_loss"], res[f"{loss}_grads"], res[f"{loss}_metrics"] = (
                metrics["loss"],
                grads,
                metrics,
            )
        log0("reference losses", {k: v for k, v in res.items() if k.endswith("_loss")})
    res.update(w0=w0, batch=batch, log_probs=lp)
    with Layout(make_config(), w0) as eng:  # routing capture / replay / diagnostics (router_checks.py)
        res["router"] = router_checks.router_results(eng, batch, router_checks.perturbed(w0))
    log0("router (ref)", res["router"]["free"])

    # Micro-batches 1 vs 4 vs one plain autograd pass. No aux loss here: megatron's load-balancing loss is
    # defined per micro-batch, so it legitimately changes with the grouping; the policy loss must not.
    for mbs in (2, 8):
        with Layout(make_config(aux=False, mbs=mbs), w0) as eng:
            metrics, grads = grads_of(eng, batch)
            res[f"noaux_mbs{mbs}"] = (metrics["loss"], grads)
            if mbs == 8:
                res["plain"] = plain_reference(eng, batch)
    log0("micro-batch / plain losses", res["noaux_mbs2"][0], res["noaux_mbs8"][0], res["plain"][0])

    # Optimizer steps (distributed optimizer), checkpoint after the first.
    with Layout(make_config(distopt=True), w0) as eng:
        steps = [eng.train_minibatch(batch)["loss"]]
        eng.save_checkpoint(os.path.join(out_dir, "ckpt_ref_step1"), extra={"step": 1})
        steps += [eng.train_minibatch(batch)["loss"] for _ in range(2)]
    res["opt_losses"] = steps
    log0("optimizer losses", steps)
    return res


# ----------------------------------------------------------------------------------------------------------
# phase multi: four processes
# ----------------------------------------------------------------------------------------------------------
GRAD_LAYOUTS = {
    "tp2_sp_dp2": dict(tp=2, etp=2, sp=True, dp=2),
    "pp2_dp2": dict(pp=2, dp=2),
    "ep2_dp4": dict(ep=2, dp=4),
    "tp2_ep2_sp": dict(tp=2, sp=True, ep=2, dp=2),
    "tp2_ep2_etp2_sp": dict(tp=2, sp=True, ep=2, etp=2, dp=2),
    # dp=1: four micro-batches per rank, where batched p2p on gloo goes wrong (two did not show it).
    "pp2_vpp2_tp2": dict(pp=2, vpp=2, tp=2, etp=2, sp=True),
    # context parallelism: megatron's local attention + context_parallel.AllGatherKVAttention on gloo
    "cp2_tp2_sp": dict(cp=2, tp=2, etp=2, sp=True),
    "cp2_ep2_dp2": dict(cp=2, ep=2, dp=2),
}


# train.pack_sequences (no aux loss: megatron's load-balancing loss depends on how tokens are grouped)
PACKED_LAYOUTS = {
    "tp2_ep2_sp": dict(tp=2, sp=True, ep=2, dp=2),
    "pp2_dp2": dict(pp=2, dp=2),
    "cp2_tp2_sp": dict(cp=2, tp=2, etp=2, sp=True),  # packed rows split over CP ranks
}


def check_gloo_uneven_gather() -> dict:
    """The patched mappings._gather_along_first_dim gathers uneven splits on gloo; the original cannot."""
    import megatron.core.tensor_parallel.mappings as mappings

    group, rank = dist.group.WORLD, dist.get_rank()
    sizes = [1 + r for r in range(dist.get_world_size())]
    x = torch.full((sizes[rank], 3), float(rank))
    expect = torch.cat([torch.full((n, 3), float(r)) for r, n in enumerate(sizes)])
    patched_ok = torch.equal(mappings._gather_along_first_dim(x, group, sizes), expect)
    try:
        original_ok = torch.equal(compat.original("gloo_uneven_gather")["gather"](x, group, sizes), expect)
    except Exception:  # gloo: "invalid tensor size"
        original_ok = False
    return {"patched_ok": patched_ok, "original_ok": original_ok}


def check_stream_to_one_rank(eng: MegatronEngine) -> dict:
    """weight_buckets(dst=0): rank 0 receives every per-layer / per-expert tensor exactly once, in buckets no
    larger than the limit (or one tensor), equal to the all-gathered weights; the other ranks get as many
    empty buckets."""
    from megatron_sapo.rollout.weights import unstack_layers

    everywhere = unstack_layers(eng.global_state_dict())  # stacked keys -> one name per layer / expert
    limit_mb = 0.05
    buckets = list(eng.weight_buckets(limit_mb, dst=0))
    count = torch.tensor([len(buckets)])
    if dist.get_rank() == 0:
        names = [n for b in buckets for n in b]
        streamed = {n: t for b in buckets for n, t in b.items()}
        sizes = [sum(t.numel() * t.element_size() for t in b.values()) for b in buckets]
        ok = (
            len(names) == len(set(names))
            and sorted(streamed) == sorted(everywhere)
            and all(torch.equal(streamed[k], everywhere[k]) for k in everywhere)
            and all(size <= limit_mb * 2**20 or len(b) == 1 for size, b in zip(sizes, buckets))
        )
    else:
        ok = all(b == {} for b in buckets)
    flag = torch.tensor([1 if ok else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    counts = torch.cat([count, -count])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)  # max and -min of the bucket counts
    return {"all_ranks_ok": bool(flag.item()), "buckets": len(buckets), "same_count": int(counts[0]) == -int(counts[1])}


def cp_with_contiguous_chunks(batch: dict, w0: dict, ref_log_probs: torch.Tensor) -> float:
    """Negative control: CP2 with each rank holding one contiguous half of the sequence, consistently in the
    data split, the attention mask and the gather, but not in megatron's rope (which selects the load-balanced
    chunks r and 2cp-1-r). Returns the largest log-prob difference from the single-process run."""
    original = context_parallel._positions

    def contiguous(length: int, cp: int, rank: int) -> torch.Tensor:
        return torch.arange(rank * length // cp, (rank + 1) * length // cp)

    context_parallel._positions = contiguous
    context_parallel._gathered_order.cache_clear()
    try:
        with Layout(make_config(**GRAD_LAYOUTS["cp2_ep2_dp2"]), w0) as eng:
            return float((eng.compute_log_probs(batch) - ref_log_probs).abs().max())
    finally:
        context_parallel._positions = original
        context_parallel._gathered_order.cache_clear()


def phase_multi(out_dir: str, ref: dict) -> dict:
    res: dict = {"gloo_uneven": check_gloo_uneven_gather()}
    batch, w0 = ref["batch"], ref["w0"]
    for name, layout in GRAD_LAYOUTS.items():
        with Layout(make_config(**layout), w0) as eng:
            lp = eng.compute_log_probs(batch)
            res[f"{name}/log_probs"] = float((lp - ref["log_probs"]).abs().max())
            losses = ("sapo", "grpo", "gspo") if name == "tp2_ep2_sp" else ("sapo",)
            for loss in losses:
                metrics, grads = grads_of(eng, batch, loss)
                res[f"{name}/{loss}"] = {
                    "loss_diff": abs(metrics["loss"] - ref[f"{loss}_loss"]),
                    "grad_rel": max_rel_diff(grads, ref[f"{loss}_grads"]),
                    "metrics": metrics,
                }
        log0(name, {k: v for k, v in res.items() if k.startswith(name)})
    mask = batch["loss_mask"] > 0
    for name, layout in PACKED_LAYOUTS.items():  # against the single-process run without aux loss
        cfg = make_config(aux=False, **layout)
        cfg.train.pack_sequences = True
        with Layout(cfg, w0) as eng:
            lp = eng.compute_log_probs(batch)
            metrics, grads = grads_of(eng, batch)
            _, packed_rec = eng.compute_log_probs(batch, record_routing=True)
            eng.cfg.train.pack_sequences = False  # the same engine, one sequence per row
            _, plain_rec = eng.compute_log_probs(batch, record_routing=True)
        loss_ref, grads_ref = ref["noaux_mbs2"]
        same = (packed_rec["ids"] == plain_rec["ids"]).all(-1)[mask]
        res[f"packed/{name}"] = {
            "loss_diff": abs(metrics["loss"] - loss_ref),
            "grad_rel": max_rel_diff(grads, grads_ref),
            "log_probs": float((lp - ref["log_probs"])[mask].abs().max()),
            # routing recorded on packed rows, back per sequence, against the unpacked record
            "routing_same": float(same.float().mean()),
            "probs_diff": float((packed_rec["probs"] - plain_rec["probs"])[mask][same].abs().max()),
        }
        log0("packed", name, res[f"packed/{name}"])
    w1 = router_checks.perturbed(w0)
    for name, layout in router_checks.ROUTER_LAYOUTS.items():
        with Layout(make_config(**layout), w0) as eng:
            res[f"router/{name}"] = router_checks.router_results(eng, batch, w1)
    log0("router layouts done")
    # Negative control: the same PP2+VPP2 layout with batched p2p, which the engine refuses on gloo.
    with Layout(make_config(**GRAD_LAYOUTS["pp2_vpp2_tp2"]), w0, batch_p2p_comm=True) as eng:
        metrics, grads = grads_of(eng, batch)
        res["negative/pp2_vpp2_tp2_batch_p2p"] = {"grad_rel": max_rel_diff(grads, ref["sapo_grads"])}
    log0("negative control", res["negative/pp2_vpp2_tp2_batch_p2p"])
    res["negative/cp2_contiguous_chunks"] = cp_with_contiguous_chunks(batch, w0, ref["log_probs"])
    log0("negative control", res["negative/cp2_contiguous_chunks"])

    big = dict(tp=2, pp=2, ep=2, sp=True, dp=1)
    with Layout(make_config(distopt=True, **big), w0) as eng:
        res["gather_dst0"] = check_stream_to_one_rank(eng)
        res["opt_losses"] = [eng.train_minibatch(batch)["loss"] for _ in range(3)]
    ckpt2 = os.path.join(out_dir, "ckpt_multi_step2")
    with Layout(make_config(distopt=True, **big), None) as eng:
        extra = eng.load_checkpoint(os.path.join(out_dir, "ckpt_ref_step1"))
        resumed = [eng.train_minibatch(batch)["loss"]]
        eng.save_checkpoint(ckpt2, extra={"step": 2})
        resumed.append(eng.train_minibatch(batch)["loss"])
    res["resume_tp1_to_tp2pp2ep2"] = {"extra": extra, "losses": resumed}
    with Layout(make_config(distopt=True, tp=2, etp=2, sp=True, dp=2), None) as eng:
        extra = eng.load_checkpoint(ckpt2)
        res["resume_tp2pp2ep2_to_tp2dp2"] = {"extra": extra, "losses": [eng.train_minibatch(batch)["loss"]]}
    log0(
        "optimizer / resume",
        res["opt_losses"],
        res["resume_tp1_to_tp2pp2ep2"],
        res["resume_tp2pp2ep2_to_tp2dp2"],
    )
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["ref", "multi"])
    parser.add_argument("out_dir")
    args = parser.parse_args()
    start = time.time()
    compat.apply_patches()
    init_torch_distributed()
    if args.phase == "ref":
        res = phase_ref(args.out_dir)
    else:
        res = phase_multi(args.out_dir, torch.load(os.path.join(args.out_dir, "ref.pt"), weights_only=False))
    res["wall_s"] = time.time() - start
    if dist.get_rank() == 0:
        torch.save(copy.deepcopy(res), os.path.join(args.out_dir, f"{args.phase}.pt"))
    log0(f"{args.phase} done in {res['wall_s']:.1f}s")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing may spawn a process that re-imports __main__
    sys.exit(main())
