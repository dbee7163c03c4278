"""Adapters that plug triflash into other libraries: ``transformers`` (an attention implementation) and ``sdpa``
(PyTorch's flash-attention registry, behind ``F.scaled_dot_product_attention`` and ``varlen_attn``)."""
