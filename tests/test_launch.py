"""Kernel-launch guards: the ptxas fallback and the head-dim block rule (pure host logic, any device)."""

import pytest
from triton.runtime.errors import PTXASError

from triflash.kernels import launch as launch_mod
from triflash.kernels.fwd import head_blocks


class _FakeKernel:
    """Stands in for a JIT kernel: its build fails in ptxas when pipelined (num_stages > 1)."""

    __name__ = "_fake_kernel"

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, num_warps, num_stages, **kwargs):
            self.calls.append(num_stages)
            if num_stages > 1:
                raise PTXASError("ptxas died with SIGSEGV")
            return "ran"
        return run


def test_ptxas_failure_retries_unpipelined_once_and_remembers(monkeypatch):
    monkeypatch.setattr(launch_mod, "_FAILED", set())
    kernel = _FakeKernel()
    with pytest.warns(RuntimeWarning, match="num_stages=1"):
        assert launch_mod.launch(kernel, (1,), 3, num_warps=4, num_stages=2, BLOCK=64) == "ran"
    assert kernel.calls == [2, 1]
    # The same build again: straight to the fallback, no second ptxas run, no second warning.
    assert launch_mod.launch(kernel, (1,), 3, num_warps=4, num_stages=2, BLOCK=64) == "ran"
    assert kernel.calls == [2, 1, 1]
    # Another build (other constexprs) tries its own pipelined build first.
    with pytest.warns(RuntimeWarning):
        launch_mod.launch(kernel, (1,), 3, num_warps=4, num_stages=2, BLOCK=32)
    assert kernel.calls == [2, 1, 1, 2, 1]


def test_other_errors_are_not_swallowed(monkeypatch):
    monkeypatch.setattr(launch_mod, "_FAILED", set())

    class Broken(_FakeKernel):
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise ValueError("not a ptxas failure")
            return run

    with pytest.raises(ValueError, match="not a ptxas"):
        launch_mod.launch(Broken(), (1,), num_warps=4, num_stages=2)


@pytest.mark.parametrize("d,dv,expected", [
    (64, 64, (64, 64)), (128, 64, (128, 64)), (40, 40, (64, 64)), (8, 8, (16, 16)),
    (40, 24, (64, 64)),    # both padded, different blocks: unified (miscompiled on sm_90 otherwise)
    (40, 8, (64, 64)),
    (64, 24, (64, 64)),    # one padded, small dims: unified
    (96, 40, (128, 128)),  # both padded: unified
    (192, 128, (256, 128)),  # one padded, large dims: left alone (the V tile stays 128 wide)
    (256, 512, (256, 512)),
])
def test_head_blocks(d, dv, expected):
    assert head_blocks(d, dv) == expected


def test_config_rows_on_sm90(monkeypatch):
    """Which table row an H100 gets (host logic, the arch faked): fp32 takes the small rows that fit."""
    import torch

    from triflash import configs

    monkeypatch.setattr(configs, "device_arch", lambda device: 90)
    dev = torch.device("cpu")
    fwd, bwd = configs.pick_attn_fwd_config, configs.pick_attn_bwd_config
    assert fwd(dev, 128, 128, torch.bfloat16, False) == configs.AttnFwdConfig(128, 128, 8, 3)
    assert fwd(dev, 40, 24, torch.bfloat16, False) == configs._SM90_SMALL_DIM_FWD
    assert fwd(dev, 128, 128, torch.bfloat16, False, rows=8).block_m == 16  # decode rows shrink to the problem
    # decode: split programs over a contiguous cache, over a paged one, unsplit programs (three tables)
    assert fwd(dev, 128, 128, torch.bfloat16, False, rows=4, split=True) == configs.AttnFwdConfig(16, 64, 4, 3)
    assert fwd(dev, 128, 128, torch.bfloat16, False, rows=4) == configs.AttnFwdConfig(16, 128, 4, 3)
    assert fwd(dev, 128, 128, torch.bfloat16, False, rows=4, paged=True) == configs.AttnFwdConfig(16, 128, 4, 3)
    split_paged = fwd(dev, 128, 128, torch.bfloat16, False, rows=4, paged=True, split=True)
    assert split_paged == configs.AttnFwdConfig(16, 128, 4, 3)
    assert fwd(dev, 256, 256, torch.float32, False) == configs.AttnFwdConfig(32, 32, 4, 1)
    assert fwd(dev, 256, 256, torch.float32, False, rows=8) == configs.AttnFwdConfig(32, 32, 4, 1)
    assert bwd(dev, 256, 256, torch.float32, False) == configs.AttnBwdConfig(16, 16, 4, 1)
    assert bwd(dev, 128, 128, torch.float16, False) == configs.AttnBwdConfig(64, 64, 4, 2)


def test_int_and_arg_spec_separate_what_triton_specializes():
    """``launch_cached``'s key: what selects a compiled kernel (an int's 1 / divisibility by 16 / width, a
    tensor's dtype and 16-byte alignment, a descriptor's block and layout), not the values themselves."""
    import torch

    spec = launch_mod._arg_spec
    assert spec(1) == 1 and spec(1) != spec(2)
    assert spec(32) == spec(48) != spec(33)
    assert spec(16) != spec(16 << 32)  # i32 against i64
    assert spec(2.0) == spec(0.5)
    x = torch.empty(64, dtype=torch.bfloat16)
    assert spec(x) == spec(torch.empty(8, dtype=torch.bfloat16)) != spec(x.float())
    assert spec(x[1:]) != spec(x)  # 2 bytes off: not 16-byte aligned
    assert spec(True) != spec(False) and spec(None) == spec(None)
    layout = object()
    d = launch_mod.TmaDesc(x.view(8, 8), (8, 8), (8, 1), (8, 8), layout)
    assert spec(d) == spec(launch_mod.TmaDesc(x.view(8, 8)[:4], (4, 8), (8, 1), (8, 8), layout))
    assert spec(d) != spec(launch_mod.TmaDesc(x.view(8, 8), (8, 8), (8, 1), (4, 8), layout))


def test_tma_desc_full_is_gluons_descriptor():
    import torch
    from triton.experimental.gluon import language as gl

    x = torch.empty(4, 128, 2, 64, dtype=torch.bfloat16)
    layout = gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16)
    full = launch_mod.TmaDesc(x, (512, 128), (128, 1), (64, 64), layout).full()
    assert (full.base is x and full.shape == [512, 128] and full.strides == [128, 1] and full.block_shape == [64, 64]
            and full.layout is layout and full.padding == "zero")


def test_trailing_constexprs():
    """The fast path passes the constexprs after the runtime arguments, so it is taken only when the kernel's
    signature has them last; defaults fill the ones not given."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    def last(x, n, A: tl.constexpr, B: tl.constexpr = 3):
        pass

    def mixed(x, A: tl.constexpr, n):
        pass

    assert launch_mod._trailing_constexprs(JITFunction(last), 2, {"A": 5, "num_warps": 4}) == (5, 3)
    assert launch_mod._trailing_constexprs(JITFunction(mixed), 2, {"A": 5}) is None


def test_launch_cached_without_a_jit_kernel_launches_plainly():
    """Kernels that are not JIT functions (the interpreter's) go to ``kernel[grid]``, descriptors in full."""
    import torch
    from triton.experimental.gluon import language as gl

    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((grid, args, kwargs))

    x = torch.empty(8, 8, dtype=torch.bfloat16)
    d = launch_mod.TmaDesc(x, (8, 8), (8, 1), (8, 8), gl.NVMMASharedLayout.get_default_for([8, 8], gl.bfloat16))
    launch_mod.launch_cached(Kernel(), (2,), d, 7, BLOCK=4)
    (grid, args, kwargs), = seen
    assert grid == (2,) and args[1] == 7 and kwargs == {"BLOCK": 4} and args[0].base is x
    assert type(args[0]).__name__ == "TensorDescriptor"


def test_hooked_reads_an_empty_hook_chain_as_unset():
    """Triton 3.6's default launch hooks are an empty ``HookChain``: the fast path must not count it as a hook
    (it did once, and every launch went back through ``JITFunction.run``), but must count one with a call."""
    from triton.knobs import HookChain

    chain = HookChain()
    assert not launch_mod._hooked(None) and not launch_mod._hooked(chain)
    chain.add(print)
    assert launch_mod._hooked(chain) and launch_mod._hooked(print)
