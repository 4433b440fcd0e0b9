"""Fused CPU codecs: the reference codecs' arithmetic compiled by TorchInductor."""
