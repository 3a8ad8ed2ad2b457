"""megatron_sapo.megatron"""
