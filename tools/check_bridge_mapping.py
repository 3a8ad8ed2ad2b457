"""Check our hand-written HF <-> Megatron Qwen3-MoE weight mapping against Megatron-Bridge's (manual tool).

What it checks: a tiny random Qwen3-MoE HF checkpoint is converted to Megatron weights twice, by our
rollout/weights.py (`hf_to_megatron`) and by Megatron-Bridge (`AutoBridge`, TP1/PP1/EP1, local layer spec),
and back to HF names twice (`megatron_to_hf` vs Bridge's `export_hf_weights`). Every tensor must match
exactly under the same names; the Megatron configs of both sides are listed where they differ.

Why manual: Megatron-Bridge needs Python >= 3.12 and Transformer Engine. On this project's Python 3.11 it
only runs in a separate venv with megatron-core 0.19 and transformers 5, installed --no-deps, with two
stand-ins that exist only inside `--bridge` of this script (never in megatron_sapo or its tests):
`typing.override` (new in 3.12) and a `transformer_engine` stub visible only while
megatron.bridge.peft.lora_layers executes (its unconditional `import transformer_engine.pytorch`, used by
LoRA on TE layers only); megatron-core never sees it, so it keeps its non-TE paths.

Build the Bridge venv (~2.2 GB; install megatron-core first, into a fresh megatron/ folder):
    python3.11 -m venv /work/venv_bridge && P=/work/venv_bridge/bin/pip
    $P install torch==2.13.0 "transformers==5.12.1" omegaconf einops triton  # triton: megatron-core 0.19 needs it
    $P install --no-deps --ignore-requires-python --python-version 3.12 --only-binary=:all: \
        --target /work/venv_bridge/lib/python3.11/site-packages megatron-core==0.19.2   # cp312 wheel, pure .py
    $P install --no-deps --ignore-requires-python megatron-bridge==0.6.2

Run (from the repo root; OUT is any scratch folder):
    python tools/check_bridge_mapping.py --ours OUT       # this project's env: HF folder + ours.pt
    HF_HUB_OFFLINE=1 /work/venv_bridge/bin/python tools/check_bridge_mapping.py --bridge OUT   # bridge.pt
    python tools/check_bridge_mapping.py --compare OUT    # exit 0 only if all equal
"""

import argparse
import importlib.abc
import importlib.machinery
import os
import re
import sys
import types

import torch

OVERRIDES = [
    "model.vocab_size=512", "model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.num_experts=4", "model.moe_topk=2", "model.moe_ffn_hidden_size=32",
    "model.ffn_hidden_size=128", "model.tie_embeddings=false", "model.dtype=fp32",
]  # fmt: skip
CONFIG_FIELDS = [
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "qk_layernorm", "layernorm_epsilon",
    "normalization", "gated_linear_unit", "add_bias_linear", "add_qkv_bias", "moe_router_pre_softmax",
    "moe_router_score_function", "moe_router_topk_scaling_factor", "rotary_base",
    "share_embeddings_and_output_weights",
]  # fmt: skip
# Bridge's provider defaults that need CUDA, TE or Apex (the alltoall dispatcher makes a torch.cuda.Stream; the
# dispatcher holds no weights); the local (non-TE) layer spec is set separately.
CPU_PROVIDER = dict(
    moe_grouped_gemm=False, moe_permute_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
    bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
    moe_router_fusion=False, cross_entropy_loss_fusion=False, params_dtype=torch.float32,
    pipeline_dtype=torch.float32, autocast_dtype=None, bf16=False, fp16=False, use_cpu_initialization=True,
    tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
    expert_tensor_parallel_size=1, sequence_parallel=False, moe_token_dispatcher_type="allgather",
)  # fmt: skip


# --ours (venv_probe: megatron-core 0.16, transformers 4.x)
def run_ours(out: str) -> None:
    from megatron_sapo.config import load_config
    from megatron_sapo.megatron.engine import MegatronEngine
    from megatron_sapo.megatron.model import layer_spec
    from megatron_sapo.rollout import weights as w
    from megatron_sapo.rollout.local import build_hf_model

    os.makedirs(out, exist_ok=True)
    cfg = load_config(None, OVERRIDES)
    m = cfg.model
    hf_dir = w.save_hf_checkpoint(random_hf_state(build_hf_model(m)), m, os.path.join(out, "hf"), eos_token_id=2)
    engine = MegatronEngine(cfg)  # world size 1: only the template of megatron keys and shapes
    template = engine.global_state_dict()
    config = {f: getattr(engine.tcfg, f, None) for f in CONFIG_FIELDS}
    config.update(rotary_base=m.rotary_base, share_embeddings_and_output_weights=m.tie_embeddings)
    keys_map = layer_spec(engine.tcfg, m).submodules.sharded_state_dict_keys_map
    engine.shutdown()
    stacked = w.hf_to_megatron(w.load_hf_state(hf_dir), template, m)
    per_layer, renamed = module_names(w.unstack_layers(stacked), keys_map)
    result = {"megatron": per_layer, "hf": w.megatron_to_hf(stacked, m), "config": config, "renamed": renamed}
    torch.save(result, os.path.join(out, "ours.pt"))
    print(f"ours: HF folder {hf_dir}; {len(stacked)} stacked megatron keys -> {len(per_layer)} per-layer "
          f"tensors; {len(result['hf'])} HF tensors exported")  # fmt: skip


def random_hf_state(model) -> dict[str, torch.Tensor]:
    """Random values for every HF weight, norms too (all ones would hide swapped norms)."""
    gen = torch.Generator().manual_seed(0)
    return {
        k: torch.randn(v.shape, generator=gen) * 0.05 + (1.0 if k.endswith("norm.weight") else 0.0)
        for k, v in model.state_dict().items()
    }


def module_names(state: dict, keys_map: dict[str, str]) -> tuple[dict, dict]:
    """Checkpoint keys -> module names: undo the layer spec's sharded_state_dict_keys_map (the local spec saves
    input_layernorm / pre_mlp_layernorm under the TE spec's fused-norm keys)."""
    out, renamed = {}, {}
    for name, tensor in state.items():
        match = re.match(r"(decoder\.layers\.\d+\.)(.+)", name)
        for module_prefix, key_prefix in keys_map.items():
            if match and match[2].startswith(key_prefix):
                tail = module_prefix + match[2][len(key_prefix) :]
                renamed["*." + match[2]] = "*." + tail
                name = match[1] + tail
        out[name] = tensor
    return out, renamed


# --bridge (venv_bridge: megatron-core 0.19, transformers 5, megatron-bridge)
def _te_stub_modules() -> dict[str, types.ModuleType]:
    """transformer_engine(.pytorch) whose every attribute (and its attributes) is one dummy class."""

    class _Dummy(metaclass=type("_AnyAttr", (type,), {"__getattr__": lambda cls, name: _Dummy})):
        pass

    mods = {name: types.ModuleType(name) for name in ("transformer_engine", "transformer_engine.pytorch")}
    for mod in mods.values():
        mod.__path__ = []  # a deeper submodule import still fails
        mod.__getattr__ = lambda name: _Dummy if not name.startswith("__") else getattr(object, name)
    mods["transformer_engine"].pytorch = mods["transformer_engine.pytorch"]
    return mods


class _TEStubForLoRA(importlib.abc.MetaPathFinder):
    """Puts the transformer_engine stub in sys.modules only while lora_layers' module body runs."""

    TARGET = "megatron.bridge.peft.lora_layers"

    def find_spec(self, name, path, target=None):
        if name != self.TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            stubs = _te_stub_modules()
            sys.modules.update(stubs)
            try:
                run(module)
            finally:
                for key in stubs:
                    sys.modules.pop(key, None)

        spec.loader.exec_module = exec_module
        return spec


def _python311_stand_ins() -> None:
    import typing

    import typing_extensions

    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override
    sys.meta_path.insert(0, _TEStubForLoRA())


def _check_hf_config(hf_dir: str) -> None:
    """Our config.json must read as a Qwen3MoeConfig in transformers 5 with the values we wrote."""
    import json

    from transformers import AutoConfig, Qwen3MoeConfig

    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    hf = AutoConfig.from_pretrained(hf_dir)
    assert isinstance(hf, Qwen3MoeConfig), type(hf)
    theta = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", getattr(hf, "rope_theta", None))
    got = {k: theta if k == "rope_theta" else getattr(hf, k, None) for k in raw if k != "torch_dtype"}
    bad = {k: (raw[k], v) for k, v in got.items() if v != raw[k]}
    print(f"config.json -> {type(hf).__name__}; fields read back differently: {bad or 'none'}")


def build_bridge_model(hf_dir: str):
    """AutoBridge: HF folder -> Megatron GPTModel (local spec, TP1/PP1/EP1, fp32, CPU) with the HF weights."""
    from megatron.bridge import AutoBridge
    from megatron.bridge.models.gpt_provider import local_layer_spec

    bridge = AutoBridge.from_hf_pretrained(hf_dir, torch_dtype=torch.float32)
    provider = bridge.to_megatron_provider(load_weights=True)
    provider.transformer_layer_spec = local_layer_spec
    for key, value in CPU_PROVIDER.items():
        setattr(provider, key, value)
    provider.finalize()
    model = provider.provide_distributed_model(
        wrap_with_ddp=False, use_cpu_initialization=True, fp16=False, bf16=False, mixed_precision_wrapper=None
    )
    return bridge, provider, model


def run_bridge(out: str) -> None:
    _python311_stand_ins()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    _check_hf_config(os.path.join(out, "hf"))
    bridge, provider, model = build_bridge_model(os.path.join(out, "hf"))
    state = model[0].state_dict()
    megatron = {k: v.detach().float().clone() for k, v in state.items() if not k.endswith("_extra_state")}
    hf = {k: v.detach().float().clone() for k, v in bridge.export_hf_weights(model, cpu=True, show_progress=False)}
    config = {f: getattr(provider, f, None) for f in CONFIG_FIELDS}
    core_te = sys.modules.get("megatron.core.extensions.transformer_engine")
    assert "transformer_engine" not in sys.modules and not getattr(core_te, "HAVE_TE", False), "TE stub leaked"
    torch.save({"megatron": megatron, "hf": hf, "config": config}, os.path.join(out, "bridge.pt"))
    print(f"bridge: {type(provider).__name__}, {len(megatron)} megatron tensors "
          f"({len(state) - len(megatron)} _extra_state dropped), {len(hf)} HF tensors exported")  # fmt: skip
    ps.destroy_model_parallel()
    dist.destroy_process_group()


# --compare (either venv)
def compare(title: str, ours: dict, theirs: dict) -> bool:
    both = sorted(set(ours) & set(theirs))
    shapes = [k for k in both if ours[k].shape != theirs[k].shape]
    diffs = {k: (ours[k].double() - theirs[k].double()).abs().max().item() for k in both if k not in shapes}
    worst = max(diffs, key=diffs.get, default=None)
    print(f"[{title}] ours {len(ours)}, bridge {len(theirs)}, compared {len(diffs)}; "
          f"max |diff| {diffs.get(worst, 0.0):.3g} ({worst if diffs.get(worst) else 'every tensor'})")  # fmt: skip
    problems = [f"  only ours:   {k} {tuple(ours[k].shape)}" for k in sorted(set(ours) - set(theirs))]
    problems += [f"  only bridge: {k} {tuple(theirs[k].shape)}" for k in sorted(set(theirs) - set(ours))]
    problems += [f"  shape:       {k} ours {tuple(ours[k].shape)} bridge {tuple(theirs[k].shape)}" for k in shapes]
    problems += [f"  differs:     {k} max |diff| {d:.3g}" for k, d in diffs.items() if d > 0]
    if problems:
        print("\n".join(problems))
    return not problems


def run_compare(out: str) -> int:
    from safetensors.torch import load_file

    ours = torch.load(os.path.join(out, "ours.pt"))
    theirs = torch.load(os.path.join(out, "bridge.pt"))
    print("megatron names: bridge = GPTModel.state_dict() of the local spec, _extra_state dropped; ours = our")
    print("  stacked checkpoint keys unstacked per layer/expert (weights.unstack_layers), then renamed to module names")
    print(f"  by the inverse of the layer spec's sharded_state_dict_keys_map: {ours['renamed']}")
    ok = compare("megatron params", ours["megatron"], theirs["megatron"])
    ok &= compare("HF export", ours["hf"], theirs["hf"])
    hf_in = load_file(os.path.join(out, "hf", "model.safetensors"))
    ok &= compare("HF input vs bridge export", hf_in, theirs["hf"])
    notes = {f: (ours["config"].get(f), theirs["config"].get(f)) for f in CONFIG_FIELDS}
    notes = {f: v for f, v in notes.items() if v[0] != v[1]}
    print(f"megatron config fields that differ (ours, bridge; informational): {notes or 'none'}")
    print("RESULT:", "all tensors equal" if ok else "MISMATCH (see above)")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    for name in ("ours", "bridge", "compare"):
        mode.add_argument(f"--{name}", metavar="OUTDIR")
    args = parser.parse_args()
    if args.compare:
        return run_compare(args.compare)
    if args.ours:
        run_ours(args.ours)
    else:
        run_bridge(args.bridge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
