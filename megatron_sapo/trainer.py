"""The RL loop: rollout -> rewards -> advantages -> old log-probs -> mini-batch updates -> sync -> log.

Every rank runs this loop. Rank 0 owns the rollout engine, the rewards and the run folder; the rollout
batch is broadcast so that all ranks hand the same full batch to the Megatron engine, which takes its
data-parallel shard. With rollout.async_steps=1, rank 0 generates the next step's rollout in a thread
(rollout/ahead.py) while this step trains: its samples are one weight version old when trained on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import time

import torch
import torch.distributed as dist

from megatron_sapo.algo import compute_advantages
from megatron_sapo.config import Config, ConfigError, save_config
from megatron_sapo.data.collate import collate_samples, minibatches
from megatron_sapo.diagnostics.progress import progress_bar
from megatron_sapo.diagnostics.writer import MetricsWriter, console_line
from megatron_sapo.preemption import Preempted, StopSignals
from megatron_sapo.rollout.ahead import RolloutAhead
from megatron_sapo.rollout.base import Sample, SamplingParams
from megatron_sapo.run_state import find_resume_checkpoint, mark_complete, prune_checkpoints

DYNAMIC_SAMPLING_ROUNDS = 4
REFERENCE_DIR = "reference_weights"  # in the run folder: the KL reference's weights
# CONTRACT.md: every metrics.jsonl row has at least these (plus gate_mean for SAPO, clip_frac otherwise); a
# skipped step that never computed one logs it as NaN (null in the file), so dashboards keep their columns.
ROW_KEYS = ("loss", "grad_norm", "reward_mean", "response_len_mean", "ratio_mean", "ratio_std", "kl_rollout_k3",
            "tokens_per_s", "time_rollout_s", "time_train_s", "time_sync_s")  # fmt: skip


def fault_point(phase: str, step: int) -> None:
    """Fault injection for the resume tests: MEGATRON_SAPO_KILL_AT=phase@step SIGKILLs this process there
    (phases: rollout, update, checkpoint). Unset in normal runs: one environment lookup."""
    target = os.environ.get("MEGATRON_SAPO_KILL_AT")
    if target and target == f"{phase}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


class TrainingStopped(RuntimeError):
    """Too many consecutive steps had to be skipped (NaN rewards or losses)."""


def _broadcast(obj):
    """Rank 0's object on every rank (world size 1: unchanged)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    path = cfg.data.tokenizer or cfg.model.hf_path
    if path and not cfg.data.tokenizer and not os.path.exists(os.path.join(path, "tokenizer_config.json")):
        raise ConfigError(f"model.hf_path={path!r} holds no tokenizer_config.json: set data.tokenizer")
    if path is None:
        from megatron_sapo.data.tokenizer import build_tiny_tokenizer

        path = build_tiny_tokenizer(os.path.join(cfg.run.dir, "tokenizer"), vocab_size=cfg.model.vocab_size)
    return AutoTokenizer.from_pretrained(path)


def build_rollout_engine(cfg: Config, tokenizer):
    if cfg.rollout.engine == "local" and cfg.rollout.local_process:
        from megatron_sapo.megatron.parallel import cpu_threads_per_process
        from megatron_sapo.rollout.local_process import LocalProcessEngine

        threads = cpu_threads_per_process(cfg.parallel.world_size, cfg.parallel.cpu_threads, rollout_process=True)
        return LocalProcessEngine(cfg.model, tokenizer.eos_token_id, tokenizer.pad_token_id, threads)
    if cfg.rollout.engine == "local":
        from megatron_sapo.rollout.local import LocalEngine

        return LocalEngine(cfg.model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if cfg.rollout.engine == "sglang":
        from megatron_sapo.rollout.sglang_engine import SGLangEngine

        return SGLangEngine(
            cfg.rollout, cfg.model, work_dir=os.path.join(cfg.run.dir, "sglang"),
            tokenizer_path=tokenizer.name_or_path, eos_token_id=tokenizer.eos_token_id,
            model_path=cfg.model.hf_path, seed=cfg.train.seed, progress=cfg.logging.progress,
        )  # fmt: skip
    raise ValueError(f"rollout.engine={cfg.rollout.engine!r} is not available in this build; use 'local'")


class Trainer:
    def __init__(self, cfg: Config):
        from megatron_sapo.megatron.engine import MegatronEngine

        self.cfg = cfg
        # Data and tokenizer first: bad input fails in seconds, before the model is built.
        self.is_rank0 = int(os.environ.get("RANK", "0")) == 0
        if self.is_rank0:
            from megatron_sapo.data.prompts import build_prompt_source_from_config

            os.makedirs(cfg.run.dir, exist_ok=True)
            resolved = os.path.join(cfg.run.dir, "config.yaml")
            save_config(cfg, resolved)
            with open(resolved, encoding="utf-8") as f:
                print(f"resolved config (saved as {resolved}):\n{f.read()}", flush=True)
            self.tokenizer = load_tokenizer(cfg)
            self.resume_path = find_resume_checkpoint(cfg)  # before the model: a bad explicit path fails fast
            self.prompts = build_prompt_source_from_config(cfg.data, self.tokenizer, cfg.train.seed)
            self.rollout = build_rollout_engine(cfg, self.tokenizer)
            self.ahead = RolloutAhead()  # used with rollout.async_steps=1, or after resuming such a run
        self.engine = MegatronEngine(cfg)
        if cfg.model.hf_path:  # before the reference copy and the resume (which overrides it)
            self._load_hf_weights(cfg.model.hf_path)
        self.reference = self._build_reference() if cfg.algo.kl_coef > 0 else None
        self.step = 0
        self.weight_version = 0
        self.skipped_in_a_row = 0
        self._resume()
        if self.is_rank0:
            self.writer = MetricsWriter(
                cfg.run.dir,
                cfg.logging.tensorboard,
                resume_after_step=self.step,
                wandb_project=cfg.logging.wandb_project,
                config=dataclasses.asdict(cfg),
            )

    # ------------------------------------------------------------------------------------------------------
    def _load_hf_weights(self, path: str) -> None:
        self.engine.load_hf_checkpoint(path)  # each rank reads only its own shards' tensors
        if self.is_rank0:
            print(f"initial weights from {path}")

    def _build_reference(self):
        """A frozen copy of the initial policy for the KL penalty (same layout and process groups): each rank
        copies its own shards, no gather. The copy is kept in the run folder as a sharded weights-only
        checkpoint, so a resumed run uses the initial weights, not the resumed ones."""
        from megatron_sapo.megatron.engine import MegatronEngine

        reference = MegatronEngine(self.cfg, parallel=self.engine.par)
        path = os.path.join(self.cfg.run.dir, REFERENCE_DIR)
        if _broadcast(os.path.isdir(path) if self.is_rank0 else None):  # the run folder is shared by all ranks
            reference.load_weights(path)
            return reference
        reference.copy_weights_from(self.engine)
        if self.is_rank0 and os.path.isdir(path + ".tmp"):
            shutil.rmtree(path + ".tmp")  # a killed write: never renamed, so never loaded
        if dist.is_initialized():
            dist.barrier()  # removed before any rank writes into it
        reference.save_checkpoint(path + ".tmp", weights_only=True)  # ends with a barrier: all shards written
        if self.is_rank0:
            os.replace(path + ".tmp", path)
        return reference

    def _resume(self) -> None:
        path = _broadcast(self.resume_path if self.is_rank0 else None)
        if path is None:
            return
        extra = self.engine.load_checkpoint(path)
        self.step, self.weight_version = int(extra["step"]), int(extra["weight_version"])
        if self.is_rank0 and "prompts" in extra:  # a converted, weights-only checkpoint has no data position
            self.prompts.load_state_dict(extra["prompts"])
            print(f"resumed from {path} (step {self.step})")
        if self.is_rank0 and "rollout_ahead" in extra:  # generated before the save, for the next step
            samples, metrics = extra["rollout_ahead"]
            self.ahead.restore(([Sample(**s) for s in samples], metrics))

    def _save_checkpoint(self) -> None:
        path = os.path.join(self.cfg.run.dir, "checkpoints", f"step_{self.step}")
        extra = {"step": self.step, "weight_version": self.weight_version}
        if self.is_rank0:
            self.ahead.wait()  # the rollout ahead drew prompts: saved with them, it is not generated again
            extra["prompts"] = self.prompts.state_dict()
            if (ahead := self.ahead.peek()) is not None:
                samples, metrics = ahead
                extra["rollout_ahead"] = ([dataclasses.asdict(s) for s in samples], metrics)
        if self.is_rank0 and os.path.isdir(path):
            shutil.rmtree(path)  # an earlier, killed write of this step: never complete, never loaded
        self.engine.save_checkpoint(path, _broadcast(extra))
        if dist.is_initialized():
            dist.barrier()  # every rank's shard is on disk before the marker says so
        fault_point("checkpoint", self.step)
        if self.is_rank0:
            mark_complete(self.cfg.run.dir, path)
            prune_checkpoints(self.cfg.run.dir, self.cfg.checkpoint.keep)

    def sync_weights(self) -> float:
        """Trainer weights -> rollout engine (HF names); returns seconds."""
        if self.is_rank0:
            self.ahead.wait()  # a rollout ahead finishes on the weights it started with
        start = time.perf_counter()
        # streamed: rank 0 (the rollout's owner) receives one bucket of whole tensors at a time and hands it on
        # before the next is gathered; the other ranks send their shards and hold no copy
        self.engine.export_hf(self.cfg.rollout.sglang.bucket_mb,
                              lambda buckets: self.rollout.update_weights(buckets, self.weight_version))  # fmt: skip
        return time.perf_counter() - start

    # ------------------------------------------------------------------------------------------------------
    def take_rollout(self) -> tuple[list[Sample], dict]:
        """Rank 0: this step's samples, generated ahead during the last step or now. With
        rollout.async_steps=1 the next step's rollout starts right away, on the weights the engine holds."""
        start = time.perf_counter()
        ready = self.ahead.take()
        samples, metrics = ready if ready is not None else self.rollout_step(self.step, self.weight_version)
        metrics["time_rollout_wait_s"] = time.perf_counter() - start
        if self.cfg.rollout.async_steps and self.step + 1 < self.cfg.train.steps:
            self.ahead.start(self.rollout_step, self.step + 1, self.weight_version)
        metrics["rollout_staleness"] = self.weight_version - samples[0].weight_version  # versions behind
        return samples, metrics

    def rollout_step(self, step_index: int, weight_version: int) -> tuple[list[Sample], dict]:
        """Rank 0: prompts -> samples with rewards, for the step after `step_index` completed ones, on the
        engine's weights `weight_version`. With algo.dynamic_sampling, groups whose rewards are all equal
        (zero advantage: no learning signal) are dropped and refilled from new prompts, for at most
        DYNAMIC_SAMPLING_ROUNDS rounds; if still short, dropped groups fill the batch (counted in metrics)."""
        r = self.cfg.rollout
        dynamic = self.cfg.algo.dynamic_sampling
        kept, dropped = [], []
        metrics = {"time_rollout_s": 0.0, "time_reward_s": 0.0}
        rounds = 0
        while len(kept) < r.prompts_per_step and rounds < (DYNAMIC_SAMPLING_ROUNDS if dynamic else 1):
            groups, round_metrics = self._generate_groups(step_index, weight_version, rounds)
            for key in ("time_rollout_s", "time_reward_s"):
                metrics[key] += round_metrics.pop(key)
            metrics.update(round_metrics)
            for group in groups:
                uniform = len({s.reward for s in group[1]}) == 1
                (dropped if dynamic and uniform else kept).append(group)
            rounds += 1
        filled = max(0, r.prompts_per_step - len(kept))
        groups = kept[: r.prompts_per_step] + dropped[:filled]
        if dynamic:
            metrics.update({"dynamic_sampling/rounds": rounds, "dynamic_sampling/dropped_groups": len(dropped),
                            "dynamic_sampling/filled_groups": filled})  # fmt: skip
        samples = []
        for index, (_, group_samples) in enumerate(groups):
            for s in group_samples:
                s.group = index  # renumbered in batch order: the advantage groups
                samples.append(s)
        return samples, metrics

    def _generate_groups(self, step_index: int, weight_version: int, round_index: int) -> tuple[list[tuple], dict]:
        r = self.cfg.rollout
        prompts = self.prompts.sample(r.prompts_per_step)
        params = SamplingParams(
            n=r.n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
            seed=self.cfg.train.seed * 1_000_003 + step_index * 101 + round_index,
        )  # fmt: skip
        start = time.perf_counter()
        fault_point("rollout", step_index + 1)
        samples = self.rollout.generate([p.ids for p in prompts], params)
        rollout_s = time.perf_counter() - start
        for s in samples:
            if s.weight_version != weight_version:
                raise RuntimeError(f"rollout used weights v{s.weight_version}, expected v{weight_version}")
        metrics = {"time_rollout_s": rollout_s, **self._score(prompts, samples)}
        groups = [(p, [s for s in samples if s.group == i]) for i, p in enumerate(prompts)]
        return groups, metrics

    def _score(self, prompts, samples: list[Sample]) -> dict:
        from megatron_sapo.rewards.pool import score_batch

        texts = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        owners = [prompts[s.group] for s in samples]
        result = score_batch([p.task for p in owners], texts, [p.sample for p in owners])
        for s, reward in zip(samples, result.rewards):
            s.reward = reward
        return {"time_reward_s": result.seconds, **result.metrics()}

    def _advantages(self, samples: list[Sample]) -> torch.Tensor:
        rewards = torch.tensor([s.reward for s in samples])
        groups = torch.tensor([s.group for s in samples])
        return compute_advantages(self.cfg.algo.advantage, rewards, groups, eps=self.cfg.algo.adv_eps)

    def train_step(self) -> dict:
        """One rollout step; returns its metrics (rank 0) or {} (other ranks)."""
        t_step = time.perf_counter()
        payload = None
        if self.is_rank0:
            samples, metrics = self.take_rollout()
            rewards = [s.reward for s in samples]
            if any(math.isnan(x) for x in rewards):
                payload = {"skip": "NaN reward", "metrics": metrics}
            else:
                batch = collate_samples(samples, self.tokenizer.pad_token_id)
                batch["advantages"] = self._advantages(samples)
                rollout_routing = self._rollout_routing(samples, batch["tokens"].shape[1])
                if rollout_routing is not None:
                    batch["rollout_routing"] = rollout_routing
                metrics.update(_sample_metrics(samples))
                payload = {"batch": batch, "metrics": metrics}
        payload = _broadcast(payload)
        if "skip" in payload:
            return self._skipped(payload["skip"], payload["metrics"])

        batch, metrics = payload["batch"], payload["metrics"]
        start = time.perf_counter()
        old_routing, rollout_routing = self._old_log_probs(batch)
        metrics["time_old_logprob_s"] = time.perf_counter() - start

        start = time.perf_counter()
        router = self._router_step(batch, old_routing, rollout_routing)  # None unless a diagnostic step
        per_minibatch = []
        for k, mb in enumerate(minibatches(batch, self.cfg.algo.minibatches)):
            per_minibatch.append(self._update(k, mb, router))
            fault_point("update", self.step + 1)  # after an optimizer step, before the step completes
        metrics["time_train_s"] = time.perf_counter() - start - (router.seconds if router is not None else 0.0)
        metrics.update(_merge_minibatch_metrics(per_minibatch))
        metrics.setdefault("kl_rollout_k3", math.nan)  # algo.old_logprobs=rollout: not measured
        if _router_diagnostics_due(self.cfg, self.step + 1):
            metrics.update(self._router_diagnostics(batch, old_routing, rollout_routing, router))

        if any(m.get("update_ok", 1.0) for m in per_minibatch):  # the weights moved: the rollout must follow
            self.weight_version += 1
            if self.is_rank0:  # the rollout ahead (if any) must finish before the engine's weights change
                metrics["time_rollout_wait_s"] += self.ahead.wait()
            metrics["time_sync_s"] = self.sync_weights()
            if self.is_rank0:  # SGLang's post-sync check: served vs trainer log-probs on a few sequences
                metrics.update(getattr(self.rollout, "last_check", {}))
        if not all(m.get("update_ok", 1.0) for m in per_minibatch) or not math.isfinite(metrics["loss"]):
            return self._skipped("NaN loss or gradient", metrics)
        self.skipped_in_a_row = 0
        self.step += 1
        total_tokens = float(batch["loss_mask"].sum())
        elapsed = time.perf_counter() - t_step
        metrics.update(step=self.step, weight_version=self.weight_version, tokens_per_s=total_tokens / elapsed)
        return metrics if self.is_rank0 else {}

    def _old_log_probs(self, batch: dict) -> tuple[dict | None, torch.Tensor | None]:
        """pi_old's (and the reference's) log-probs into the batch, and the routing every update of this step
        replays: r2 pi_old's own, r3 the rollout engine's (also in pi_old's pass). Returns pi_old's recorded
        routing (when replay or diagnostics need it) and the rollout engine's routing (when reported)."""
        mode = self.cfg.algo.routing_replay
        rollout_routing = batch.pop("rollout_routing", None)
        replay = rollout_routing if mode == "r3" else None
        old_batch = batch if replay is None else dict(batch, replay_routing=replay)
        old_routing = None
        if mode == "r2" or _router_diagnostics_due(self.cfg, self.step + 1):
            batch["old_log_probs"], old_routing = self.engine.compute_log_probs(old_batch, record_routing=True)
        elif self.cfg.algo.old_logprobs == "recompute":
            batch["old_log_probs"] = self.engine.compute_log_probs(old_batch)
        if self.cfg.algo.old_logprobs == "rollout":  # pi_old := pi_rollout (a diagnostic pass gave routing only)
            batch["old_log_probs"] = batch.pop("rollout_log_probs")  # no mismatch left to measure: null metrics
        if self.reference is not None:  # the reference model routes freely
            batch["ref_log_probs"] = self.reference.compute_log_probs(batch)
        if mode == "r2" and old_routing is not None:
            replay = old_routing["ids"]
        if replay is not None:
            batch["replay_routing"] = replay
        return old_routing, rollout_routing

    def _router_step(self, batch: dict, old_routing, rollout_routing):
        """At a router-diagnostic step of an MoE model, the per-mini-batch router diagnostics (built now, at
        pi_old's weights: under r3 it runs pi_old's free-routing pass); None otherwise."""
        from megatron_sapo.diagnostics.router import RouterStep

        if old_routing is None or not _router_diagnostics_due(self.cfg, self.step + 1):
            return None
        return RouterStep(self.engine, batch, old_routing, self.cfg.algo.routing_replay, rollout_routing)

    def _update(self, k: int, mb: dict, router) -> dict:
        """Mini-batch update k; with `router`, its decomposition just before and its training routing."""
        if router is None:
            return self.engine.train_minibatch(mb)
        router.before_update(k, mb)
        metrics, train_routing = self.engine.train_minibatch(mb, record_routing=True)
        router.after_update(k, mb, train_routing)
        return metrics

    def _router_diagnostics(self, batch: dict, old_routing, rollout_routing, router=None) -> dict:
        """The router-induced ratio-variance decomposition (diagnostics/router.py) on this step's batch, plus
        the per-mini-batch metrics `router` (RouterStep) gathered along the updates."""
        from megatron_sapo.diagnostics.router import run_router_diagnostics

        start = time.perf_counter()
        mode = self.cfg.algo.routing_replay
        rollout_ids = rollout_routing if mode != "r3" else None  # compared with pi_old's free routing
        out = run_router_diagnostics(self.engine, batch, old_routing, mode != "none", rollout_ids)
        seconds = time.perf_counter() - start
        if router is not None:
            out.update(router.metrics())
            seconds += router.seconds
        out["router/time_s"] = seconds
        return out

    def _rollout_routing(self, samples: list[Sample], width: int) -> torch.Tensor | None:
        from megatron_sapo.megatron.routing import collate_rollout_routing

        m = self.cfg.model
        ids = collate_rollout_routing(samples, width, m.num_layers, m.moe_topk) if m.is_moe else None
        if ids is None and self.cfg.algo.routing_replay == "r3":
            raise RuntimeError("algo.routing_replay=r3: the rollout engine did not report routed experts")
        return ids

    def _skipped(self, why: str, metrics: dict) -> dict:
        self.skipped_in_a_row += 1
        self.step += 1
        if self.is_rank0:
            print(f"step {self.step}: skipped ({why}); {self.skipped_in_a_row} in a row")
        if self.skipped_in_a_row >= self.cfg.train.max_skipped_steps:
            raise TrainingStopped(
                f"{self.skipped_in_a_row} consecutive steps skipped ({why}); stopping "
                f"(train.max_skipped_steps={self.cfg.train.max_skipped_steps})"
            )
        gate_key = "gate_mean" if self.cfg.algo.loss == "sapo" else "clip_frac"
        unset = dict.fromkeys((*ROW_KEYS, gate_key), math.nan)
        return {**unset, **metrics, "step": self.step, "skipped": 1.0, "weight_version": self.weight_version}

    def fit(self) -> list[dict]:
        """Train to train.steps. On SIGTERM / SIGUSR1 (checkpoint.save_on_signal) it stops at the next step
        boundary after a complete checkpoint of that step, with `stopped_by` set (train() raises Preempted)."""
        history = []
        self.sync_weights()  # the rollout engine starts from the trainer's (initial or resumed) weights
        every, steps = self.cfg.checkpoint.every, self.cfg.train.steps
        show = self.is_rank0 and self.cfg.logging.progress
        self.stopped_by = 0
        signals = StopSignals(self.cfg.checkpoint.save_on_signal)
        with signals, progress_bar(steps, "train", show, unit="step", initial=self.step) as bar:
            while self.step < steps:
                metrics = self.train_step()
                if self.is_rank0:
                    self.writer.write(metrics)
                    history.append(metrics)
                    bar.update(1)
                    if self.step % self.cfg.logging.console_every == 0:
                        bar.write(console_line(metrics))
                saved = bool(every and self.step % every == 0) or self.step == steps
                if saved:  # a signal during the write is only recorded: the write completes
                    self._save_checkpoint()
                if signals.enabled and self.step < steps and (stop := signals.agreed()):  # all ranks agree
                    if not saved:
                        self._save_checkpoint()
                    if dist.is_initialized():
                        dist.barrier()  # rank 0's COMPLETE marker is written before any rank exits
                    self.stopped_by = stop
                    break
        if self.is_rank0:
            self.writer.close()
            if self.stopped_by:
                print(f"{Preempted(self.stopped_by, self.step)}: exiting with code {Preempted.exit_code}; "
                      "rerun the same command to resume", flush=True)  # fmt: skip
            else:
                self._plot()
        return history

    def _plot(self) -> None:
        if not self.cfg.logging.plots:
            return
        try:
            from megatron_sapo.diagnostics.plots import plot_run
        except ImportError:
            return
        try:
            plot_run(self.cfg.run.dir)
        except ImportError:
            print("matplotlib is not installed: no plots (pip install matplotlib, or tools/plot_metrics.py later)")


def _router_diagnostics_due(cfg: Config, step: int) -> bool:
    every = cfg.diagnostics.router_every
    return bool(every) and cfg.model.is_moe and step % every == 0


def _sample_metrics(samples: list[Sample]) -> dict:
    rewards = torch.tensor([s.reward for s in samples])
    lengths = torch.tensor([float(len(s.response_ids)) for s in samples])
    return {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if len(samples) > 1 else 0.0,
        "response_len_mean": float(lengths.mean()),
        "response_len_max": float(lengths.max()),
        "stop_frac": sum(s.finish_reason == "stop" for s in samples) / len(samples),
    }


def _merge_minibatch_metrics(per_minibatch: list[dict]) -> dict:
    """Step metrics are the mean over mini-batches; ratio and gate also per mini-batch index (the off-policy
    depth: index 0 is on-policy)."""
    out = {}
    for key in per_minibatch[0]:
        values = [m[key] for m in per_minibatch if key in m]
        reduce = max if key.endswith("_max") else min if key.endswith("_min") else lambda v: sum(v) / len(v)
        out[key] = reduce(values)
    for k, m in enumerate(per_minibatch):
        for key in ("ratio_std", "gate_mean", "clip_frac"):
            if key in m:
                out[f"minibatch{k}/{key}"] = m[key]
    return out


def train(cfg: Config) -> list[dict]:
    """Build and fit a Trainer; raises Preempted (after a clean shutdown) when a signal stopped it early."""
    trainer = Trainer(cfg)
    try:
        history = trainer.fit()
    finally:
        trainer.engine.shutdown()
        if trainer.is_rank0:
            trainer.ahead.close()  # before the engine it may still be generating on
            trainer.rollout.shutdown()
    if trainer.stopped_by:
        raise Preempted(trainer.stopped_by, trainer.step)
    return history
