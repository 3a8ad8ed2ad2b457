"""megatron_sapo: SAPO / GRPO / GSPO reinforcement learning for MoE LLMs on Megatron-Core."""

__version__ = "0.1.0"
