"""The SGLang rollout engine: launch (or attach to) SGLang servers, sample groups, sync weights, recover.

    engine = SGLangEngine(cfg.rollout, cfg.model, work_dir="runs/x/sglang", tokenizer_path=tok_dir, eos_token_id=2)
    engine.update_weights(hf_state, version=0)          # a dict or streamed buckets; + a log-prob check
    samples = engine.generate(prompts, SamplingParams(n=8, max_new_tokens=16))
    engine.shutdown()                                   # stops exactly the servers it started

One /generate request per prompt carries all n samples (SGLang shares the prompt's KV cache across them);
requests run concurrently (rollout.sglang.max_concurrency threads), spread over the servers (or sent to an
sglang-router in front of them: rollout.sglang.router; weight syncs and checks still go to each server). A request that
fails (server unreachable, 5xx, timeout) is retried with backoff; a group that still fails is retried after
recovery: launched servers that died are restarted and given the current weights again. Results are keyed by
prompt index, so a retry can neither duplicate nor lose samples. Every response's weight_version must equal
the engine's.
"""

from __future__ import annotations

import base64
import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch

from megatron_sapo.config import ModelConfig, RolloutConfig
from megatron_sapo.diagnostics.progress import progress_bar
from megatron_sapo.rollout.base import HFWeights, Sample, SamplingParams, weight_buckets
from megatron_sapo.rollout.sglang_client import (
    RETRYABLE,
    SGLangAborted,
    SGLangClient,
    SGLangError,
    SGLangRequestError,
    SGLangServerError,
    SGLangUnreachable,
)
from megatron_sapo.rollout.sglang_server import RouterProcess, ServerProcess, SGLangStartupError, free_ports
from megatron_sapo.rollout.sglang_sync import DiskSync, build_sync

CPU_MAX_TOTAL_TOKENS = 32768  # KV-cache tokens on CPU; SGLang's own default there allocates ~14 GB


class LogProbMismatch(SGLangError):
    """After a weight sync, served log-probs differ from the trainer's beyond rollout.sglang.verify_tol."""


def decode_routed_experts(data: str, num_layers: int, topk: int) -> torch.Tensor:
    """meta_info.routed_experts (base64 of int32 [tokens, layers, topk]) -> int32 tensor of that shape."""
    raw = bytearray(base64.b64decode(data))
    flat = torch.frombuffer(raw, dtype=torch.int32) if raw else torch.zeros(0, dtype=torch.int32)
    if flat.numel() % (num_layers * topk):
        raise SGLangError(
            f"routed_experts has {flat.numel()} values, not a multiple of layers*topk={num_layers * topk}"
        )
    return flat.view(-1, num_layers, topk).clone()


def _version(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1  # SGLang's "default": weights no trainer sync has produced


class SGLangEngine:
    def __init__(
        self,
        rollout_cfg: RolloutConfig,
        model_cfg: ModelConfig,
        *,
        work_dir: str,
        tokenizer_path: str | None = None,
        eos_token_id: int | None = None,
        model_path: str | None = None,
        seed: int = 0,
        reference_fn=None,
        progress: bool = True,
    ):
        """reference_fn(tokens: list[list[int]]) -> list[list[float]]: the trainer's log-probs of tokens[1:] of
        each sequence (at temperature 1); used by the post-sync check. Default: the HF model on the synced
        weights, in this process (fine for small models; pass the Megatron engine's for large ones).
        progress: draw a rollout progress bar (logging.progress; shown only when stderr is a terminal)."""
        self.cfg, self.model_cfg = rollout_cfg.sglang, model_cfg
        self.transport = rollout_cfg.weight_sync
        self.work_dir = os.path.abspath(work_dir)
        self.tokenizer_path, self.eos_token_id, self.seed = tokenizer_path, eos_token_id, seed
        self.reference_fn, self.progress = reference_fn, progress
        self.client = SGLangClient(self.cfg.request_timeout_s, self.cfg.retries, self.cfg.retry_backoff_s)
        self.control = SGLangClient(timeout_s=60.0, retries=1, backoff_s=0.5)  # never aborted
        self.servers: list[ServerProcess] = []
        self.router: RouterProcess | None = None
        self.device = self.cfg.device if self.cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.routed_experts = self.cfg.return_routed_experts and model_cfg.is_moe
        self.context_len = model_cfg.max_seq_len
        self.seeded = "--enable-deterministic-inference" in self.cfg.extra_args
        # the trainer's dtype: fp32 on CPU (and when asked), else bf16; SGLang would serve an fp32 checkpoint in fp16
        self.dtype = (
            "bfloat16"
            if model_cfg.dtype == "bf16" or (model_cfg.dtype == "auto" and self.device == "cuda")
            else "float32"
        )
        self.last_check: dict[str, float] = {}
        self.last_sync_s = 0.0
        self.restarts = 0
        self._last_state: dict[str, torch.Tensor] | None = None
        self._ref_model = None
        self._rr = 0
        self._lock = threading.Lock()
        os.makedirs(self.work_dir, exist_ok=True)
        sync_client = SGLangClient(self.cfg.request_timeout_s, self.cfg.retries, self.cfg.retry_backoff_s)
        self.sync = build_sync(self.transport, sync_client, model_cfg, self.work_dir, self.cfg.tp, self.cfg.bucket_mb,
                               eos_token_id, timeout_s=self.cfg.request_timeout_s)  # fmt: skip
        if self.cfg.urls:
            self.urls = [u.rstrip("/") for u in self.cfg.urls]
            self._attach()
        else:
            self._launch(model_path)
        self.gen_urls = self.urls  # where /generate goes: the servers, or the router in front of them
        if self.cfg.router:
            self._launch_router()
        self._pool = ThreadPoolExecutor(max(1, self.cfg.max_concurrency), thread_name_prefix="sglang-rollout")

    # ------------------------------------------------------------------------------------------------------
    # servers
    # ------------------------------------------------------------------------------------------------------
    def _attach(self) -> None:
        versions = []
        for i, url in enumerate(self.urls):
            try:
                info = self.control.get(url, "/get_model_info", retries=2)
            except SGLangError as e:
                raise SGLangUnreachable(f"rollout.sglang.urls[{i}]={url} is unreachable: {e}") from None
            versions.append(_version(info.get("weight_version") if isinstance(info, dict) else None))
        self.weight_version = versions[0] if len(set(versions)) == 1 else -1

    def _bootstrap_model(self) -> str:
        """An HF checkpoint for the server to start from (random weights: the trainer syncs before rolling out)."""
        from megatron_sapo.rollout.local import build_hf_model
        from megatron_sapo.rollout.weights import save_hf_checkpoint

        path = os.path.join(self.work_dir, "bootstrap_model")
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            state = build_hf_model(self.model_cfg, self.eos_token_id).state_dict()
            save_hf_checkpoint(state, self.model_cfg, path, self.eos_token_id)
        return path

    def _launch(self, model_path: str | None) -> None:
        model_path = self._launch_model = model_path or self._bootstrap_model()
        ports = free_ports(self.cfg.base_port, self.cfg.num_servers, self.cfg.host)
        max_tokens = self.cfg.max_total_tokens or (CPU_MAX_TOTAL_TOKENS if self.device == "cpu" else None)
        for i, port in enumerate(ports):
            self.servers.append(ServerProcess(
                self.cfg.python, model_path, port, os.path.join(self.work_dir, f"server{i}.log"),
                host=self.cfg.host, device=self.device, tp=self.cfg.tp,
                base_gpu_id=self.cfg.base_gpu_id + i * self.cfg.tp,
                max_total_tokens=max_tokens, weight_version="-1", routed_experts=self.routed_experts,
                random_seed=self.seed + i, extra_args=["--dtype", self.dtype, *self.cfg.extra_args],
                tokenizer_path=self.tokenizer_path, cpu_threads=self.cfg.cpu_threads,
            ))  # fmt: skip
        try:
            for server in self.servers:
                server.start()
            for server in self.servers:
                server.wait_healthy(self.cfg.startup_timeout_s)
        except BaseException as e:
            self.shutdown()
            if isinstance(e, SGLangStartupError) and "No module named 'sglang'" in str(e):
                raise SGLangStartupError(f"{e}\nrollout.sglang.python={self.cfg.python!r} has no sglang; on CPU "
                                         "build the kit (bash tools/sglang_cpu_kit/setup.sh) and set "
                                         "rollout.sglang.python=.venv-sglang/bin/python") from None  # fmt: skip
            raise
        self.urls = [s.url for s in self.servers]
        self.weight_version = -1

    def _launch_router(self) -> None:
        """sglang-router in front of self.urls; weight syncs, checks and aborts still go to every server."""
        port, metrics_port = free_ports(self.cfg.base_port + 10 * len(self.urls), 2, self.cfg.host)
        log = os.path.join(self.work_dir, "router.log")
        self.router = RouterProcess(self.cfg.python, self.urls, port, log, host=self.cfg.host,
                                    metrics_port=metrics_port, extra_args=self.cfg.router_args)  # fmt: skip
        try:
            self.router.start()
            self.router.wait_healthy(self.cfg.startup_timeout_s)
        except BaseException as e:
            self.shutdown()
            if isinstance(e, SGLangStartupError) and "No module named 'sglang_router'" in str(e):
                hint = f"rollout.sglang.router=true needs the sglang-router package in {self.cfg.python}"
                raise SGLangStartupError(f"{e}\n{hint} (pip install sglang-router; the CPU kit has it)") from None
            raise
        self.gen_urls = [self.router.url]
        if self.routed_experts:  # sglang-router 0.3.2 re-serializes /generate bodies without return_routed_experts
            probe = {"input_ids": [1], "sampling_params": {"max_new_tokens": 1}, "return_routed_experts": True}
            meta = self.control.post(self.router.url, "/generate", probe)["meta_info"]
            if not meta.get("routed_experts"):
                self.shutdown()
                raise SGLangError(
                    "this sglang-router drops return_routed_experts from /generate (sglang-router 0.3.2 does), so "
                    "MoE rollouts through it have no routed experts; set rollout.sglang.return_routed_experts=false "
                    "or rollout.sglang.router=false"
                )

    def _recover(self) -> None:
        """Restart launched servers that stopped answering and give them the current weights; an attached server
        that is down is an error (we cannot restart what we did not start)."""
        for i, url in enumerate(self.urls):
            if self.control.healthy(url, timeout=10):
                continue
            server = self.servers[i] if self.servers else None
            if server is None:
                raise SGLangUnreachable(f"attached SGLang server {url} (rollout.sglang.urls[{i}]) is down; it was not "
                                        "launched by this engine, so it cannot be restarted here")  # fmt: skip
            if self.restarts >= self.cfg.max_restarts:
                raise SGLangError(f"SGLang server {url} is down again after {self.restarts} restarts "
                                  f"(rollout.sglang.max_restarts); see {server.log_path}")  # fmt: skip
            self.restarts += 1
            disk = isinstance(self.sync, DiskSync) and self.sync.latest is not None and self.weight_version >= 0
            print(f"[sglang] server {url} (pid {server.pid}) is down; restarting ({self.restarts})", flush=True)
            server.restart(  # disk: from the newest synced folder; else from the launch checkpoint (never pruned)
                self.cfg.startup_timeout_s,
                model_path=os.path.abspath(self.sync.latest) if disk else self._launch_model,
                weight_version=str(self.weight_version) if disk else "-1",
            )
            if not disk and self._last_state is not None:
                if hasattr(self.sync, "group"):
                    self.sync.close()  # the weight-update group lost a member: rebuild it with every server
                    self.sync.push(self.urls, self._last_state, self.weight_version)
                else:
                    self.sync.push([url], self._last_state, self.weight_version)
        if self.router is not None and not self.control.healthy(self.router.url, timeout=10):
            print(f"[sglang] router {self.router.url} (pid {self.router.pid}) is down; restarting", flush=True)
            self.router.restart(self.cfg.startup_timeout_s)

    def set_transport(self, kind: str) -> None:
        """Switch the weight-sync transport (disk | tensor | distributed) between syncs."""
        self.sync.close()
        self.sync = build_sync(kind, self.sync.client, self.model_cfg, self.work_dir, self.cfg.tp, self.cfg.bucket_mb,
                               self.eos_token_id, timeout_s=self.cfg.request_timeout_s)  # fmt: skip
        self.transport = kind

    def health(self) -> bool:
        return all(self.control.healthy(u) for u in self.urls + ([self.router.url] if self.router else []))

    @property
    def pids(self) -> list[int | None]:
        return [s.pid for s in self.servers]

    # ------------------------------------------------------------------------------------------------------
    # generation
    # ------------------------------------------------------------------------------------------------------
    def _validate(self, prompts: list[list[int]], params: SamplingParams) -> None:
        if params.n < 1 or params.max_new_tokens < 1:
            raise ValueError(f"SamplingParams needs n >= 1 and max_new_tokens >= 1, got {params}")
        vocab = self.model_cfg.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= int(t) < vocab]
            if bad:  # an out-of-range id crashes the SGLang server (embedding IndexError), so refuse it here
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            if len(p) + params.max_new_tokens > self.context_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} that is "
                    f"{len(p) + params.max_new_tokens} > the model's context length {self.context_len} "
                    "(model.max_seq_len)"
                )

    def _body(self, prompt: list[int], params: SamplingParams, group: int, extra: dict | None) -> dict:
        sampling = {
            "n": params.n,
            "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            **(extra or {}),
        }
        if self.seeded:  # SGLang honours sampling_seed only in deterministic-inference mode
            sampling["sampling_seed"] = (params.seed * 1_000_003 + group) % 2**31
        body = {"input_ids": list(map(int, prompt)), "sampling_params": sampling, "return_logprob": True,
                "logprob_start_len": -1}  # fmt: skip
        if self.routed_experts:
            body["return_routed_experts"] = True
        return body

    def _parse(self, out: dict, prompt: list[int], group: int, url: str) -> Sample:
        meta = out["meta_info"]
        reason = meta.get("finish_reason") or {}
        kind = reason.get("type") if isinstance(reason, dict) else str(reason)
        if kind == "abort":
            if self.client.aborted:
                raise SGLangAborted(f"request for prompt {group} was aborted")
            raise SGLangServerError(f"SGLang server {url} aborted the request for prompt {group}: {reason}")
        version = _version(meta.get("weight_version"))
        if version != self.weight_version:
            raise SGLangError(f"SGLang server {url} answered with weights v{meta.get('weight_version')}, the engine "
                              f"expects v{self.weight_version} (was the server updated by someone else?)")  # fmt: skip
        ids = [int(t) for t in out["output_ids"]]
        entries = meta.get("output_token_logprobs") or []
        if [int(e[1]) for e in entries] != ids:
            raise SGLangError(f"SGLang server {url}: output_token_logprobs do not match output_ids for prompt {group}")
        sample = Sample(
            prompt_ids=list(prompt),
            response_ids=ids,
            rollout_log_probs=[float(e[0]) for e in entries],
            finish_reason="stop" if kind == "stop" else "length",
            group=group,
            weight_version=version,
            info={"server": url, "cached_tokens": meta.get("cached_tokens", 0)},
        )
        if self.routed_experts and meta.get("routed_experts"):
            sample.routed_experts = decode_routed_experts(
                meta["routed_experts"], self.model_cfg.num_layers, self.model_cfg.moe_topk
            )
        return sample

    def _next_url(self) -> str:
        with self._lock:
            self._rr += 1
            return self.gen_urls[self._rr % len(self.gen_urls)]

    def _group(self, prompt: list[int], params: SamplingParams, group: int, extra: dict | None) -> list[Sample]:
        url = self._next_url()
        out = self.client.post(url, "/generate", self._body(prompt, params, group, extra))
        outs = out if isinstance(out, list) else [out]
        if len(outs) != params.n:
            raise SGLangServerError(f"SGLang server {url} returned {len(outs)} samples for prompt {group}, "
                                    f"asked for n={params.n}")  # fmt: skip
        return [self._parse(o, prompt, group, url) for o in outs]

    def generate(self, prompts: list[list[int]], params: SamplingParams, extra_sampling_params: dict | None = None,
                 ) -> list[Sample]:  # fmt: skip
        """n samples per prompt, ordered by prompt then sample; Sample.group is the prompt index.
        extra_sampling_params: more SGLang sampling_params keys (e.g. top_k, stop_token_ids, ignore_eos);
        an unknown key is a SGLangRequestError naming it."""
        self._validate(prompts, params)
        self.client.reset_abort()
        results: dict[int, list[Sample]] = {}
        with progress_bar(len(prompts), "rollout", enabled=self.progress, unit="group") as bar:
            self._generate_rounds(prompts, params, extra_sampling_params, results, bar)
        return [s for g in range(len(prompts)) for s in results[g]]

    def _generate_rounds(self, prompts, params, extra, results: dict[int, list[Sample]], bar) -> None:
        """Every prompt's group into results[g]; groups that fail retryably are sent again after recovery."""
        pending = list(range(len(prompts)))
        for round_ in range(self.cfg.max_restarts + 1):
            failed: dict[int, BaseException] = {}
            futures = {self._pool.submit(self._group, prompts[g], params, g, extra): g for g in pending}
            for future in as_completed(futures):
                g = futures[future]
                try:
                    results[g] = future.result()
                    bar.update(1)  # one finished sample group
                except RETRYABLE as e:
                    failed[g] = e
                except BaseException:
                    self.abort_requests(local_only=True)  # stop the rest of this call's requests
                    for f in futures:
                        f.cancel()
                    raise
            if not failed:
                return
            if round_ == self.cfg.max_restarts:
                first = next(iter(failed.values()))
                raise SGLangError(f"{len(failed)} of {len(prompts)} prompts failed after {round_ + 1} rounds: {first}")
            print(f"[sglang] {len(failed)} prompt groups failed ({next(iter(failed.values()))}); recovering",
                  flush=True)  # fmt: skip
            self._recover()
            pending = sorted(failed)

    def abort_requests(self, local_only: bool = False) -> None:
        """Abort the generate() call in flight (from another thread): its requests stop at their next check and
        the servers abort what they are running; generate() raises SGLangAborted."""
        self.client.abort()
        if local_only:
            return
        for url in self.urls:
            with contextlib.suppress(SGLangError):
                self.control.post(url, "/abort_request", {"abort_all": True}, retries=0)

    # ------------------------------------------------------------------------------------------------------
    # weights
    # ------------------------------------------------------------------------------------------------------
    def update_weights(self, weights: HFWeights, version: int) -> None:
        """Push the weights (a dict or the trainer's streamed buckets) to every server, then check log-probs.
        Under the tensor / distributed transports a host copy is kept, for a restarted server (the disk transport's
        folder is its copy)."""
        start = time.perf_counter()
        if self.servers and not all(s.alive() for s in self.servers):
            self._recover()
        disk = isinstance(self.sync, DiskSync)
        kept: dict[str, torch.Tensor] | None = None if disk else {}

        def keep(buckets):
            for bucket in buckets:
                if kept is not None:
                    kept.update((name, t.detach().cpu()) for name, t in bucket.items())
                yield bucket

        self.sync.push(self.urls, keep(weight_buckets(weights, self.cfg.bucket_mb)), version)
        self.weight_version = version
        self._last_state = kept
        self.last_sync_s = time.perf_counter() - start
        if self.cfg.verify_sequences > 0:
            self.last_check = self.check_log_probs()
            worst = self.last_check["sync/logprob_abs_diff_max"]
            if worst > self.cfg.verify_tol:
                raise LogProbMismatch(
                    f"after weight sync v{version} ({self.transport}), served log-probs differ from the trainer's "
                    f"by up to {worst:.3g} > rollout.sglang.verify_tol={self.cfg.verify_tol}"
                )

    def verify_prompts(self, count: int, length: int = 8) -> list[list[int]]:
        gen = torch.Generator().manual_seed(1234)
        low = min(4, self.model_cfg.vocab_size - 1)  # skip the tiny tokenizer's pad/bos/eos/unk
        return [torch.randint(low, self.model_cfg.vocab_size, (length,), generator=gen).tolist() for _ in range(count)]

    def reference_log_probs(self, tokens: list[list[int]], hf_state: dict[str, torch.Tensor] | None = None):
        """log p(tokens[t+1] | tokens[:t+1]) at temperature 1 from the HF model on hf_state (or the last synced)."""
        if self.reference_fn is not None:
            return self.reference_fn(tokens)
        from megatron_sapo.rollout.local import build_hf_model
        from megatron_sapo.rollout.weights import load_hf_state

        state = hf_state if hf_state is not None else self._last_state
        if state is None and isinstance(self.sync, DiskSync) and self.sync.latest is not None:
            state = load_hf_state(self.sync.latest)  # the disk transport keeps no host copy: read its folder
        if state is None:
            raise SGLangError("no trainer weights to compare with: call update_weights first")
        if self._ref_model is None:
            self._ref_model = build_hf_model(self.model_cfg, self.eos_token_id)
        self._ref_model.load_state_dict(state, strict=not self.model_cfg.tie_embeddings)
        out = []
        with torch.no_grad():
            for seq in tokens:
                ids = torch.tensor([seq])
                logp = torch.log_softmax(self._ref_model(ids).logits.float(), -1)[0, :-1]
                out.append(logp.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist())
        return out

    def check_log_probs(self, hf_state: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Greedy continuations of a few fixed prompts on every server vs the trainer's log-probs of the same
        tokens; returns the mismatch metrics (sync/...)."""
        prompts = self.verify_prompts(self.cfg.verify_sequences)
        new = max(1, min(8, self.context_len - len(prompts[0])))
        params = SamplingParams(n=1, max_new_tokens=new, temperature=0.0)
        served, seqs = [], []
        for url in self.urls:
            for g, p in enumerate(prompts):
                out = self.control.post(url, "/generate", {**self._body(p, params, g, {"ignore_eos": True}),
                                                           "return_routed_experts": False})  # fmt: skip
                s = self._parse(out, p, g, url)
                served.append(s.rollout_log_probs)
                seqs.append(p + s.response_ids)
        ref = self.reference_log_probs(seqs, hf_state)
        starts = [len(p) - 1 for p in prompts] * len(self.urls)  # reference index of the first response token
        diffs = [abs(a - b) for s, r, k in zip(served, ref, starts) for a, b in zip(s, r[k:])]
        return {
            "sync/logprob_abs_diff_max": max(diffs),
            "sync/logprob_abs_diff_mean": sum(diffs) / len(diffs),
            "sync/tokens_checked": float(len(diffs)),
            "time_sync_transport_s": self.last_sync_s,
        }

    # ------------------------------------------------------------------------------------------------------
    # control
    # ------------------------------------------------------------------------------------------------------
    def pause(self) -> None:
        for url in self.urls:
            self.control.post(url, "/pause_generation", {})

    def resume(self) -> None:
        for url in self.urls:
            self.control.post(url, "/continue_generation", {})

    def release_memory(self) -> None:
        """Colocated GPU mode: free the servers' weights and KV cache while the trainer runs (a no-op on CPU)."""
        if self.device == "cuda":
            for url in self.urls:
                self.control.post(url, "/release_memory_occupation", {})

    def resume_memory(self) -> None:
        if self.device == "cuda":
            for url in self.urls:
                self.control.post(url, "/resume_memory_occupation", {})

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):  # servers may already be gone
            self.sync.close()
        if self.router is not None:
            self.router.stop()
        for server in self.servers:
            server.stop()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["SGLangEngine", "SGLangError", "SGLangRequestError", "SGLangUnreachable", "LogProbMismatch",
           "decode_routed_experts"]  # fmt: skip
