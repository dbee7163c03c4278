"""triflash: FlashAttention for PyTorch, written in Triton, tuned for NVIDIA Hopper.

The public API keeps FlashAttention's names and layouts (SPEC: ``flash_attn_func``,
``flash_attn_varlen_func``, ``flash_attn_with_kvcache``, ``flash_attn_combine``); ``attention_ref``
is the pure-PyTorch definition they are tested against.
"""

from .interface import flash_attn_func, flash_attn_varlen_func
from .ref import attention_ref
from .serving import flash_attn_combine, flash_attn_with_kvcache

__version__ = "0.1.0"

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "flash_attn_combine",
           "attention_ref", "__version__"]
