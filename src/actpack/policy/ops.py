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

# Dropout ops whose saved noise is two-valued by construction: on the CPU
# ``_dropout_impl`` saves ``bernoulli(1 - p) / (1 - p)`` (0 or 1/(1-p)), or
# ``a * bernoulli(1 - p)`` for alpha dropout; on CUDA they save a bool mask.
DROPOUT_OPS = frozenset(
    {"dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout",
     "feature_alpha_dropout"}
)  # fmt: skip
