"""megatron_sapo: SAPO / GRPO / GSPO reinforcement learning for MoE LLMs on Megatron-Core."""

from setuptools import find_packages, setup

# megatron-core: 0.16.1 is the newest release installable on Python 3.11 (CPU CI, laptops); GPU clusters
# run newer releases on Python 3.12. Version-specific code lives in megatron_sapo/megatron/compat.py.
INSTALL_REQUIRES = [
    "torch>=2.6",
    "megatron-core>=0.16.1,<0.20",
    "pyyaml>=6",
    "numpy",
    "psutil",  # megatron-core's checkpoint writer
    "tqdm",
    # the local rollout engine and the HF weight layout (SGLang serves the same); 4.57 is the last
    # release with per-expert Qwen3-MoE modules, the layout of HF checkpoints
    "transformers>=4.51,<5",
    "safetensors",
    "tokenizers",
    "math-verify>=0.7",  # math answers: a maintained verifier, no hand-written LaTeX parsing
]

EXTRAS = {
    # GPU-only pieces: imported only when CUDA is present, never unconditionally.
    "gpu": ["transformer-engine[pytorch]", "apex", "sglang>=0.5.23"],
    # prompt datasets beyond JSONL: Parquet files, and Hugging Face `datasets` (hf:NAME specs, save_to_disk)
    "data": ["pyarrow", "datasets"],
    "dev": ["pytest>=8", "ruff>=0.6", "pyarrow", "datasets", "matplotlib", "wandb"],
    # logging.wandb_project: Weights & Biases (WANDB_MODE=offline on clusters without internet)
    "wandb": ["wandb"],
    # tools/bench_vs_trl.py only: TRL's GRPOTrainer(loss_type="sapo") as the baseline. A bare
    # `pip install trl==1.16.0` upgrades to transformers 5 (via datasets -> huggingface_hub 1.x); installed
    # as this extra, the transformers<5 pin above holds (datasets 5.0.1, huggingface_hub 0.36).
    "bench": ["trl==1.16.0", "psutil"],
}

setup(
    name="megatron_sapo",
    version="0.1.0",
    description="Soft Adaptive Policy Optimization for Mixture-of-Experts LLMs on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),  # noqa: SIM115 (setup-time read)
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_sapo", "megatron_sapo.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megatron-sapo = megatron_sapo.cli:main"]},
)
