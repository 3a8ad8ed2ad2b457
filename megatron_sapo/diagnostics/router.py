"""Router-induced ratio variance (../shared/SAPO.md): l = l_route + l_weight, per-layer routing drift.

    l        = log pi_theta - log pi_old                      (pi_theta: the policy as trained)
    l_route  = log pi_theta - log pi_theta(routing of pi_old)  (what routing alone changed)
    l_weight = log pi_theta(routing of pi_old) - log pi_old    (what the weights changed, routing held)

Under r2 replay the trained policy *is* pi_theta with pi_old's routing, so l_route is exactly 0: a check of
the capture / replay pipeline. All statistics are over loss tokens (loss_mask > 0). Variances are
population variances; `cov_route_weight` is Cov(l_route, l_weight) (the name says what it holds), so
var_logratio = var_route + var_weight + 2 * cov_route_weight exactly.

The math (`router_metrics`) is pure torch on full-batch tensors, which the engine hands identically to every
rank, so the metrics do not depend on the parallel layout. `run_router_diagnostics` drives the two extra
forward-only passes through the engine; `RouterStep` adds, along a step's mini-batch updates, the
decomposition per mini-batch index and the training forward's routing change (names in its docstring:
CONTRACT.md fixes only the whole-step and per-layer router/ names, so the per-index ones extend them the
way the trainer names its other per-index metrics, minibatch{k}/...).
"""

from __future__ import annotations

import time

import torch

from megatron_sapo.megatron.routing import REPLAY_KEY


def _masked_moments(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor):
    n = mask.sum().clamp_min(1.0)
    mx, my = (x * mask).sum() / n, (y * mask).sum() / n
    dx, dy = (x - mx) * mask, (y - my) * mask
    return (dx * dx).sum() / n, (dy * dy).sum() / n, (dx * dy).sum() / n


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = mask.sum().clamp_min(1.0)
    mean = (x * mask).sum() / n
    return (((x - mean) * mask) ** 2).sum() / n


def decompose(lp_theta, lp_replay, lp_old, mask) -> dict[str, torch.Tensor]:
    """Var(l), Var(l_route), Var(l_weight), 2 Cov and the router share, as 0-dim tensors."""
    lp_theta, lp_replay, lp_old, mask = (x.double() for x in (lp_theta, lp_replay, lp_old, mask))
    l_route, l_weight = lp_theta - lp_replay, lp_replay - lp_old
    var_route, var_weight, cov = _masked_moments(l_route, l_weight, mask)
    var_l = masked_var(lp_theta - lp_old, mask)  # = var_route + var_weight + 2 cov
    share = torch.where(var_l > 0, var_route / var_l.clamp_min(1e-300), torch.zeros_like(var_l))
    return {
        "var_logratio": var_l,
        "var_route": var_route,
        "var_weight": var_weight,
        "cov_route_weight": cov,
        "share": share,
    }


def routing_changed(ids_old: torch.Tensor, ids_new: torch.Tensor) -> torch.Tensor:
    """[..., L, K] ids -> [..., L] bool: the top-k expert SET differs."""
    return (ids_old.sort(-1).values != ids_new.sort(-1).values).any(-1)


def layer_metrics(ids_old, ids_new, entropy, log_ratio, mask, layers, num_experts) -> dict:
    """Per MoE layer: change_rate, var_changed, var_unchanged, load_cv, load_max_mean, entropy."""
    out = {}
    mask = mask.float()
    changed = routing_changed(ids_old, ids_new)  # [N, T, L]
    n = mask.sum().clamp_min(1.0)
    for layer in layers:
        c = changed[..., layer].float() * mask
        u = (1.0 - changed[..., layer].float()) * mask
        ids = ids_new[..., layer, :][mask > 0].reshape(-1).long()
        load = torch.bincount(ids.clamp_min(0), minlength=num_experts).float()
        mean_load = load.mean().clamp_min(1e-12)
        out[f"layer{layer}/change_rate"] = c.sum() / n
        out[f"layer{layer}/var_changed"] = masked_var(log_ratio, c)
        out[f"layer{layer}/var_unchanged"] = masked_var(log_ratio, u)
        out[f"layer{layer}/load_cv"] = load.std(unbiased=False) / mean_load
        out[f"layer{layer}/load_max_mean"] = load.max() / mean_load
        out[f"layer{layer}/entropy"] = (entropy[..., layer] * mask).sum() / n
    return out


def gate_split(log_ratio, advantages, mask, changed_any, tau_pos: float, tau_neg: float) -> dict:
    """SAPO gate weight w = 4 p (1 - p) averaged over tokens whose routing changed (in any layer) vs not."""
    from megatron_sapo.algo.losses import sapo_gate

    ratio = torch.exp(log_ratio.clamp(-20, 20))
    adv = advantages.reshape(-1, 1).expand_as(ratio)
    tau = torch.where(adv > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    _, weight = sapo_gate(ratio, tau)
    out = {}
    for name, sel in (("changed", changed_any), ("unchanged", ~changed_any)):
        m = sel.float() * mask.float()
        out[f"gate_{name}"] = (weight * m).sum() / m.sum().clamp_min(1.0)
        out[f"gate_low_frac_{name}"] = ((weight < 0.5).float() * m).sum() / m.sum().clamp_min(1.0)
    return out


def rollout_change_rates(rollout_ids, trainer_ids, mask, layers) -> dict:
    """Per layer: fraction of loss tokens whose top-k set differs between the rollout engine and the trainer
    (tokens the rollout engine did not report, -1, are left out)."""
    changed = routing_changed(rollout_ids, trainer_ids)
    reported = (rollout_ids >= 0).all(-1)
    out = {}
    for layer in layers:
        m = mask.float() * reported[..., layer].float()
        out[f"layer{layer}/rollout_change_rate"] = (changed[..., layer].float() * m).sum() / m.sum().clamp_min(1.0)
    return out


def router_metrics(
    lp_theta, lp_replay, lp_old, mask, old, new, num_experts, advantages=None, sapo_tau=None, rollout_ids=None
):
    """All router/... metrics as plain floats (one host transfer at the end). `old` / `new`: routing records
    (ids [N, T, L, K], entropy [N, T, L], moe_layers) of pi_old's pass and of the current pass; `rollout_ids`:
    the rollout engine's routing, compared with pi_old's (free) routing."""
    stats = decompose(lp_theta, lp_replay, lp_old, mask)
    log_ratio = lp_theta.double() - lp_old.double()
    layers = new["moe_layers"]
    stats.update(layer_metrics(old["ids"], new["ids"], new["entropy"], log_ratio, mask, layers, num_experts))
    if advantages is not None and sapo_tau is not None:
        changed_any = routing_changed(old["ids"][..., layers, :], new["ids"][..., layers, :]).any(-1)
        stats.update(gate_split(log_ratio, advantages, mask, changed_any, *sapo_tau))
    if rollout_ids is not None:
        stats.update(rollout_change_rates(rollout_ids, old["ids"], mask, layers))
    names = list(stats)
    values = torch.stack([stats[k].double() for k in names]).tolist()
    return {f"router/{k}": v for k, v in zip(names, values)}


def sample_rows(n: int, max_sequences: int, multiple: int) -> int:
    """How many leading sequences one decomposition uses: <= max_sequences, a multiple of `multiple` (dp)."""
    rows = min(n, max_sequences) // multiple * multiple
    return rows if rows > 0 else min(n, multiple)


def _rows(routing: dict, start: int, stop: int) -> dict:
    return {k: (v[start:stop] if torch.is_tensor(v) else v) for k, v in routing.items()}


def _sample(engine, batch: dict, max_sequences: int | None = None) -> tuple[int, dict]:
    """The leading rows one decomposition uses (max_sequences, default diagnostics.max_sequences, a multiple
    of dp: forward-only passes take any micro-batch split) and the batch keys its passes need (no
    replay_routing: each pass says its own routing)."""
    limit = max_sequences if max_sequences is not None else engine.cfg.diagnostics.max_sequences
    rows = sample_rows(batch["tokens"].shape[0], limit, engine.par.dp)
    return rows, {k: batch[k][:rows] for k in ("tokens", "loss_mask", "advantages")}


def _passes(engine, sub: dict, old_ids: torch.Tensor, replay: bool):
    """pi_theta's log-probs (free routing, or pi_old's when `replay`), its routing, and the log-probs with
    pi_old's routing replayed: the two extra forward-only passes of a decomposition."""
    replayed = dict(sub, **{REPLAY_KEY: old_ids})
    lp_theta, new = engine.compute_log_probs(replayed if replay else sub, record_routing=True)
    return lp_theta, new, engine.compute_log_probs(replayed)


def run_router_diagnostics(
    engine, batch: dict, old_routing: dict | None, replay: bool = False, rollout_ids: torch.Tensor | None = None
) -> dict:
    """Two forward-only passes at the current weights on a leading sample of the step's batch: the trained
    policy (free routing, or pi_old's routing when `replay` (r2)) with its routing recorded, and pi_old's
    routing replayed. `batch` holds old_log_probs; `old_routing` comes from the old-log-prob pass (free
    routing, unless r3); `rollout_ids` [N, S-1, L, K]: the rollout engine's routing, when it reports one.
    Returns {} for a dense model (no router terms)."""
    if old_routing is None or engine.routing is None:
        return {}
    cfg = engine.cfg
    rows, sub = _sample(engine, batch)
    old = _rows(old_routing, 0, rows)
    lp_theta, new, lp_replay = _passes(engine, sub, old["ids"], replay)
    a = cfg.algo
    tau = (a.tau_pos, a.tau_neg) if a.loss == "sapo" else None
    return router_metrics(
        lp_theta,
        lp_replay,
        batch["old_log_probs"][:rows],
        sub["loss_mask"],
        old,
        new,
        cfg.model.num_experts,
        advantages=sub["advantages"],
        sapo_tau=tau,
        rollout_ids=rollout_ids[:rows] if rollout_ids is not None else None,
    )


def rollout_vs_free_routing(engine, batch: dict, rollout_ids: torch.Tensor) -> dict:
    """router/layer{i}/rollout_change_rate from one free-routing forward-only pass of the current weights (call
    it at pi_old's weights) on the leading sample: for r3, where pi_old's own pass replays the rollout's
    routing and so never shows the trainer's free routing."""
    rows, sub = _sample(engine, batch)
    _, free = engine.compute_log_probs(sub, record_routing=True)
    rates = rollout_change_rates(rollout_ids[:rows], free["ids"], sub["loss_mask"], free["moe_layers"])
    return {f"router/{k}": v for k, v in rates.items()}


class RouterStep:
    """A diagnostic step's router metrics beyond the whole-step decomposition. Build it at pi_old's weights
    (after the old-log-prob pass), then call before_update / after_update around each mini-batch update:
      router/minibatch{k}/{var_logratio,var_route,var_weight,cov_route_weight,share}: the decomposition on a
          sample of mini-batch k at the weights its update sees (k optimizer steps after pi_old: the
          off-policy depth; k >= 1: k = 0 is on-policy, l = 0 by construction);
      router/minibatch{k}/train_change_rate, router/layer{i}/train_change_rate: the fraction of loss tokens
          (x MoE layers) whose top-k set in the training forward differs from pi_old's pass (0 under replay);
      router/layer{i}/rollout_change_rate under r3 (rollout_vs_free_routing).
    `seconds`: time spent in the extra passes (not training time)."""

    def __init__(self, engine, batch: dict, old_routing: dict, mode: str, rollout_ids: torch.Tensor | None):
        self.engine, self.old, self.replay = engine, old_routing, mode != "none"
        # the mini-batch decompositions share the sample budget: together they cost one whole-step decomposition
        d = engine.cfg.diagnostics
        self.per_minibatch = max(1, d.max_sequences // engine.cfg.algo.minibatches)
        self.layers = list(old_routing["moe_layers"])
        self.out: dict[str, torch.Tensor] = {}
        self.changed, self.tokens, self.offset = torch.zeros(len(self.layers), dtype=torch.float64), 0.0, 0
        self.pending = None  # (rows, replayed log-probs) of the update in progress, from before_update
        start = time.perf_counter()
        if mode == "r3" and rollout_ids is not None:
            self.out.update(rollout_vs_free_routing(engine, batch, rollout_ids))
        self.seconds = time.perf_counter() - start

    def before_update(self, k: int, mb: dict) -> None:
        """The part of mini-batch k's decomposition (rows offset.. of the step's batch) that its training
        forward does not give: without replay, the log-probs with pi_old's routing replayed at the current
        weights (the training forward gives the free-routing ones); under replay nothing (the training forward
        replays pi_old's routing: l_route = 0). Not for k = 0: that update sees pi_old's own weights, so
        l = 0 (up to float rounding) by construction."""
        self.pending = None
        if k == 0 or self.replay:
            return
        start = time.perf_counter()
        rows, sub = _sample(self.engine, mb, self.per_minibatch)
        old = _rows(self.old, self.offset, self.offset + rows)
        self.pending = (rows, self.engine.compute_log_probs(dict(sub, **{REPLAY_KEY: old["ids"]})))
        self.seconds += time.perf_counter() - start

    def after_update(self, k: int, mb: dict, train_record: dict) -> None:
        """Mini-batch k's decomposition, with the training forward's log-probs (train_record["log_probs"]) as
        pi_theta's, and its routing vs pi_old's on all of mini-batch k's loss tokens."""
        if k > 0:
            rows = self.pending[0] if self.pending else _sample(self.engine, mb, self.per_minibatch)[0]
            lp_theta = train_record["log_probs"][:rows]
            lp_replay = self.pending[1] if self.pending else lp_theta
            d = decompose(lp_theta, lp_replay, mb["old_log_probs"][:rows], mb["loss_mask"][:rows])
            self.out.update({f"router/minibatch{k}/{name}": v for name, v in d.items()})
        self._change_rates(k, mb, train_record)

    def _change_rates(self, k: int, mb: dict, train_routing: dict) -> None:
        n = mb["tokens"].shape[0]
        old_ids = self.old["ids"][self.offset : self.offset + n][..., self.layers, :]
        changed = routing_changed(old_ids, train_routing["ids"][..., self.layers, :]).double()
        mask = mb["loss_mask"].double()
        per_layer = (changed * mask.unsqueeze(-1)).sum((0, 1))
        self.out[f"router/minibatch{k}/train_change_rate"] = per_layer.mean() / mask.sum().clamp_min(1.0)
        self.changed += per_layer
        self.tokens += float(mask.sum())
        self.offset += n

    def metrics(self) -> dict[str, float]:
        out = dict(self.out)
        for i, layer in enumerate(self.layers):
            out[f"router/layer{layer}/train_change_rate"] = self.changed[i] / max(self.tokens, 1.0)
        names = list(out)
        values = torch.stack([torch.as_tensor(out[k]).double() for k in names]).tolist() if names else []
        return dict(zip(names, values))
