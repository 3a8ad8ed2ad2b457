"""Qwen3-MoE style megatron-core GPTModel from the project's ModelConfig + ParallelConfig.

RMSNorm, rotary embeddings, SwiGLU, optional QK layernorm, no biases; MoE layers with megatron's
TopKRouter (softmax over the top-k logits, i.e. Qwen3's normalised top-k probabilities), an aux or
sequence-aux load-balancing loss, alltoall or allgather token dispatcher and an optional shared expert.
Local (non-TE) layer spec on CPU (with context_parallel.py's attention when parallel.cp > 1); Transformer
Engine spec when CUDA and TE import. fp32 on CPU, bf16 on
GPU (dtype="auto").
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

from megatron_sapo.config import ModelConfig, ParallelConfig
from megatron_sapo.megatron import compat


def have_transformer_engine() -> bool:
    """TE layer specs are used on CUDA machines where transformer_engine imports."""
    return torch.cuda.is_available() and compat.transformer_engine_importable()


def resolve_dtype(mcfg: ModelConfig) -> torch.dtype:
    if mcfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[mcfg.dtype]


def check_moe_layout(mcfg: ModelConfig, pcfg: ParallelConfig) -> None:
    """Reject layouts megatron-core gets silently wrong.

    With EP = 1, megatron-core (0.16.1, read in tensor_parallel/layers.py and moe/experts.py) tags expert
    weights `allreduce=True`, so DDP reduces their gradients over the dense data-parallel group only. If
    expert-TP < TP, the TP ranks hold full expert copies that see different (sequence-parallel) tokens,
    and those partial gradients are never summed: measured here, 0.8 relative gradient error at TP2, ETP1,
    EP1. ETP = TP (experts sharded like dense layers) or EP > 1 is exact."""
    if mcfg.is_moe and pcfg.ep == 1 and pcfg.tp > 1 and pcfg.etp != pcfg.tp:
        raise ValueError(
            f"parallel.etp={pcfg.etp} with parallel.tp={pcfg.tp} and parallel.ep=1 gives wrong expert "
            f"gradients in megatron-core: set parallel.etp={pcfg.tp} or parallel.ep > 1"
        )


def recompute_kwargs(mcfg: ModelConfig) -> dict:
    """model.recompute_* -> megatron's activation-recompute fields (routing replay serves the recomputed
    router calls the forward's routing: megatron/routing.py)."""
    g = mcfg.recompute_granularity
    if g == "none":
        return {}
    if g == "selective":  # megatron: no method / layer count with selective
        return dict(recompute_granularity=g, recompute_modules=list(mcfg.recompute_modules))
    return dict(recompute_granularity=g, recompute_method=mcfg.recompute_method,
                recompute_num_layers=mcfg.recompute_num_layers)  # fmt: skip


def build_transformer_config(mcfg: ModelConfig, pcfg: ParallelConfig, *, batch_p2p_comm: bool = True, **extra):
    """megatron TransformerConfig for this model and layout. `extra` overrides any field (tests, replay)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_moe_layout(mcfg, pcfg)
    dtype = resolve_dtype(mcfg)
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=mcfg.num_layers,
        hidden_size=mcfg.hidden_size,
        ffn_hidden_size=mcfg.ffn_hidden_size,
        num_attention_heads=mcfg.num_attention_heads,
        num_query_groups=mcfg.num_query_groups,
        kv_channels=mcfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        qk_layernorm=mcfg.qk_layernorm,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        # RL needs deterministic, exactly re-computable log-probs: no dropout.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=mcfg.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        # CPU: initialise the full weight with one generator, then slice: identical weights at any layout.
        use_cpu_initialization=not on_gpu,
        tensor_model_parallel_size=pcfg.tp,
        pipeline_model_parallel_size=pcfg.pp,
        virtual_pipeline_model_parallel_size=pcfg.vpp,
        context_parallel_size=pcfg.cp,
        expert_model_parallel_size=pcfg.ep,
        expert_tensor_parallel_size=pcfg.etp,
        sequence_parallel=pcfg.sp,
        batch_p2p_comm=batch_p2p_comm,
        # Freeing pipeline outputs early is a GPU memory optimisation; on CPU the spike ran without it.
        deallocate_pipeline_outputs=on_gpu,
    )
    kwargs.update(recompute_kwargs(mcfg))
    if mcfg.is_moe:
        kwargs.update(
            num_moe_experts=mcfg.num_experts,
            moe_router_topk=mcfg.moe_topk,
            moe_ffn_hidden_size=mcfg.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=mcfg.moe_shared_expert_ffn_hidden_size or None,
            moe_router_load_balancing_type=mcfg.moe_router_load_balancing,
            moe_aux_loss_coeff=mcfg.moe_aux_loss_coeff if mcfg.moe_router_load_balancing != "none" else 0.0,
            moe_token_dispatcher_type=mcfg.moe_dispatcher,
            moe_router_pre_softmax=False,  # top-k on logits, softmax over the k: Qwen3's norm_topk_prob
            moe_router_dtype="fp32",  # routing decisions in fp32 also under bf16
            moe_grouped_gemm=have_transformer_engine(),
            moe_permute_fusion=False,
        )
    kwargs.update(extra)
    return TransformerConfig(**kwargs)


def layer_spec(tcfg, mcfg: ModelConfig):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    num_experts = mcfg.num_experts if mcfg.is_moe else None
    if have_transformer_engine():
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=tcfg.moe_grouped_gemm, qk_layernorm=mcfg.qk_layernorm
        )
    spec = specs.get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=False,
        qk_layernorm=mcfg.qk_layernorm,
        normalization="RMSNorm",
    )
    if tcfg.context_parallel_size > 1:  # the local DotProductAttention refuses CP: context_parallel.py
        from megatron_sapo.megatron.context_parallel import all_gather_kv_attention

        spec.submodules.self_attention.submodules.core_attention = all_gather_kv_attention()
    return spec


def build_model_chunks(mcfg: ModelConfig, tcfg, pcfg: ParallelConfig) -> list:
    """The GPTModel chunks of this rank: one per virtual pipeline stage (one without VPP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    spec = layer_spec(tcfg, mcfg)
    chunks = []
    for vp_stage in range(pcfg.vpp or 1):
        stage = vp_stage if pcfg.vpp else None
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=spec,
            vocab_size=mcfg.vocab_size,
            max_sequence_length=mcfg.max_seq_len,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=stage is None, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=stage is None, vp_stage=stage),
            share_embeddings_and_output_weights=mcfg.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=mcfg.rotary_base,
            vp_stage=stage,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        if tcfg.params_dtype != torch.float32:
            # Every weight in the training dtype, as megatron's Float16Module casts the module: the local spec's
            # torch norms are created in fp32 whatever params_dtype says, and a bf16 model holding fp32 params
            # breaks Float16OptimizerWithFloat16Params' checkpoint ("Param id N does not match any model sharded
            # param"; seen on an H100 without TE). Float16Module's fp32 copy of the logits is left out: the
            # log-prob glue upcasts a chunk at a time.
            model.to(dtype=tcfg.params_dtype)
        chunks.append(model)
    return chunks


# Megatron's init rules (TransformerConfig): norms start at 1; the layers that write into the residual stream
# (attention out, MLP / expert fc2) use output_layer_init_method = N(0, std / sqrt(2 * num_layers)); every other
# weight (embedding, qkv, fc1, router, output layer) init_method = N(0, std).
_SCALED_INIT = ("linear_proj.weight", "linear_fc2.weight")


def _init_std(unit: str, mcfg: ModelConfig) -> float | None:
    """Standard deviation of a weight's normal init, or None for a norm weight (ones)."""
    if "layernorm" in unit or "layer_norm" in unit:  # q/k/input/pre-mlp/final layernorm, TE's fused norm weights
        return None
    if unit.endswith(_SCALED_INIT):
        return mcfg.init_method_std / math.sqrt(2 * mcfg.num_layers)
    return mcfg.init_method_std


def seeded_init(chunks: list, mcfg: ModelConfig, seed: int) -> int:
    """model.init=seeded: overwrite this rank's shards so that every whole tensor is the same whatever the layout:
    each unit is drawn in full from a generator seeded by (seed, its name), and each rank keeps its slices.
    Returns the number of shards written. Memory: one unit at a time."""
    from megatron_sapo.megatron.weights import fill_units, shards_by_unit

    def draw(unit: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        std = _init_std(unit, mcfg)
        if std is None:
            return torch.ones(shape)
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{unit}".encode()))
        return torch.randn(shape, generator=generator) * std

    return fill_units(shards_by_unit(chunks), draw)
