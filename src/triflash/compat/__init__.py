"""Drop-in entry points with the exact names, argument order and return conventions of other
FlashAttention packages, so that switching is a one-line import change:

- ``triflash.compat.fa2``: ``flash_attn`` (FlashAttention-2, ``flash_attn.flash_attn_interface``).
- ``triflash.compat.fa3``: ``flash_attn_interface`` (FlashAttention-3, ``hopper/``).
- ``triflash.compat.vllm``: ``vllm_flash_attn`` (vLLM's fork).

Every function maps onto triflash's public ``flash_attn_func`` / ``flash_attn_varlen_func`` /
``flash_attn_with_kvcache``: same kernels, same validation (``ValueError``/``TypeError``), and
``NotImplementedError`` naming any argument whose feature triflash does not have (dropout, ALiBi...).
Each module's docstring lists what differs from the original.
"""

from . import fa2, fa3, vllm

__all__ = ["fa2", "fa3", "vllm"]
