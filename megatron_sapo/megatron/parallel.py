"""Parallel setup in one place: torch.distributed + megatron parallel_state from a ParallelConfig.

    par = init_parallel(cfg.parallel, seed=cfg.train.seed)
    ... par.tp_group, par.dp_rank, par.pg_collection ...
    par.teardown()

- gloo on CPU, NCCL on GPU.
- Launched by torchrun/srun (RANK / WORLD_SIZE in the environment): joins that world. Otherwise: a world of
  one process with an in-memory store, so every code path also runs as a plain `python` call.
- The degrees must multiply to the world size (tp * pp * cp * dp); EP and expert-TP live inside the
  tp * cp * dp ranks of each pipeline stage (megatron's expert grid).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_sapo.config import ParallelConfig
from megatron_sapo.megatron import compat


def backend_name() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_torch_distributed() -> bool:
    """Initialise the default process group if needed. True when this call made a standalone world of
    one (which teardown then destroys); a world joined from torchrun's environment lives with the process."""
    if dist.is_initialized():
        return False
    standalone = "RANK" not in os.environ or "WORLD_SIZE" not in os.environ
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if standalone:
        # A world of one needs no rendezvous: an in-memory store, no port, and no RANK / MASTER_PORT written
        # into os.environ (child processes would inherit them and think they were launched by torchrun).
        dist.init_process_group(backend=backend_name(), store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend=backend_name())
    return standalone


def batch_p2p_comm_ok(pcfg: ParallelConfig, backend: str) -> bool:
    """Whether the pipeline may batch its sends/receives (megatron's default, batch_isend_irecv).
    On gloo with a virtual pipeline the feasibility spike measured SILENTLY WRONG gradients with batching
    (PP2 x VPP2, relative error ~10; exact with batching off), so gloo never batches; a PP test with VPP
    covers it (tests/dist)."""
    return backend != "gloo"


@dataclass
class ParallelState:
    """Degrees, this rank's coordinates and the explicit process groups; everything code needs about the
    layout. Built by init_parallel; megatron's parallel_state holds the same groups."""

    cfg: ParallelConfig
    backend: str
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    etp_rank: int
    cp_rank: int
    tp_group: object
    pp_group: object
    dp_group: object  # data parallel (without CP), over which the batch is split
    dp_cp_group: object  # what DDP reduces dense gradients over
    cp_group: object  # context parallel: the ranks that share each sequence (context_parallel.py)
    ep_group: object
    mp_group: object
    pg_collection: object  # megatron ProcessGroupCollection (for APIs that take explicit groups)
    owns_process_group: bool = False
    batch_p2p_comm: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def dp(self) -> int:
        return self.cfg.dp

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.cfg.pp - 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    def teardown(self) -> None:
        """Destroy megatron's groups (and the default group if init_parallel created it)."""
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def cpu_threads_per_process(world_size: int, threads: int = 0, rollout_process: bool = False) -> int:
    """Intra-op threads: `threads` when > 0; else OMP_NUM_THREADS when set (torch already read it); else
    the cores shared by this node's ranks (plus the local rollout child, rollout.local_process), so that they
    don't oversubscribe the cores. Oversubscription is costly: with 2 threads on 2 busy cores, one tiny-MoE
    optimizer step took 214 ms instead of 12 ms."""
    if threads > 0:
        return threads
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) + int(rollout_process)
    return max(1, (os.cpu_count() or 1) // max(1, local))


def init_parallel(pcfg: ParallelConfig, seed: int = 1234, rollout_process: bool = False) -> ParallelState:
    """Initialise torch.distributed (if needed) and megatron's parallel state; seed the RNG trackers."""
    compat.apply_patches()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    owns = init_torch_distributed()
    world = dist.get_world_size()
    if world != pcfg.world_size:
        raise RuntimeError(
            f"world size {world} != parallel.tp*pp*cp*dp = {pcfg.tp}*{pcfg.pp}*{pcfg.cp}*{pcfg.dp} = {pcfg.world_size}"
        )
    backend = backend_name()
    if backend == "gloo":
        torch.set_num_threads(cpu_threads_per_process(world, pcfg.cpu_threads, rollout_process))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=pcfg.tp,
        pipeline_model_parallel_size=pcfg.pp,
        virtual_pipeline_model_parallel_size=pcfg.vpp,
        context_parallel_size=pcfg.cp,
        expert_model_parallel_size=pcfg.ep,
        expert_tensor_parallel_size=pcfg.etp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return ParallelState(
        cfg=pcfg,
        backend=backend,
        rank=dist.get_rank(),
        world_size=world,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        cp_group=ps.get_context_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        mp_group=ps.get_model_parallel_group(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        owns_process_group=owns,
        batch_p2p_comm=batch_p2p_comm_ok(pcfg, backend),
    )
