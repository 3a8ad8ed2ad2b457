"""Weight sync from the trainer to SGLang servers: the `disk`, `tensor` and `distributed` transports.

Input is HF-named weights (rollout/weights.megatron_to_hf of the trainer's weights): one dict, or the buckets the
trainer streams (rollout/base.HFWeights; each is consumed once, so the trainer never holds the whole model), and
an integer version, which every server records as its weight_version (checked on every /generate response).

    disk         one safetensors file per bucket (+ index) to <work_dir>/weights/v<version>, then
                 /update_weights_from_disk
    tensor       colocated only: /begin_weight_update, /update_weights_from_tensor (tensors shared through
                 shared memory, or CUDA IPC on GPU), /end_weight_update
    distributed  a process group between the trainer (rank 0) and every server's TP ranks (gloo on CPU,
                 NCCL on GPU): /init_weights_update_group once, then per sync /begin_weight_update,
                 /update_weights_from_distributed (names, dtypes, shapes) while the trainer broadcasts each
                 tensor, /end_weight_update

Tensors are sent in buckets of about `bucket_mb` MB, each to every server before the next is read; the version is
set with the last bucket.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch

from megatron_sapo.config import ModelConfig
from megatron_sapo.rollout.base import HFWeights, weight_buckets, with_last
from megatron_sapo.rollout.sglang_client import SGLangClient, SGLangError
from megatron_sapo.rollout.weights import save_hf_buckets


class WeightSyncError(SGLangError):
    """A server refused or failed a weight update; the message names it and the transport."""


def _check(result, url: str, what: str) -> None:
    ok = result.get("success", True) if isinstance(result, dict) else True
    if not ok:
        raise WeightSyncError(f"SGLang server {url} failed {what}: {result.get('message', result)}")


def _each_server(urls: list[str], fn) -> list:
    """fn(url) on every server at once; the first error is raised after all finished."""
    if len(urls) == 1:
        return [fn(urls[0])]
    with ThreadPoolExecutor(len(urls)) as pool:
        futures = [pool.submit(fn, url) for url in urls]
        return [f.result() for f in futures]


# ----------------------------------------------------------------------------------------------------------
class DiskSync:
    name = "disk"

    def __init__(self, client: SGLangClient, model_cfg: ModelConfig, work_dir: str, eos_token_id=None, keep: int = 1,
                 bucket_mb: float = 512):  # fmt: skip
        self.client, self.model_cfg, self.eos_token_id = client, model_cfg, eos_token_id
        self.root, self.keep, self.bucket_mb = os.path.join(work_dir, "weights"), keep, bucket_mb
        self.latest: str | None = None

    def write(self, weights: HFWeights, version: int) -> str:
        path = os.path.join(self.root, f"v{version}")
        save_hf_buckets(weight_buckets(weights, self.bucket_mb), self.model_cfg, path, self.eos_token_id)
        self.latest = path
        return path

    def push(self, urls: list[str], weights: HFWeights, version: int) -> None:
        path = self.write(weights, version)

        def one(url):
            body = {"model_path": os.path.abspath(path), "weight_version": str(version), "flush_cache": True}
            _check(self.client.post(url, "/update_weights_from_disk", body), url, f"/update_weights_from_disk {path}")

        _each_server(urls, one)
        self._prune(keep_path=path)

    def _prune(self, keep_path: str) -> None:
        folders = sorted(
            (os.path.join(self.root, d) for d in os.listdir(self.root) if d.startswith("v")),
            key=os.path.getmtime,
        )
        for old in folders[: max(len(folders) - self.keep, 0)]:
            if os.path.abspath(old) != os.path.abspath(keep_path):
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------
def serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """What SGLang's MultiprocessingSerializer.serialize(named, output_str=True) produces: a ForkingPickler dump
    (tensors travel as shared-memory handles, not bytes), base64-encoded. sglang's own serializer (and its
    CUDA-IPC reduction patch) is used when sglang is importable here (GPU images)."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except ImportError:
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing  # noqa: F401  registers the tensor reductions with ForkingPickler

        buf = io.BytesIO()
        ForkingPickler(buf).dump(named)
        return base64.b64encode(buf.getvalue()).decode("ascii")
    monkey_patch_torch_reductions()
    return MultiprocessingSerializer.serialize(named, output_str=True)


class TensorSync:
    """Colocated servers only (the tensors are shared through this machine's memory)."""

    name = "tensor"

    def __init__(self, client: SGLangClient, tp: int, bucket_mb: float = 512):
        self.client, self.tp, self.bucket_mb = client, tp, bucket_mb
        # on GPU the buckets go to the GPU and travel as CUDA IPC handles; CPU tensors: the default
        # 'file_descriptor' strategy hands them over a socket that needs this process's authkey, which the
        # server does not have; 'file_system' shares them by /dev/shm name instead
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.multiprocessing.set_sharing_strategy("file_system")

    def push(self, urls: list[str], weights: HFWeights, version: int) -> None:
        _each_server(urls, lambda url: _check(self.client.post(url, "/begin_weight_update", {}), url, "begin"))
        try:
            for i, (bucket, last) in enumerate(with_last(weight_buckets(weights, self.bucket_mb))):
                # fresh copies, alive until every server has read them: a storage shared once keeps its shared-memory
                # name, which is unlinked when its readers close it; sharing it again sent a dead name (seen
                # when the same state dict was pushed to servers that had since stopped)
                shared = [(n, t.detach().to(self.device).clone(memory_format=torch.contiguous_format))
                          for n, t in bucket.items()]  # fmt: skip
                payload = serialize_named_tensors(shared)
                body = {"serialized_named_tensors": [payload] * self.tp, "flush_cache": last}
                if last:
                    body["weight_version"] = str(version)

                def one(url, body=body, i=i):
                    _check(self.client.post(url, "/update_weights_from_tensor", body, retries=0), url,
                           f"/update_weights_from_tensor (bucket {i + 1})")  # fmt: skip

                _each_server(urls, one)
        finally:
            _each_server(urls, lambda url: _check(self.client.post(url, "/end_weight_update", {}), url, "end"))

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------
def _init_group(backend: str, address: str, port: int, world_size: int, rank: int, group_name: str, timeout_s: float):
    """The trainer's end of the group SGLang's init_custom_process_group builds on the server side: a TCP
    rendezvous, a PrefixStore named after the group, then torch's process-group helper (private API, the
    same call the server makes, so both ends agree on store keys)."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{address}:{port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, backend_options=None, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class DistributedSync:
    name = "distributed"

    def __init__(self, client: SGLangClient, tp: int, bucket_mb: float = 512, master_address: str = "127.0.0.1",
                 master_port: int = 0, timeout_s: float = 300.0):  # fmt: skip
        self.client, self.tp, self.bucket_mb = client, tp, bucket_mb
        self.address, self.port, self.timeout_s = master_address, master_port, timeout_s
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.group = None
        self.group_urls: list[str] = []
        self.group_name = ""
        self._generation = 0

    def _connect(self, urls: list[str]) -> None:
        from megatron_sapo.rollout.sglang_server import free_ports

        self.close()
        self._generation += 1
        self.group_name = f"megatron_sapo_sync_{os.getpid()}_{self._generation}"
        port = self.port or free_ports(29700 + (os.getpid() % 500) * 10, 1)[0]
        world = 1 + self.tp * len(urls)
        errors: list[BaseException] = []

        def init(i, url):
            body = {"master_address": self.address, "master_port": port, "rank_offset": 1 + i * self.tp,
                    "world_size": world, "group_name": self.group_name, "backend": self.backend}  # fmt: skip
            try:  # blocks until every member (the trainer too) has joined
                _check(self.client.post(url, "/init_weights_update_group", body, timeout=self.timeout_s, retries=0),
                       url, "/init_weights_update_group")  # fmt: skip
            except BaseException as e:  # noqa: BLE001  re-raised below, after the join
                errors.append(e)

        threads = [threading.Thread(target=init, args=(i, u), daemon=True) for i, u in enumerate(urls)]
        for t in threads:
            t.start()
        try:
            self.group = _init_group(self.backend, self.address, port, world, 0, self.group_name, self.timeout_s)
        finally:
            for t in threads:
                t.join(self.timeout_s)
        if errors:
            self.close()
            raise errors[0]
        self.group_urls = list(urls)

    def push(self, urls: list[str], weights: HFWeights, version: int) -> None:
        if self.group is None or self.group_urls != list(urls):
            self._connect(urls)  # first sync, or a server was restarted / replaced
        _each_server(urls, lambda url: _check(self.client.post(url, "/begin_weight_update", {}), url, "begin"))
        try:
            for bucket, last in with_last(weight_buckets(weights, self.bucket_mb)):
                body = {
                    "names": list(bucket),
                    "dtypes": [str(t.dtype).removeprefix("torch.") for t in bucket.values()],
                    "shapes": [list(t.shape) for t in bucket.values()],
                    "group_name": self.group_name,
                    "flush_cache": last,
                }
                if last:
                    body["weight_version"] = str(version)
                self._broadcast_bucket(urls, bucket, body)
        finally:
            _each_server(urls, lambda url: _check(self.client.post(url, "/end_weight_update", {}), url, "end"))

    def _broadcast_bucket(self, urls, bucket, body) -> None:
        results: dict[str, object] = {}

        def update(url):
            try:
                results[url] = self.client.post(url, "/update_weights_from_distributed", body,
                                                timeout=self.timeout_s, retries=0)  # fmt: skip
            except BaseException as e:  # noqa: BLE001
                results[url] = e

        threads = [threading.Thread(target=update, args=(u,), daemon=True) for u in urls]
        for t in threads:
            t.start()
        device = "cuda" if self.backend == "nccl" else "cpu"
        for tensor in bucket.values():  # the servers receive in the order of `names`
            self.group.broadcast(tensor.detach().to(device).contiguous(), 0).wait()
        for t in threads:
            t.join(self.timeout_s)
        for url in urls:
            result = results.get(url)
            if isinstance(result, BaseException):
                self.close()
                raise WeightSyncError(f"/update_weights_from_distributed on {url} failed: {result}") from result
            _check(result, url, "/update_weights_from_distributed")

    def close(self) -> None:
        if self.group is None:
            return
        for url in self.group_urls:
            with contextlib.suppress(SGLangError):  # the server may be gone (restart); its group died with it
                self.client.post(url, "/destroy_weights_update_group", {"group_name": self.group_name}, retries=0,
                                 timeout=30)  # fmt: skip
        with contextlib.suppress(Exception):  # best effort: a half-dead group cannot always be destroyed
            torch.distributed.destroy_process_group(self.group)
        self.group, self.group_urls = None, []


def build_sync(kind: str, client: SGLangClient, model_cfg: ModelConfig, work_dir: str, tp: int, bucket_mb: float,
               eos_token_id=None, timeout_s: float = 300.0):  # fmt: skip
    if kind == "disk":
        return DiskSync(client, model_cfg, work_dir, eos_token_id, bucket_mb=bucket_mb)
    if kind == "tensor":
        return TensorSync(client, tp, bucket_mb)
    if kind == "distributed":
        return DistributedSync(client, tp, bucket_mb, timeout_s=timeout_s)
    raise ValueError(f"rollout.weight_sync={kind!r} is not one of ['disk', 'tensor', 'distributed']")
