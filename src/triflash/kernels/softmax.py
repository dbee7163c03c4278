"""Shared jit helpers of the online softmax (log2 units), used by every forward kernel."""

import triton
import triton.language as tl

from .masking import _tanh


@triton.jit
def _scores_log2(qk, qk_scale, softcap_scale, HAS_SOFTCAP: tl.constexpr):
    """Raw dot products -> scores in log2 units, and tanh's value for the softcap chain rule.

    With softcap, ``s = softcap * tanh(scale * qk / softcap)``: ``softcap_scale = scale / softcap``
    and ``qk_scale = softcap * log2(e)``; without it ``qk_scale = scale * log2(e)``.
    """
    if HAS_SOFTCAP:
        t = _tanh(qk * softcap_scale)
        s = t * qk_scale
    else:
        t = qk
        s = qk * qk_scale
    return s, t


@triton.jit
def _scores_unscaled(qk, softcap_scale, HAS_SOFTCAP: tl.constexpr):
    """Raw dot products -> ``x``, the scores before their log2 scale (``s = x * qk_scale``, ``qk_scale > 0``).

    The forward keeps the scale out of the tile and folds it into the exponent's FFMA
    (``_online_softmax``): one multiply per score fewer than scaling first (``_scores_log2``).
    """
    if HAS_SOFTCAP:
        x = _tanh(qk * softcap_scale)
    else:
        x = qk
    return x


@triton.jit
def _online_softmax(x, qk_scale, m_i, l_i, MASKED: tl.constexpr):
    """One step of the online softmax over a [BLOCK_M, BLOCK_N] tile of unscaled scores ``x``.

    The scores in log2 units are ``x * qk_scale`` with ``qk_scale > 0`` (``fwd.fwd_softmax_args``), so the
    tile's row max is taken on ``x`` and scaled once per row, and ``exp2(x * qk_scale - m)`` is one FFMA
    and one MUFU per score. Masked scores are ``-inf`` in ``x``.

    Returns ``(p, alpha, m_new, l_new)``: the tile's unnormalised probabilities, the factor that
    rescales the running accumulator, and the new running max and sum (log2 units). On masked tiles a
    row that has seen nothing yet keeps 0 as its reference so that ``exp2(-inf)`` gives 0, not NaN.
    """
    m_new = tl.maximum(m_i, tl.max(x, 1) * qk_scale)
    if MASKED:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(x * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def _softmax_finish(acc, l_i, m_i, sink_ptr, h, HAS_SINK: tl.constexpr):
    """Normalise the accumulator; returns ``(out, lse)`` with lse in natural-log units.

    Rows that saw no key give 0 and ``-inf`` (exactly the sink logit when a sink is given).
    """
    empty = l_i == 0.0
    empty_lse = float("-inf")
    if HAS_SINK:
        # The sink is one more logit with no value: it joins the denominator only.
        sink = tl.load(sink_ptr + h).to(tl.float32)
        sink2 = sink * 1.4426950408889634
        m_f = tl.maximum(m_i, sink2)
        l_i = l_i * tl.math.exp2(m_i - m_f) + tl.math.exp2(sink2 - m_f)
        acc = acc * tl.math.exp2(m_i - m_f)[:, None]
        m_i = m_f
        empty_lse = sink
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, empty_lse, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    return out, lse
