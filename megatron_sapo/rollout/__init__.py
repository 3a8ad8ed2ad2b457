"""megatron_sapo.rollout"""
