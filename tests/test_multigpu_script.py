"""The multi-GPU ring benchmark's launcher and script, on CPU.

``scripts/ring_bench.py --cpu --smoke`` runs 2 gloo ranks under torchrun through Triton's interpreter
(tiny sizes: the short full-reference check, the long-length invariants and spot checks, the timing and
the JSONL rows); ``scripts/multigpu_ring.sh --dry-run`` prints its torchrun commands for a faked GPU
count (``NGPUS``), and ``--cpu`` runs the whole launcher (budget skip and summary included).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TIMEOUT_S = 150  # each run takes about 10 s


def _env(**extra):
    """The caller's environment without the NVLink variables: the scripts must set them themselves."""
    env = {k: v for k, v in os.environ.items() if k not in NVLS_OFF and k not in ("NGPUS", "OUT", "TORCHRUN")}
    env["PYTHONPATH"] = str(REPO / "src")
    env.update(extra)
    return env


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _check_row_common(row):
    assert row["world"] == 2 and row["causal"] is True and row["layout"] == "zigzag"
    assert row["env"]["TRITON_INTERPRET"] == "1" and row["backend"] == "gloo"
    assert {k: row["env"][k] for k in NVLS_OFF} == NVLS_OFF
    for key in ("device", "torch", "triton", "git_sha", "date"):
        assert key in row


def test_ring_bench_smoke_torchrun(tmp_path):
    out = tmp_path / "ring.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "scripts" / "ring_bench.py"), "--cpu", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(out)
    assert [r["kind"] for r in rows] == ["check", "ring", "ring"]
    for r in rows:
        _check_row_common(r)
        assert r["ok"] is True, r
    check = rows[0]
    assert check["S"] == 32 and check["spec_ok"] and check["invariants"]["ok"]
    assert len(check["per_rank"]) == 2
    for per_rank in check["per_rank"]:
        assert set(per_rank["checks"]) == {"out", "lse", "dq", "dk", "dv"}
        assert all(c["ok"] and c["err"] <= c["bound"] for c in per_rank["checks"].values())
    for r, s in zip(rows[1:], (64, 128)):
        assert (r["S"], r["S_local"], r["H"], r["Hk"], r["D"], r["dtype"]) == (s, s // 2, 2, 1, 16, "bf16")
        inv = r["invariants"]
        assert inv["finite"] and inv["dv_sum_ok"] and inv["scale_id_ok"] and inv["fwd_reproducible"]
        spot = r["spot"]
        assert spot["ok"] and len(spot["per_rank"]) == 2 and spot["worst_ratio"] <= 1
        assert {"head_out", "head_dq", "tail_out", "tail_lse", "tail_dq", "tail_dk", "tail_dv"} <= set(
            spot["per_rank"][0]["checks"])  # rank 0 holds the sequence's last keys
        assert "tail_dk" not in spot["per_rank"][1]["checks"]
        for key in ("fwd_ms", "fwdbwd_ms", "single_fwd_ms", "single_fwdbwd_ms", "blocks_fwd_ms", "tflops_fwd",
                    "tflops_fwdbwd", "single_tflops_fwd", "eff_fwd", "eff_fwdbwd", "eff_blocks_fwdbwd"):
            assert r[key] is not None and r[key] > 0, key
        assert len(r["fwd_ms_reps"]) == 2 and r["mem_gib"] is None  # no CUDA memory on CPU
        assert r["eff_fwd"] == pytest.approx(2 * r["single_fwd_ms"] / r["fwd_ms"])
        flops_gpu = 4 * s * s * 2 * 16 / 2 / 2
        assert r["tflops_fwd"] == pytest.approx(flops_gpu / (r["fwd_ms"] * 1e-3) / 1e12)


def _dry_run(ngpus, *args):
    proc = subprocess.run(["bash", str(REPO / "scripts" / "multigpu_ring.sh"), "--dry-run", *args], cwd=REPO,
                          env=_env(NGPUS=str(ngpus)), capture_output=True, text=True, timeout=60)
    lines = [ln for ln in proc.stdout.splitlines() if "torch.distributed.run" in ln or "torchrun" in ln]
    return proc, lines


@pytest.mark.parametrize(("ngpus", "worlds"), [(8, [8, 4, 2]), (7, [4, 2]), (4, [4, 2]), (3, [2]), (2, [2])])
def test_launcher_dry_run(ngpus, worlds):
    proc, lines = _dry_run(ngpus)
    assert proc.returncode == 0, proc.stderr
    assert [int(re.search(r"--nproc_per_node=(\d+)", ln).group(1)) for ln in lines] == worlds
    for ln in lines:
        words = ln.split()
        assert all(f"{k}={v}" in words for k, v in NVLS_OFF.items()), ln
        assert words[0] == "env" and "timeout" in words and "--standalone" in words
        assert words.index("timeout") < min(i for i, w in enumerate(words) if "torch" in w)
        assert "scripts/ring_bench.py" in ln and "--time-budget-s" in words and "--out" in words
        assert "--cpu" not in words


def test_launcher_arguments():
    proc, lines = _dry_run(8, "--worlds", "2,8", "--budget", "300", "--", "--lengths", "64k", "--no-spot")
    assert proc.returncode == 0, proc.stderr
    assert [re.search(r"--nproc_per_node=(\d+)", ln).group(1) for ln in lines] == ["8", "2"]
    assert all(ln.rstrip().endswith("--lengths 64k --no-spot") for ln in lines)
    budgets = [int(re.search(r"--time-budget-s (\d+)", ln).group(1)) for ln in lines]
    assert sum(budgets) < 300
    proc, lines = _dry_run(1)
    assert proc.returncode == 2 and not lines and "at least 2" in proc.stderr
    proc, _ = _dry_run(8, "--bogus")
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


def test_launcher_cpu_run(tmp_path):
    """The whole launcher on CPU: env capture, one torchrun, a length skipped by the budget, the summary."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "multigpu_ring.sh"), "--cpu", "--", "--lengths", "64,128",
                           "--time-budget-s", "1"], cwd=REPO, env=_env(OUT=str(tmp_path), PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(tmp_path / "ring.jsonl")
    assert [(r["kind"], r["S"]) for r in rows] == [("check", 32), ("ring", 64), ("skipped", 128)]
    for r in rows:
        _check_row_common(r)
    assert "time budget" in rows[2]["reason"]
    assert (tmp_path / "ring_w2.log").is_file() and (tmp_path / "ring_env.txt").is_file()
    env_txt = (tmp_path / "ring_env.txt").read_text()
    assert all(f"{k}={v}" in env_txt for k, v in NVLS_OFF.items())
    summary = proc.stdout.split("---- summary", 1)[1]
    assert "eff f" in summary and "skipped" in summary and "world 2 rc=0" in summary
