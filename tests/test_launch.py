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

    monkeypatch.setattr(configs, "_arch", lambda device: 90)
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
