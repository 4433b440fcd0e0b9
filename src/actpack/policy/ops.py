"""Op families the policy and the strategies tell apart, by torch function name."""

from __future__ import annotations

# Ops whose 3-D inputs are (N, C, L) maps rather than (N, L, D) sequences.
CHANNEL_FIRST_OPS = frozenset(
    {
        "conv1d", "conv_transpose1d", "conv2d", "conv_transpose2d", "conv3d",
        "conv_transpose3d", "max_pool1d", "avg_pool1d", "batch_norm", "instance_norm",
        "group_norm", "adaptive_avg_pool1d", "adaptive_max_pool1d",
    }
)  # fmt: skip

# Ops normalizing each row of the last dimension (per token).  Their backward
# multiplies a row's input error by that row's 1/std, so one quantization
# range must not span rows of different scale (a cls token among patches).
ROW_NORM_OPS = frozenset({"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"})
