"""The tolerance rule of SPEC.md §6, as a test helper.

A kernel result passes when ``max|out - ref| <= k * max|pt - ref| + atol`` where ``ref`` is the
high-precision reference, ``pt`` the reference run in the input dtype with the scale applied to k
(a measure of that dtype's own error), ``k`` is 2 for outputs and 3 for gradients, and ``atol`` is
twice the rounding error of the output dtype at the output's magnitude (``eps * max|ref|``).
"""

import torch

_EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}


def _maxabs(x):
    return x.abs().max().item() if x.numel() else 0.0


def assert_close(name, out, ref, pt, factor=2.0, fp32_sums=1):
    """Assert the SPEC §6 rule for one tensor; NaN anywhere fails. ``fp32_sums``: ``out`` is the sum of that many
    results, each a kernel's under the rule, added in fp32 (ring attention's dK/dV): each addition after the first
    may round once more, by half an fp32 ulp at the output's magnitude, which the rule's ``atol`` then allows."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64, ref64, pt64 = out.double(), ref.double(), pt.double()
    finite = torch.isfinite(ref64)
    # -inf LSE rows must match exactly; everything else by the rule.
    assert torch.equal(torch.isfinite(out64), finite), f"{name}: non-finite pattern differs from ref"
    if out.numel() == 0:
        return
    err = _maxabs((out64 - ref64)[finite])
    pt_err = _maxabs((pt64 - ref64)[finite])
    eps = 2.0 * 0.5 * _EPS[out.dtype] + 0.5 * (fp32_sums - 1) * _EPS[torch.float32]
    atol = eps * max(_maxabs(ref64[finite]), 1e-6)
    bound = factor * pt_err + atol
    assert err <= bound, f"{name}: max err {err:.3e} > {factor} * {pt_err:.3e} + {atol:.3e}"
