"""MegatronEngine: the trainer's one handle on megatron-core (model, optimizer, passes, checkpoints).

Batch contract (every rank receives the same full batch; the engine takes its data-parallel shard):
    tokens            LongTensor [N, S]   prompt + response, right-padded
    loss_mask         float [N, S-1]      aligned with labels = tokens[:, 1:]; 1 on response tokens
    advantages        float [N]
    old_log_probs     float [N, S-1]      (train_minibatch)
    rollout_log_probs float [N, S-1]      optional: truncated IS (algo.tis_cap > 0) and mismatch metrics
    ref_log_probs     float [N, S-1]      needed when algo.kl_coef > 0
Log-prob index t is log p(tokens[t+1] | tokens[:t+1]) at the rollout temperature. N must split evenly over
DP ranks and then into micro-batches of train.micro_batch_size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_sapo.config import Config, ConfigError
from megatron_sapo.megatron import checkpoint, context_parallel, loss_glue, model, optimizer, packing, routing, weights
from megatron_sapo.megatron.logprobs import attach_log_prob_head
from megatron_sapo.megatron.parallel import ParallelState, init_parallel


class MegatronEngine:
    def __init__(self, cfg: Config, parallel: ParallelState | None = None, total_steps: int | None = None):
        self.cfg = cfg
        packed = {}
        if cfg.train.pack_sequences:  # checked before any process group exists
            if model.have_transformer_engine():
                raise ConfigError(
                    "train.pack_sequences: packing uses megatron's local attention with an explicit mask; "
                    "Transformer Engine attention ignores it (its THD format is not built yet): set it to false"
                )
            packed = {"masked_softmax_fusion": False}  # the fused causal kernel would ignore the packed mask
        self.par = parallel or init_parallel(cfg.parallel, cfg.train.seed, cfg.rollout.local_process)
        self.tcfg = model.build_transformer_config(
            cfg.model, cfg.parallel, batch_p2p_comm=self.par.batch_p2p_comm, **packed
        )
        chunks = model.build_model_chunks(cfg.model, self.tcfg, cfg.parallel)
        if cfg.model.init == "seeded":  # before DDP and the optimizer copy the weights
            model.seeded_init(chunks, cfg.model, cfg.train.seed)
        self.routing = routing.RoutingHandle.attach(chunks, self.tcfg, self.par)  # None for a dense model
        self.head = attach_log_prob_head(chunks, self.par.tp_group)
        self.model = optimizer.wrap_ddp(chunks, self.tcfg, cfg.optim.distributed_optimizer)
        self.optimizer = optimizer.build_optimizer(cfg.optim, self.model, self.tcfg.params_dtype)
        self._sync_units: tuple[tuple, dict] | None = None  # (storage key, weights.shards_by_unit(...))
        steps = total_steps if total_steps is not None else cfg.train.steps * cfg.algo.minibatches
        self.scheduler = optimizer.build_scheduler(cfg.optim, self.optimizer, steps)
        self.loss_spec = loss_glue.LossSpec.from_config(cfg)

    # ------------------------------------------------------------------------------------------------------
    # batches
    # ------------------------------------------------------------------------------------------------------
    def _local(self, batch: dict, mbs: int) -> dict:
        """This DP rank's contiguous block of sequences."""
        n, dp = batch["tokens"].shape[0], self.par.dp
        if n % dp or (n // dp) % mbs:
            raise ValueError(f"batch of {n} sequences must split over dp={dp} into micro-batches of {mbs}")
        rows = slice(self.par.dp_rank * (n // dp), (self.par.dp_rank + 1) * (n // dp))
        return {k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}

    def _length(self, batch: dict, rounded: bool = True) -> int:
        """Model input length: up to the batch's last loss token; `rounded` up to what SP (tp) and CP (2*cp
        chunks) split evenly."""
        multiple = self.cfg.parallel.tp if self.cfg.parallel.sp and rounded else 1
        multiple *= 2 * self.cfg.parallel.cp if self.cfg.parallel.cp > 1 and rounded else 1
        mask = batch.get("loss_mask")
        if mask is None:
            mask = torch.ones(batch["tokens"].shape[0], batch["tokens"].shape[1] - 1)
        return loss_glue.padded_length(mask, multiple)

    def _run(self, forward_step, microbatches: list, length: int, forward_only: bool) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        chunks = len(self.model)
        iterators = [iter(microbatches) for _ in range(chunks)]
        if self.routing is not None:
            iterators = [self.routing.track(it, chunk) for chunk, it in enumerate(iterators)]
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if chunks > 1 else iterators[0],
            model=self.model if chunks > 1 else self.model[0],
            num_microbatches=len(microbatches),
            seq_length=length,
            micro_batch_size=microbatches[0]["tokens"].shape[0],
            forward_only=forward_only,
        )

    def _last_stage_global_rank(self) -> int:
        return dist.get_global_rank(self.par.pp_group, self.cfg.parallel.pp - 1)

    # ------------------------------------------------------------------------------------------------------
    # passes
    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_log_probs(self, batch: dict, with_entropy: bool = False, record_routing: bool = False):
        """Forward only: log-probs [N, S-1] (float32, CPU) of tokens[:, 1:], on every rank; with
        `with_entropy`, also the per-token entropy [N, S-1] of the policy: (log_probs, entropy). Positions
        after the last loss token of the batch are 0. With `record_routing`, the routing used is appended
        to the result (routing.RoutingHandle.collect; None for a dense model). batch["replay_routing"]
        [N, S-1, L, K], when present, forces that routing (routing.py)."""
        n, seq = batch["tokens"].shape
        length = self._length(batch)
        size = self._forward_only_micro_batch_size(n)
        mbs = self._microbatches(batch, length, size)
        for m in self.model:
            m.eval()
        step = loss_glue.log_prob_forward_step(self.loss_spec, self.head, with_entropy, self.par.cp_group)
        if self.routing is not None:
            self.routing.begin(record_routing)
        outputs = self._run(step, mbs, length, True)
        for m in self.model:
            m.train()
        keys = ("log_probs", "entropy") if with_entropy else ("log_probs",)
        valid = self._length(batch, rounded=False)
        results = tuple(self._gather_rows(outputs, key, n, seq, length, valid) for key in keys)
        if record_routing:
            results += (self.routing.collect(n, seq, length, size) if self.routing is not None else None,)
        if self.routing is not None:
            self.routing.end()
        return results if len(results) > 1 else results[0]

    def _microbatches(self, batch: dict, length: int, size: int | None = None) -> list:
        """This rank's micro-batches of `size` rows, packed with train.pack_sequences (packing.py; routing replay
        ids are packed with them, routing records unpacked by RoutingHandle.collect); with context parallelism
        they keep whole rows and name this CP rank's columns (context_parallel.py)."""
        size = size or self.cfg.train.micro_batch_size
        local = self._local(batch, size)
        replay = local.get(routing.REPLAY_KEY) if self.routing is not None else None
        if self.cfg.train.pack_sequences:
            mbs = packing.pack_microbatches(local, size, length)
            if replay is not None:
                packing.attach_packed_replay(mbs, replay, length, self.tcfg.moe_router_topk)
        else:
            mbs = loss_glue.make_microbatches(local, size, length)
            if replay is not None:
                routing.attach_replay(mbs, replay, size, length, self.tcfg.moe_router_topk)
        if self.cfg.parallel.cp > 1:  # whole rows, and the columns this CP rank feeds the model
            columns = context_parallel.local_positions(length, self.cfg.parallel.cp, self.par.cp_rank)
            for mb in mbs:
                mb["cp_positions"] = columns
        return mbs

    def _forward_only_micro_batch_size(self, n: int) -> int:
        """train.logprob_micro_batch_size (0: train.micro_batch_size) for forward-only passes: they keep no
        activations for a backward, so fewer, larger micro-batches cost less per sequence. Capped at the
        largest divisor of this rank's share of the batch (diagnostics pass a subsample)."""
        t = self.cfg.train
        want, local = t.logprob_micro_batch_size or t.micro_batch_size, n // self.par.dp
        return max(d for d in range(1, min(want, local) + 1) if local % d == 0)

    def _gather_rows(self, outputs: list, key: str, n: int, seq: int, length: int, valid: int) -> torch.Tensor:
        """[N, S-1] on every rank from the last stage's micro-batch outputs of each DP rank; 0 from column
        `valid` on (the rounding of the input length to the layout: the same result at every layout)."""
        # Collectives on the backend's device (NCCL needs CUDA tensors); the result goes to the CPU.
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        mine = torch.zeros(n // self.par.dp, length, device=device)
        if self.par.is_last_stage:
            mine = torch.cat([o[key].float() for o in outputs], dim=0).to(device)
        parts = [torch.empty_like(mine) for _ in range(self.par.dp)]
        dist.all_gather(parts, mine, group=self.par.dp_group)
        full = torch.cat(parts, dim=0)
        if self.cfg.parallel.pp > 1:
            dist.broadcast(full, src=self._last_stage_global_rank(), group=self.par.pp_group)
        full = full.cpu()
        out = torch.zeros(n, seq - 1)
        width = min(valid, seq - 1)
        out[:, :width] = full[:, :width]
        return out

    def forward_backward(self, batch: dict, record_routing: bool = False):
        """Gradients of the mini-batch loss in the DDP grad buffers (`param.main_grad`, reduced over DP), no
        optimizer step; returns the reduced metrics. train_minibatch = this + the step. With
        `record_routing`: (metrics, record): the routing this training forward used, as compute_log_probs gives
        it, plus record["log_probs"] [N, S-1], the forward's own log-probs (as compute_log_probs computes)."""
        batch = self._with_is_weights(batch)
        denominators = loss_glue.global_denominators(batch["loss_mask"])
        length = self._length(batch)
        mbs = self._microbatches(batch, length)
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        sink = [] if record_routing else None
        forward_step = loss_glue.policy_forward_step(
            self.loss_spec, self.head, denominators, len(mbs), self.par.dp, sink=sink, cp_group=self.par.cp_group
        )
        if self.routing is not None:
            self.routing.begin(record_routing, training=True)
        per_mb = self._run(forward_step, mbs, length, forward_only=False)
        routing_used = None
        if record_routing:
            n, seq = batch["tokens"].shape
            if self.routing is not None:
                routing_used = self.routing.collect(n, seq, length, self.cfg.train.micro_batch_size)
            routing_used = dict(
                routing_used or {},
                log_probs=self._gather_rows(sink, "log_probs", n, seq, length, self._length(batch, False)),
            )
        if self.routing is not None:
            self.routing.end()
        metrics = loss_glue.reduce_metrics(
            per_mb,
            self.par.dp_group,
            self.par.pp_group,
            self._last_stage_global_rank(),
            self.par.is_last_stage,
        )
        metrics.update(self._mismatch_metrics(batch))
        return (metrics, routing_used) if record_routing else metrics

    def train_minibatch(self, batch: dict, record_routing: bool = False):
        """One optimizer step on the mini-batch; returns reduced metrics (same on every rank). With
        `record_routing`: (metrics, the routing of the training forward), see forward_backward."""
        if record_routing:
            metrics, routing_used = self.forward_backward(batch, record_routing=True)
            return self._optimizer_step(metrics), routing_used
        return self._optimizer_step(self.forward_backward(batch))

    def _optimizer_step(self, metrics: dict) -> dict[str, float]:
        if not math.isfinite(metrics["loss"]):
            # Adam would write NaN into every weight: skip the update. The loss is reduced over all ranks, so
            # they all agree; the gradient buffers are zeroed by the next forward_backward.
            metrics.update(grad_norm=float("nan"), lr=optimizer.current_lr(self.optimizer), update_ok=0.0)
            return metrics
        # Step k (1-based) runs at the schedule's LR of step k, so a warmup starts above 0.
        self.scheduler.step(1)
        ok, grad_norm, _ = self.optimizer.step()
        metrics.update(
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=optimizer.current_lr(self.optimizer),
            update_ok=float(bool(ok)),
        )
        return metrics

    def _with_is_weights(self, batch: dict) -> dict:
        from megatron_sapo.algo import truncated_is_weights

        a = self.cfg.algo
        if a.tis_cap > 0 and batch.get("rollout_log_probs") is not None:
            batch = dict(batch)
            batch["is_weights"] = truncated_is_weights(
                batch["old_log_probs"], batch["rollout_log_probs"], batch["loss_mask"], a.tis_cap, a.tis_level
            )
        return batch

    @staticmethod
    def _mismatch_metrics(batch: dict) -> dict:
        from megatron_sapo.algo import mismatch_metrics

        if batch.get("rollout_log_probs") is None:
            return {}
        m = mismatch_metrics(batch["old_log_probs"], batch["rollout_log_probs"], batch["loss_mask"].float())
        return {k: float(v) for k, v in m.items()}

    # ------------------------------------------------------------------------------------------------------
    # weights and checkpoints
    # ------------------------------------------------------------------------------------------------------
    def global_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded float32 weights by megatron checkpoint key, on every rank (a collective). Every rank
        holds the whole model: for tests, conversion and small models; the weight sync streams instead."""
        return weights.gather_global(self.model, "param")

    def weight_buckets(self, bucket_mb: float, dst: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The weights as buckets of whole per-layer (per-expert) tensors on global rank `dst` ({} per bucket
        elsewhere): weights.stream_global. A collective: every rank runs it to its end."""
        return weights.stream_global(self.model, bucket_mb, dst, grouped=self._sync_shards())

    def _sync_shards(self) -> dict:
        """weights.shards_by_unit(main_only) for the weight sync, rebuilt only when a parameter's storage moves:
        building it walks megatron's sharded_state_dict, about 8% of a tiny CPU RL step when done every sync.
        Its pieces are views of the parameters, so in-place updates (the optimizer, checkpoint loads) show."""
        key = tuple(p.data_ptr() for chunk in self.model for p in chunk.parameters())
        if self._sync_units is None or self._sync_units[0] != key:
            self._sync_units = (key, weights.shards_by_unit(self.model, main_only=True))
        return self._sync_units[1]

    def export_hf(self, bucket_mb: float, consume: Callable[[Iterator[dict[str, torch.Tensor]]], object], dst: int = 0):
        """The weight sync's and HF export's path: consume(buckets) runs on global rank `dst` with the weights as
        HF-named buckets (weight_buckets + megatron_to_hf), while the other ranks send their shards. A collective:
        every rank calls it; whatever consume leaves unread is still gathered (so no rank waits forever).
        Returns consume's result on dst, None elsewhere."""
        from megatron_sapo.rollout.weights import megatron_to_hf

        buckets = (megatron_to_hf(b, self.cfg.model) for b in self.weight_buckets(bucket_mb, dst))
        rank = dist.get_rank() if dist.is_initialized() else dst
        result = consume(buckets) if rank == dst else None
        for _ in buckets:  # off dst: every bucket; on dst: only what consume stopped short of
            pass
        return result

    def load_global_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """Set the weights from unsharded tensors (as global_state_dict returns them), any layout."""
        weights.load_global(self.model, full)
        # bf16 models keep separate fp32 main params in the optimizer: refresh them from the model.
        self.optimizer.reload_model_params()

    def load_hf_checkpoint(self, path: str) -> int:
        """Set the weights from an HF checkpoint folder, each rank reading only the tensors of its own shards
        (hf_checkpoint.py); returns the number of shards written."""
        from megatron_sapo.megatron.hf_checkpoint import load_hf_checkpoint

        count = load_hf_checkpoint(self.model, path, self.cfg.model)
        self.optimizer.reload_model_params()
        return count

    @torch.no_grad()
    def copy_weights_from(self, other: MegatronEngine) -> None:
        """Copy another engine's weights built at the same layout: each rank its own shards, no communication."""
        mine = [(n, p) for chunk in self.model for n, p in chunk.named_parameters()]
        theirs = [(n, p) for chunk in other.model for n, p in chunk.named_parameters()]
        if [(n, p.shape) for n, p in mine] != [(n, p.shape) for n, p in theirs]:
            raise ValueError("copy_weights_from: the two engines' parameters differ (not the same model and layout)")
        for (_, dst), (_, src) in zip(mine, theirs):
            dst.copy_(src)
        self.optimizer.reload_model_params()

    def load_weights(self, path: str) -> None:
        """Only the weights of a dist checkpoint (any layout); optimizer, schedule and RNG are left as they are."""
        checkpoint.load_weights(path, self.model)
        self.optimizer.reload_model_params()

    def save_checkpoint(self, path: str, extra: dict | None = None, weights_only: bool = False) -> None:
        optimizer, scheduler = (None, None) if weights_only else (self.optimizer, self.scheduler)
        checkpoint.save_checkpoint(path, self.model, optimizer, scheduler, extra)

    def load_checkpoint(self, path: str) -> dict:
        extra = checkpoint.load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        optimizer.use_fused_cpu_adam(self.optimizer)  # the load restored the saved param-group flags
        return extra

    def shutdown(self) -> None:
        self.par.teardown()
