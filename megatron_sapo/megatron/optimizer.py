"""megatron DDP, the megatron optimizer (Adam, distributed optimizer on/off) and the LR schedule."""

from __future__ import annotations

import torch

from megatron_sapo.config import OptimConfig


def wrap_ddp(chunks: list, tcfg, use_distributed_optimizer: bool) -> list:
    """Wrap each model chunk in megatron's DistributedDataParallel and hook the grad finalisation
    (DP reduction, TP reduction of SP/QK-norm grads, embedding ties across PP) into the config the
    schedules read."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,  # exact sums of bf16 grads across DP
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=None,
    )
    wrapped = [
        DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def build_optimizer(ocfg: OptimConfig, chunks: list, params_dtype: torch.dtype):
    """Adam through get_megatron_optimizer (torch's Adam on CPU, TE/Apex fused Adam on GPU when present);
    grad clipping by global norm (ocfg.clip_grad; 0 = off)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=ocfg.lr,
        min_lr=ocfg.min_lr,
        weight_decay=ocfg.weight_decay,
        adam_beta1=ocfg.adam_beta1,
        adam_beta2=ocfg.adam_beta2,
        adam_eps=ocfg.adam_eps,
        clip_grad=ocfg.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=False,
        params_dtype=params_dtype,
        use_distributed_optimizer=ocfg.distributed_optimizer,
    )
    opt = get_megatron_optimizer(config, chunks)
    use_fused_cpu_adam(opt)
    return opt


def use_fused_cpu_adam(opt) -> None:
    """Without TE/Apex (CPU), megatron steps torch's Adam, whose CPU default is the per-tensor loop: ~12
    small ops per parameter, the cost of a tiny model's step. torch's fused CPU kernel does the same update
    (to rounding) in one call per parameter group. Also called after a checkpoint load, which restores the
    saved param-group flags. A no-op with CUDA (megatron uses TE/Apex fused Adam there)."""
    if torch.cuda.is_available():
        return
    for inner in getattr(opt, "chained_optimizers", [opt]):
        torch_opt = getattr(inner, "optimizer", None)
        if isinstance(torch_opt, torch.optim.Adam | torch.optim.AdamW):
            for group in [torch_opt.defaults, *torch_opt.param_groups]:
                group["fused"], group["foreach"] = True, False


def build_scheduler(ocfg: OptimConfig, optimizer, total_steps: int):
    """megatron's OptimizerParamScheduler: linear warmup over lr_warmup_steps to lr, then constant, linear
    or cosine decay to min_lr at total_steps (optimizer steps)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = min(ocfg.lr_warmup_steps, max(total_steps - 1, 0))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else ocfg.lr,
        max_lr=ocfg.lr,
        min_lr=ocfg.min_lr if ocfg.lr_decay != "constant" else ocfg.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=ocfg.lr_decay,
        start_wd=ocfg.weight_decay,
        end_wd=ocfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
