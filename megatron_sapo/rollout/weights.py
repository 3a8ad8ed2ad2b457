"""Megatron (local layer spec) weight names and layouts -> Hugging Face Qwen3 / Qwen3-MoE.

The rollout engines (the local transformers engine, SGLang) load HF checkpoints, so every weight sync
converts the trainer's *global* (unsharded) state dict with this map. Megatron-Bridge does the same for
the models it covers on Python >= 3.12 clusters; this small map is the CPU path (Megatron-Bridge does not
install beside megatron-core 0.16 on Python 3.11) and is checked by logits equality in the tests.
"""

from __future__ import annotations

import json
import os
import re

import torch

from megatron_sapo.config import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")

# Megatron suffix inside a layer -> HF suffix inside model.layers.{i}.
_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # Transformer Engine spec
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",  # TE spec, dense MLP
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def head_dim(m: ModelConfig) -> int:
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def split_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron packs q, k, v per query group: [groups, (heads/groups + 2) * head_dim, hidden]."""
    groups = m.num_query_groups or m.num_attention_heads
    per_group = m.num_attention_heads // groups
    d = head_dim(m)
    w = qkv.view(groups, (per_group + 2) * d, -1)
    q = w[:, : per_group * d].reshape(-1, w.shape[-1])
    k = w[:, per_group * d : (per_group + 1) * d].reshape(-1, w.shape[-1])
    v = w[:, (per_group + 1) * d :].reshape(-1, w.shape[-1])
    return q, k, v


def _split_fc1(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU fc1 rows are [gate; up]."""
    gate, up = weight.chunk(2, dim=0)
    return gate, up


def unstack_layers(global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron's checkpoint keys stack layers (and experts) on leading axes; give one name per tensor.

    `decoder.layers.X` [layers, ...] -> `decoder.layers.{i}.X`;
    `...mlp.experts.experts.linear_fc1.weight` [experts, ...] -> `...mlp.experts.local_experts.{e}.linear_fc1.weight`.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in global_state.items():
        if name.startswith("decoder.layers.") and not name.split(".")[2].isdigit():
            rest = name[len("decoder.layers.") :]
            items = [(f"decoder.layers.{i}.{rest}", tensor[i]) for i in range(tensor.shape[0])]
        else:
            items = [(name, tensor)]
        for key, value in items:
            if ".mlp.experts.experts." in key:
                head, tail = key.split(".mlp.experts.experts.")
                for e in range(value.shape[0]):
                    out[f"{head}.mlp.experts.local_experts.{e}.{tail}"] = value[e]
            else:
                out[key] = value
    return out


def megatron_to_hf(global_state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Unsharded Megatron state dict (stacked or per-layer keys) -> HF state dict; unknown names raise."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in unstack_layers(global_state).items():
        if name.endswith("._extra_state") or "_extra_state" in name:
            continue  # Transformer Engine FP8 metadata, not a weight
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = tensor
            continue
        match = _LAYER.match(name)
        if not match:
            raise KeyError(f"no HF name for Megatron weight '{name}'")
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest in _LAYER_NAMES:
            out[prefix + _LAYER_NAMES[rest]] = tensor
        elif rest == "self_attention.linear_qkv.weight":
            q, k, v = split_qkv(tensor, m)
            out[prefix + "self_attn.q_proj.weight"] = q
            out[prefix + "self_attn.k_proj.weight"] = k
            out[prefix + "self_attn.v_proj.weight"] = v
        elif rest == "mlp.linear_fc1.weight":
            out[prefix + "mlp.gate_proj.weight"], out[prefix + "mlp.up_proj.weight"] = _split_fc1(tensor)
        elif (expert := _EXPERT.match(rest)) is not None:
            e, which = expert.groups()
            base = f"{prefix}mlp.experts.{e}."
            if which == "linear_fc1":
                out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = _split_fc1(tensor)
            else:
                out[base + "down_proj.weight"] = tensor
        else:  # e.g. shared experts: Qwen3-MoE has none
            raise KeyError(f"no HF name for Megatron weight '{name}'")
    if m.tie_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in out.items()}


def hf_config_dict(m: ModelConfig, eos_token_id: int | None = None) -> dict:
    """config.json of the matching HF model (Qwen3MoeForCausalLM, or Qwen3ForCausalLM when dense)."""
    common = {
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": head_dim(m),
        "intermediate_size": m.ffn_hidden_size,
        "max_position_embeddings": m.max_seq_len,
        "rope_theta": float(m.rotary_base),
        "rms_norm_eps": 1e-6,  # model.py sets layernorm_epsilon=1e-6 (Qwen3)
        "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "torch_dtype": "float32" if m.dtype != "bf16" else "bfloat16",
        "eos_token_id": eos_token_id,
    }
    if not m.is_moe:
        return {**common, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}
    return {
        **common,
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "num_experts": m.num_experts,
        "num_experts_per_tok": m.moe_topk,
        "moe_intermediate_size": m.moe_ffn_hidden_size,
        "norm_topk_prob": True,  # Megatron: softmax over the top-k logits == renormalised top-k probs
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "output_router_logits": False,
    }


def save_hf_checkpoint(hf_state: dict[str, torch.Tensor], m: ModelConfig, out_dir: str, eos_token_id=None) -> str:
    """Write config.json + model.safetensors (what /update_weights_from_disk and from_pretrained read)."""
    return save_hf_buckets([hf_state], m, out_dir, eos_token_id)


def save_hf_buckets(buckets, m: ModelConfig, out_dir: str, eos_token_id=None) -> str:
    """Write an HF checkpoint from HF-named buckets (dicts), one safetensors file per bucket as it arrives, so
    the writer holds one bucket at a time: `model.safetensors` for a single bucket, else
    `model-0000i.safetensors` + `model.safetensors.index.json`. Each file appears whole (tmp + rename); weight
    files of an earlier write in out_dir are removed so that loaders do not see two copies."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    weight_map, files, total = {}, [], 0
    for i, bucket in enumerate(buckets):
        name = f"model-{i + 1:05d}.safetensors"
        tmp = os.path.join(out_dir, name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in bucket.items()}, tmp)
        os.replace(tmp, os.path.join(out_dir, name))
        files.append(name)
        weight_map.update(dict.fromkeys(bucket, name))
        total += sum(v.numel() * v.element_size() for v in bucket.values())
    if len(files) == 1:
        os.replace(os.path.join(out_dir, files[0]), os.path.join(out_dir, "model.safetensors"))
        files = ["model.safetensors"]
    else:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(out_dir, "model.safetensors.index.json.tmp"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
        os.replace(os.path.join(out_dir, "model.safetensors.index.json.tmp"),
                   os.path.join(out_dir, "model.safetensors.index.json"))  # fmt: skip
        files.append("model.safetensors.index.json")
    for stale in os.listdir(out_dir):
        if stale.startswith("model") and stale.endswith((".safetensors", ".index.json")) and stale not in files:
            os.remove(os.path.join(out_dir, stale))
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config_dict(m, eos_token_id), f, indent=2)
    return out_dir


def hf_to_megatron(
    hf_state: dict[str, torch.Tensor], template: dict[str, torch.Tensor], m: ModelConfig
) -> dict[str, torch.Tensor]:
    """HF state dict -> Megatron global state dict shaped like `template` (MegatronEngine.global_state_dict()).

    The exact inverse of megatron_to_hf, derived from it: the template is filled with element ids, mapped
    forward (megatron_to_hf only slices, splits and reshapes), and each HF value is written back to the
    ids it came from. One mapping serves both directions, so they cannot drift apart.
    """
    ids, total = {}, 0
    for key, tensor in template.items():
        ids[key] = torch.arange(total, total + tensor.numel()).view(tensor.shape)
        total += tensor.numel()
    id_hf = megatron_to_hf(ids, m)
    missing = sorted(set(id_hf) - set(hf_state))
    unexpected = sorted(set(hf_state) - set(id_hf) - ({"lm_head.weight"} if m.tie_embeddings else set()))
    if missing or unexpected:
        raise KeyError(f"HF checkpoint does not fit model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    flat = torch.zeros(total, dtype=torch.float32)
    filled = torch.zeros(total, dtype=torch.bool)
    for name, index in id_hf.items():
        value = hf_state[name]
        if tuple(value.shape) != tuple(index.shape):
            raise ValueError(f"HF weight '{name}' has shape {tuple(value.shape)}, the model needs {tuple(index.shape)}")
        flat[index.reshape(-1)] = value.reshape(-1).float()
        filled[index.reshape(-1)] = True
    empty = [k for k, i in ids.items() if not bool(filled[i.reshape(-1)].all())]
    if empty:
        raise KeyError(f"Megatron weights not covered by the HF checkpoint: {empty[:5]}")
    return {k: flat[i.reshape(-1)].view(template[k].shape).to(template[k].dtype) for k, i in ids.items()}


def load_hf_state(path: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint folder (*.safetensors, sharded or not)."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"model.hf_path={path!r}: no *.safetensors files in that folder")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state
