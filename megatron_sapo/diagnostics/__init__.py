"""megatron_sapo.diagnostics"""
