"""triflash as a Hugging Face ``transformers`` attention implementation.

``register()`` adds ``triflash_attention_forward`` to transformers' ``AttentionInterface`` (and the SDPA mask
builder to ``AttentionMaskInterface``, when that exists) so that a model runs on triflash with::

    from triflash.integrations.transformers import register
    name = register()  # "trifa_attention"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)

The name must not contain "flash": transformers treats such names as FlashAttention packages (its
``is_flash_attention_requested`` tests ``"flash" in name``), so the default is "trifa_attention", not
"triflash_attention".

Masks the function accepts (anything else raises ``NotImplementedError``, never a silent ignore):

- ``None``: causal (or not, per ``is_causal`` / ``module.is_causal``). When ``Sq > 1`` and ``Sk > Sq`` with no
  mask (transformers' empty-StaticCache prefill) the keys are cut to ``Sq`` as SDPA does.
- a 2-D padding mask ``(B, Sk)`` (bool or 0/1): True = real token; the last ``Sq`` columns are the queries.
- a 4-D mask ``(B or 1, 1 or H, Sq, Sk)``, boolean (True = attend) or additive (0 = attend, large negative =
  masked), whose pattern is exactly "padding + causal (+ sliding window)" in the compacted real tokens, with the
  rows of padded queries empty. ``triflash_attention_mask`` builds such masks (``sdpa_mask``, whose right-padded
  query rows still attend the real tokens before them, with those rows cleared). This covers left padding
  (generation), right padding, static caches and decoding. The pattern is checked on the host (one device sync
  per call with a mask). A block-diagonal mask is accepted where ``position_ids`` show the same packing (below);
  a bidirectional-island or biased mask fails the check and raises.

Padded batches are unpadded into varlen form (``cu_seqlens`` over the real tokens), run through
``flash_attn_varlen_func`` and scattered back; padded query rows are zero. Packed batches run varlen too, given
either as ``cu_seq_lens_q/k`` + ``max_length_q/k`` kwargs (``DataCollatorWithFlattening``) or as ``position_ids``
that restart inside a row (``Sq == Sk``, no padding). A sequence starts at each row start and wherever a position
does not follow its predecessor by 1 (transformers' ``find_packed_sequence_indices``, so the split is the one of
the block-diagonal mask transformers builds without a cache). As in transformers' FlashAttention path, packing is
also read from ``position_ids`` when the mask shows none (with a cache, or in models such as gpt-oss that do not
pass ``position_ids`` to their mask builders), where sdpa and eager attend across the packed sequences. Reading
``position_ids`` costs one device sync per call with ``Sq == Sk > 1`` and no padding, and a graph break under
``torch.compile``.
Also handled: GQA (native), ``sliding_window`` (module attribute or kwarg; transformers' window of ``w`` tokens
including the current one = ``window_size=(w - 1, 0)``), ``softcap`` (kwarg or
``module.config.attn_logit_softcapping``), ``module.sinks`` (gpt-oss) as ``learnable_sink``. Dropout > 0 and
``output_attentions`` are not supported (no attention weights are returned).
"""

from __future__ import annotations

import torch

from ..interface import flash_attn_func, flash_attn_varlen_func

__all__ = ["register", "triflash_attention_forward", "triflash_attention_mask"]

DEFAULT_NAME = "trifa_attention"


def _softcap(module, kwargs):
    cap = kwargs.get("softcap")
    if cap is None:
        cap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    return float(cap) if cap else 0.0


def _window(module, kwargs, causal):
    w = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if w is None:
        return (-1, -1)
    return (int(w) - 1, 0 if causal else int(w) - 1)


def _mask_to_bool(mask):
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        neg = mask < torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | neg).all()):
            raise NotImplementedError("trifa_attention: additive attention masks with a bias (values other than "
                                      "0 and -inf/finfo.min) are not supported")
        return ~neg
    return mask != 0


def _validity(mask, sq, sk, causal, window, seg=None):
    """(q_valid (B, Sq), kv_valid (B, Sk)) from a padding or 4-D mask, or None if the 4-D pattern is not ours.

    With ``seg`` (B, S) packed-sequence ids, the pattern is causal/window within each packed sequence instead.
    """
    mask = _mask_to_bool(mask)
    if mask.dim() == 2:
        if mask.shape[1] < sk:
            raise NotImplementedError(f"trifa_attention: 2-D mask of {mask.shape[1]} columns for {sk} keys")
        kv_valid = mask[:, -sk:]
        return kv_valid[:, -sq:], kv_valid
    if mask.dim() != 4 or mask.shape[-2:] != (sq, sk):
        raise NotImplementedError(f"trifa_attention: attention_mask of shape {tuple(mask.shape)} for Sq={sq}, "
                                  f"Sk={sk}; expected (B, Sk) or (B, 1, Sq, Sk)")
    if mask.shape[1] != 1:
        if not bool((mask == mask[:, :1]).all()):
            raise NotImplementedError("trifa_attention: per-head attention masks are not supported")
        mask = mask[:, :1]
    m = mask[:, 0]  # [B, Sq, Sk]
    kv_valid, q_valid = m.any(dim=1), m.any(dim=2)
    lq, lk = q_valid.sum(1, keepdim=True), kv_valid.sum(1, keepdim=True)
    ci = (q_valid.cumsum(1) - 1)[:, :, None] + (lk - lq)[:, :, None]  # query pos in compacted key coordinates
    cj = (kv_valid.cumsum(1) - 1)[:, None, :]
    expected = q_valid[:, :, None] & kv_valid[:, None, :]
    left, right = window
    if causal or right >= 0:
        expected = expected & (cj <= ci + max(right, 0))
    if left >= 0:
        expected = expected & (cj >= ci - left)
    if seg is not None:
        expected = expected & (seg[:, :, None] == seg[:, None, :])
    if not bool((expected == m).all()):
        return None
    return q_valid, kv_valid


def _packed(position_ids, b, sq, sk):
    """(seg (B, S) sequence ids, cu_seqlens int32, max length) of sequences packed via ``position_ids``, or None.

    None when the rows hold one sequence each (or the shapes cannot be packed: ``Sq != Sk``, decoding, 3-D M-RoPE
    positions). One device sync: the start flags are read on the host.
    """
    if (position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] not in (1, b)
            or position_ids.shape[1] != sq or sq != sk or sq < 2):
        return None
    pos = position_ids.expand(b, sq)
    start = torch.ones(b, sq, dtype=torch.bool, device=pos.device)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    starts = start.reshape(-1).cpu().nonzero().squeeze(1)
    if starts.numel() == b:
        return None
    cu = torch.cat([starts, starts.new_tensor([b * sq])]).to(torch.int32)
    return start.cumsum(1), cu.to(pos.device), int(cu.diff().max())


def _cu(lengths):
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def triflash_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               is_causal=None, **kwargs):
    """transformers attention function: query/key/value ``(B, H|Hk, S, D)``; returns ``((B, Sq, H, Dv), None)``."""
    if dropout and dropout > 0.0:
        raise NotImplementedError("trifa_attention: attention dropout > 0 is not supported")
    if kwargs.get("output_attentions", False):
        raise NotImplementedError("trifa_attention: output_attentions=True is not supported (use 'eager')")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    opts = dict(softmax_scale=scaling, softcap=_softcap(module, kwargs), window_size=_window(module, kwargs, causal),
                learnable_sink=getattr(module, "sinks", None))
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, S, H, D)
    b, sq, h, _ = q.shape
    sk = k.shape[1]

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and attention_mask is None:
        if b != 1:
            raise NotImplementedError("trifa_attention: cu_seq_lens_* need a batch of 1 (packed sequences)")
        out = flash_attn_varlen_func(q[0], k[0], v[0], cu_q.to(torch.int32), cu_k.to(torch.int32),
                                     kwargs.get("max_length_q"), kwargs.get("max_length_k"), causal=causal, **opts)
        return out.unsqueeze(0), None

    window = opts["window_size"]
    valid = None if attention_mask is None else _validity(attention_mask, sq, sk, causal, window)
    padded = valid is not None and not (bool(valid[0].all()) and bool(valid[1].all()))
    # Without padding, read packing from position_ids: transformers builds the block-diagonal mask of packed
    # position_ids only without a cache (some models, gpt-oss among them, never do); FlashAttention reads them too.
    packed = None if padded else _packed(kwargs.get("position_ids"), b, sq, sk)
    if attention_mask is not None and valid is None:  # ours only as the block-diagonal mask of that packing
        seg_valid = None if packed is None else _validity(attention_mask, sq, sk, causal, window, seg=packed[0])
        if seg_valid is None or not (bool(seg_valid[0].all()) and bool(seg_valid[1].all())):
            raise NotImplementedError("trifa_attention: the attention mask is not a padding + causal/sliding-window "
                                      "pattern, nor the block-diagonal mask of sequences packed via position_ids "
                                      "(e.g. bidirectional blocks); use attn_implementation='sdpa' or 'eager' for "
                                      "such masks")
    elif packed is None and not padded:
        if attention_mask is None and causal and 1 < sq < sk:  # empty StaticCache prefill: SDPA's top-left causal
            k, v = k[:, :sq], v[:, :sq]  # = the first Sq keys
        return flash_attn_func(q, k, v, causal=causal, **opts), None
    if packed is not None:
        _, cu, max_len = packed
        out = flash_attn_varlen_func(q.reshape(b * sq, h, -1), k.reshape(b * sk, k.shape[2], -1),
                                     v.reshape(b * sk, v.shape[2], -1), cu, cu, max_len, max_len, causal=causal,
                                     **opts)
        return out.view(b, sq, h, -1), None

    q_valid, kv_valid = valid[0].expand(b, sq), valid[1].expand(b, sk)
    idx_q = q_valid.reshape(-1).nonzero().squeeze(1)
    idx_k = kv_valid.reshape(-1).nonzero().squeeze(1)
    len_q, len_k = q_valid.sum(1), kv_valid.sum(1)
    out_un = flash_attn_varlen_func(
        q.reshape(b * sq, h, -1).index_select(0, idx_q),
        k.reshape(b * sk, k.shape[2], -1).index_select(0, idx_k),
        v.reshape(b * sk, v.shape[2], -1).index_select(0, idx_k),
        _cu(len_q), _cu(len_k), int(len_q.max()), int(len_k.max()), causal=causal, **opts)
    out = out_un.new_zeros(b * sq, h, out_un.shape[-1]).index_copy(0, idx_q, out_un)
    return out.view(b, sq, h, -1), None


def triflash_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                            attention_mask=None, **kwargs):
    """Mask builder: transformers' SDPA mask (None for plain causal, else 4-D boolean), which the forward checks.

    The rows of padded queries are cleared as well: ``sdpa_mask`` masks padded keys only, so a right-padded query
    row would attend the real tokens before it and look like a real query to the forward's pattern check.
    """
    from transformers.masking_utils import prepare_padding_mask, sdpa_mask

    if mask_function is not None:
        kwargs["mask_function"] = mask_function
    mask = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)
    if mask is None or attention_mask is None or attention_mask.dim() != 2:
        return mask
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset).to(device=mask.device, dtype=torch.bool)
    q_idx = (torch.arange(q_length, device=mask.device) + q_offset).clamp(max=padding.shape[-1] - 1)  # absolute
    return mask & padding[:, q_idx][:, None, :, None]


def register(name: str = DEFAULT_NAME) -> str:
    """Register triflash with transformers under ``name`` (must not contain "flash"); returns the name."""
    if "flash" in name.lower():
        raise ValueError(f"name={name!r}: transformers treats names containing 'flash' as FlashAttention packages; "
                         f"pick another, e.g. {DEFAULT_NAME!r}")
    from transformers import AttentionInterface

    AttentionInterface.register(name, triflash_attention_forward)
    try:
        from transformers import AttentionMaskInterface
    except ImportError:
        AttentionMaskInterface = None
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(name, triflash_attention_mask)
    return name
