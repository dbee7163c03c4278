"""The installed package's metadata (dependencies, extras, entry points) and the README's integration examples.

Reads ``importlib.metadata``, i.e. what ``pip install`` recorded: after editing pyproject.toml, reinstall
(``pip install -e . --no-deps``) or these fail on stale metadata.
"""

import re
import types
from importlib.metadata import distribution, entry_points, version
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from triflash.integrations import sdpa

README = Path(__file__).resolve().parents[1] / "README.md"
INTEGRATIONS = {"transformers", "sdpa"}
COMPAT = {"fa2", "fa3", "vllm"}


def _requirements():
    """{extra or "": [Requirement]} of the installed distribution."""
    out = {}
    for line in distribution("triflash").requires or []:
        req = Requirement(line)
        extra = ""
        if req.marker is not None:
            found = re.search(r'extra\s*==\s*"([^"]+)"', str(req.marker))
            extra = found.group(1) if found else ""
        out.setdefault(extra, []).append(req)
    return out


def test_core_dependencies_have_lower_bounds_the_install_meets():
    core = {r.name: r for r in _requirements()[""]}
    for name in ("torch", "triton"):
        assert name in core, f"{name}: not a dependency"
        assert any(spec.operator == ">=" for spec in core[name].specifier), f"{name}: no lower bound"
        installed = version(name).split("+")[0]
        assert core[name].specifier.contains(installed, prereleases=True), f"{name} {installed} vs {core[name]}"


def test_extras_for_tests_benchmarks_and_each_integration():
    reqs = _requirements()
    for extra in ("test", "bench", *INTEGRATIONS):
        assert reqs.get(extra), f"extra [{extra}] missing or empty"
    names = {extra: {r.name: r for r in reqs[extra]} for extra in reqs}
    assert {"pytest", "pytest-xdist"} <= set(names["test"])
    # the [sdpa] extra asks for the torch whose hook the code checks for
    assert str(names["sdpa"]["torch"].specifier) == f">={sdpa.MIN_TORCH}"
    assert names["transformers"]["transformers"].specifier == names["test"]["transformers"].specifier


def test_one_integration_entry_point_each_loading_its_register():
    eps = {ep.name: ep for ep in entry_points(group="triflash.integrations")}
    assert set(eps) == INTEGRATIONS
    for name, ep in eps.items():
        fn = ep.load()
        assert callable(fn) and fn.__name__ == "register", name
        assert fn.__module__ == f"triflash.integrations.{name}"


def test_compat_entry_points_load_their_modules():
    eps = {ep.name: ep for ep in entry_points(group="triflash.compat")}
    assert set(eps) == COMPAT
    for name, ep in eps.items():
        module = ep.load()
        assert isinstance(module, types.ModuleType) and module.__name__ == f"triflash.compat.{name}"
        assert callable(module.flash_attn_varlen_func), name


def test_console_script():
    (ep,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "triflash-bench"]
    assert ep.value == "triflash.bench.cli:main" and callable(ep.load())


def _integration_examples():
    """The python blocks of the README's integration section ("Switching from FlashAttention or vLLM")."""
    text = README.read_text()
    start = text.index("## Switching from FlashAttention or vLLM")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def test_readme_has_a_complete_example_for_each_integration():
    """Every entry point has an example that compiles and whose triflash imports resolve (the gpu tier runs them)."""
    blocks = _integration_examples()
    for name in INTEGRATIONS:
        assert any(f"triflash.integrations.{name}" in b or f"from triflash.integrations import {name}" in b
                   for b in blocks), f"no README example for the {name} integration"
    for name in COMPAT:
        assert any(f"triflash.compat.{name}" in b for b in blocks), f"no README example for compat.{name}"
    for block in blocks:
        compile(block, "README.md", "exec")
        for module, names in re.findall(r"^from (triflash[\w.]*) import ([\w, ]+)", block, re.M):
            imported = __import__(module, fromlist=["_"])
            for attr in (n.strip() for n in names.split(",")):
                assert hasattr(imported, attr), f"README: {module} has no {attr}"


@pytest.mark.gpu
def test_gpu_readme_integration_examples_run():
    for i, block in enumerate(_integration_examples()):
        exec(compile(block, f"README.md example {i}", "exec"), {"__name__": "__readme__"})
    assert torch.nn.attention.current_flash_attention_impl() is None  # the SDPA example restored
