"""Mamba / linear-attention CPU kernels: imported by sglang 0.5.23 when is_cpu(); unsupported by the CPU kit."""

from sgl_kernel import _not_implemented

causal_conv1d_fn_cpu = _not_implemented("causal_conv1d_fn_cpu")
causal_conv1d_update_cpu = _not_implemented("causal_conv1d_update_cpu")
chunk_gated_delta_rule_cpu = _not_implemented("chunk_gated_delta_rule_cpu")
