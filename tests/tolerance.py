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


def assert_close(name, out, ref, pt, factor=2.0):
    """Assert the SPEC §6 rule for one tensor; NaN anywhere fails."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64, ref64, pt64 = out.double(), ref.double(), pt.double()
    finite = torch.isfinite(ref64)
    # -inf LSE rows must match exactly; everything else by the rule.
    assert torch.equal(torch.isfinite(out64), finite), f"{name}: non-finite pattern differs from ref"
    if out.numel() == 0:
        return
    err = _maxabs((out64 - ref64)[finite])
    pt_err = _maxabs((pt64 - ref64)[finite])
    atol = 2.0 * 0.5 * _EPS[out.dtype] * max(_maxabs(ref64[finite]), 1e-6)
    bound = factor * pt_err + atol
    assert err <= bound, f"{name}: max err {err:.3e} > {factor} * {pt_err:.3e} + {atol:.3e}"
