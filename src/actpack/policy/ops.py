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

# Ops whose backward reads each saved float tensor linearly (matmul family,
# convolutions, products, averages, exp's output, log_softmax's output through
# its probabilities): an unbiased code gives an unbiased gradient.
LINEAR_BACKWARD_OPS = frozenset(
    {"linear", "bilinear", "matmul", "mm", "bmm", "addmm", "addbmm", "baddbmm", "addmv",
     "mv", "dot", "vdot", "outer", "ger", "einsum", "tensordot", "chain_matmul",
     "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
     "conv_transpose3d", "conv_tbc", "mul", "multiply", "addcmul", "square", "exp",
     "expm1", "log_softmax", "cross_entropy", "nll_loss", "mse_loss", "avg_pool1d",
     "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
     "adaptive_avg_pool3d", "interpolate", "embedding", "embedding_bag", "dropout",
     "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout",
     "feature_alpha_dropout", "max_pool1d", "max_pool2d", "max_pool3d",
     "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
     "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
     "fractional_max_pool2d", "mul_", "__mul__", "__rmul__", "__imul__", "__matmul__",
     "__rmatmul__", "relu", "relu_", "leaky_relu", "leaky_relu_", "threshold",
     "threshold_", "relu6", "hardtanh", "hardtanh_", "rrelu", "rrelu_", "hardsigmoid",
     "hardsigmoid_",
     # aten names the compile-native path reports (every forward user vetted)
     "add", "sub", "nll_loss_forward", "_log_softmax", "convolution"}
)  # fmt: skip

# Ops whose backward is a smooth function of the saved tensor with bounded
# second derivative: normalization layers, smooth activations, attention,
# recurrent cells.  An unbiased code leaves a second-order bias, proportional
# to the code's variance: ActNN's, GACT's and DIVISION's published trade-off,
# measured in BENCHMARKS.md; ``compress(..., smooth="exact")`` keeps them exact.
SMOOTH_BACKWARD_OPS = frozenset(
    {"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "batch_norm",
     "group_norm", "instance_norm", "local_response_norm", "gelu", "silu", "sigmoid",
     "tanh", "softmax", "logsigmoid", "softplus", "mish", "scaled_dot_product_attention",
     "multi_head_attention_forward", "gru", "rnn_tanh", "rnn_relu", "lstm", "gru_cell",
     "lstm_cell", "rnn_tanh_cell", "rnn_relu_cell", "_thnn_fused_gru_cell",
     "_thnn_fused_lstm_cell", "_softmax", "_scaled_dot_product_flash_attention_for_cpu",
     "_scaled_dot_product_flash_attention_for_cpu_backward",
     "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
     "_scaled_dot_product_cudnn_attention", "native_group_norm", "native_batch_norm"}
)  # fmt: skip

#: Activations that libraries write as several elementary ops, one of which
#: alone has a backward actpack keeps exact (``gelu_new``'s ``x ** 3``,
#: ``erf``), while the composite's backward is a smooth function of its
#: input, like the fused op it approximates.  Keyed by (Python module, class)
#: of the ``nn.Module`` computing it; a save made inside one counts as a save
#: of the smooth op named here (``smooth="exact"`` keeps it exact).  Only
#: modules whose whole forward is the activation belong here.
SMOOTH_COMPOSITES: dict[tuple[str, str], str] = {
    ("transformers.activations", "NewGELUActivation"): "gelu",  # GPT-2's "gelu_new"
    ("transformers.activations", "GELUTanh"): "gelu",  # its pure-Python path
    ("transformers.activations", "AccurateGELUActivation"): "gelu",
    ("transformers.activations", "GELUActivation"): "gelu",  # its erf Python path
    ("transformers.activations", "FastGELUActivation"): "gelu",
    ("transformers.activations", "QuickGELUActivation"): "gelu",
    ("transformers.activations", "MishActivation"): "mish",
}

#: Fused attention ops whose backward recomputes the probabilities from the
#: saved query, key and additive mask (bias) and an exact logsumexp: those
#: stay exact (a code's noise would enter an exponent; a group code of a
#: ``-inf`` mask turns the rest of its group NaN); eager and aten names.
ATTENTION_LOGIT_OPS = frozenset(
    {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
     "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
     "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable"}
)  # fmt: skip

#: Where each attention op (forward, or its ``_backward``) takes its logit
#: inputs: positions of query and key, the mask's position (None: keyword
#: only, or no mask) and the mask's keyword.  From the schemas in
#: ``aten/src/ATen/native/native_functions.yaml``.
ATTENTION_LOGIT_ARGS: dict[str, tuple[tuple[int, ...], int | None, str]] = {
    "scaled_dot_product_attention": ((0, 1), 3, "attn_mask"),
    "_scaled_dot_product_flash_attention_for_cpu": ((0, 1), None, "attn_mask"),
    "_scaled_dot_product_flash_attention": ((0, 1), None, ""),
    "_scaled_dot_product_efficient_attention": ((0, 1), 3, "attn_bias"),
    "_scaled_dot_product_cudnn_attention": ((0, 1), 3, "attn_bias"),
    "_scaled_dot_product_fused_attention_overrideable": ((0, 1), 3, "attn_bias"),
    # Backward ops: (grad_out, query, key, value, ...).
    "_scaled_dot_product_flash_attention_for_cpu_backward": ((1, 2), None, "attn_mask"),
    "_scaled_dot_product_flash_attention_backward": ((1, 2), None, ""),
    "_scaled_dot_product_efficient_attention_backward": ((1, 2), 4, "attn_bias"),
    "_scaled_dot_product_cudnn_attention_backward": ((1, 2), 8, "attn_bias"),
    "_scaled_dot_product_fused_attention_overrideable_backward": ((1, 2), 4, "attn_bias"),
}


#: Where each fused attention op takes its value and, for a ``_backward``,
#: its forward's output ``out``: positions from the same schemas.  The
#: backward forms dS = P o (dO v^T - rowsum(dO o out)); where a row of P is
#: nearly one-hot the two terms cancel, and codes of v and out drawn apart
#: leave their noise in the difference (see ``Kind.HALF``).  A forward op
#: names its value only: its output is not an argument (the eager engine
#: tells it by the autograd node it belongs to, :data:`ATTENTION_NODES`).
ATTENTION_VALUE_ARGS: dict[str, tuple[int, ...]] = {
    "scaled_dot_product_attention": (2,),
    "_scaled_dot_product_flash_attention_for_cpu": (2,),
    "_scaled_dot_product_flash_attention": (2,),
    "_scaled_dot_product_efficient_attention": (2,),
    "_scaled_dot_product_cudnn_attention": (2,),
    "_scaled_dot_product_fused_attention_overrideable": (2,),
    # Backward ops: (grad_out, query, key, value, ..., out, ...).
    "_scaled_dot_product_flash_attention_for_cpu_backward": (3, 4),
    "_scaled_dot_product_flash_attention_backward": (3, 4),
    "_scaled_dot_product_efficient_attention_backward": (3, 5),
    "_scaled_dot_product_cudnn_attention_backward": (3, 4),
    "_scaled_dot_product_fused_attention_overrideable_backward": (3, 6),
}

#: The autograd nodes of the fused attention kernels (the ``grad_fn`` of
#: their outputs, named after the aten ops of :data:`ATTENTION_LOGIT_OPS`):
#: a tensor saved with one of them as its ``grad_fn`` is that kernel's
#: output.  ``scaled_dot_product_attention`` itself is composite: it runs
#: one of these kernels, or matmul + softmax, whose saves belong to other
#: nodes (and whose backward recomputes nothing).
ATTENTION_NODES = frozenset(
    {"ScaledDotProductFlashAttentionForCpuBackward0", "ScaledDotProductFlashAttentionBackward0",
     "ScaledDotProductEfficientAttentionBackward0", "ScaledDotProductCudnnAttentionBackward0",
     "ScaledDotProductFusedAttentionOverrideableBackward0"}
)  # fmt: skip


def attention_value_args(op: str, args: tuple, kwargs: dict) -> tuple:
    """The value (and, for a backward op, the forward's output) among an
    attention op's arguments, positional or named as in the schema: empty
    for an op not in :data:`ATTENTION_VALUE_ARGS`."""
    where = ATTENTION_VALUE_ARGS.get(op)
    if where is None:
        return ()
    found = [args[i] for i in where if i < len(args)]
    found += [kwargs[name] for name in ("value", "out") if kwargs.get(name) is not None]
    return tuple(found)


def attention_logit_args(op: str, args: tuple, kwargs: dict) -> tuple[tuple, tuple]:
    """(query and key, mask) among an attention op's arguments: empty tuples
    for an op not in :data:`ATTENTION_LOGIT_ARGS`."""
    where = ATTENTION_LOGIT_ARGS.get(op)
    if where is None:
        return (), ()
    qk_at, mask_at, mask_kw = where
    qk = tuple(args[i] for i in qk_at if i < len(args))
    if kwargs:
        # F.scaled_dot_product_attention(query=q, key=k, value=v) reaches the
        # op tracker with its tensors named, not placed.
        qk += tuple(kwargs[name] for name in ("query", "key") if kwargs.get(name) is not None)
    mask = []
    if mask_at is not None and mask_at < len(args):
        mask.append(args[mask_at])
    if mask_kw and kwargs.get(mask_kw) is not None:
        mask.append(kwargs[mask_kw])
    return qk, tuple(mask)
