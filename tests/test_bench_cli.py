"""CPU tests of ``triflash-bench``'s pure parts: parsing, shapes, FLOPs, rows, tables, plots.

No kernel runs here: the sweep is driven with fake providers and a fake timer.
"""

import argparse
import json

import pytest
import torch

from triflash.bench import cli, plot


@pytest.mark.parametrize(("text", "expected"), [
    ("128", [(128, 128)]),
    ("192-128", [(192, 128)]),
    ("64, 128", [(64, 64), (128, 128)]),
    ("64,192-128", [(64, 64), (192, 128)]),
])
def test_parse_headdims(text, expected):
    assert cli.parse_headdims(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "64-", "-64", "0", "64-x"])
def test_parse_headdims_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_headdims(text)


def test_parse_counts_and_window():
    assert cli.parse_seqlens("512,1k,16K") == [512, 1024, 16384]
    assert cli.parse_window("256,0") == (256, 0)
    assert cli.parse_window("-1,-1") == (-1, -1)
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_window("256")
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_providers("triflash,nope")


def test_defaults_are_the_flashattention_sweep():
    args = cli.parse_args([])
    assert args.command == "run"
    assert args.seqlens == list(cli.SWEEP_SEQLENS)
    assert args.headdims == list(cli.SWEEP_HEADDIMS)
    assert args.causals == (False, True)
    assert args.ops == ("fwd", "bwd")
    assert args.torch_dtype == torch.bfloat16
    assert (args.total_tokens, args.model_dim, args.gqa_ratio, args.window) == (16384, 2048, 1, (-1, -1))
    assert args.providers == list(cli.PROVIDERS)
    assert str(args.out) == "bench_results.jsonl"
    assert cli.parse_args(["run"]).seqlens == args.seqlens


def test_quick_and_explicit_flags():
    quick = cli.parse_args(["--quick"])
    assert (quick.seqlens, quick.headdims) == (list(cli.QUICK_SEQLENS), list(cli.QUICK_HEADDIMS))
    args = cli.parse_args(["run", "--quick", "--seqlen", "2k", "--headdim", "64,128", "--headdim", "192-128",
                           "--causal", "yes", "--mode", "fwd", "--dtype", "fp16", "--window=-1,0",
                           "--providers", "triflash,cudnn"])
    assert args.seqlens == [2048]
    assert args.headdims == [(64, 64), (128, 128), (192, 128)]
    assert (args.causals, args.ops, args.torch_dtype) == ((True,), ("fwd",), torch.float16)
    assert args.window == (-1, 0)
    assert args.providers == ["triflash", "cudnn"]


@pytest.mark.parametrize("argv", [
    ["--batch", "2", "--total-tokens", "4096"],
    ["--nheads", "8", "--model-dim", "1024"],
    ["--nheads", "6", "--gqa-ratio", "4"],
    ["--check-only", "--no-check"],
    ["--causal", "maybe"],
])
def test_bad_flags_exit(argv):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)


def test_plot_subcommand_parses(tmp_path):
    args = cli.parse_args(["plot", str(tmp_path / "r.jsonl"), "--out-dir", str(tmp_path)])
    assert (args.command, args.results, args.out_dir) == ("plot", tmp_path / "r.jsonl", tmp_path)


def test_sweep_cases_follow_the_convention():
    cases = cli.sweep_cases(cli.parse_args([]))
    assert len(cases) == 3 * 2 * 6
    by_shape = {(c.headdim, c.causal, c.seqlen): c for c in cases}
    case = by_shape[(128, True, 4096)]
    assert (case.batch, case.nheads, case.nheads_k, case.varlen) == (4, 16, 16, False)
    assert by_shape[(64, False, 16384)].batch == 1
    gqa = cli.sweep_cases(cli.parse_args(["--headdim", "192-128", "--seqlen", "1k", "--gqa-ratio", "4"]))
    assert [(c.nheads, c.nheads_k, c.headdim, c.headdim_v) for c in gqa] == [(8, 2, 192, 128)] * 2
    fixed = cli.sweep_cases(cli.parse_args(["--batch", "3", "--nheads", "5", "--seqlen", "100", "--causal", "no"]))
    assert [(c.batch, c.nheads) for c in fixed] == [(3, 5)] * 3


def _case(**kw):
    shape = {"batch": 4, "seqlen": 4096, "nheads": 16, "nheads_k": 16, "headdim": 128, "headdim_v": 128}
    return cli.Case(**{**shape, "causal": False, **kw})


def test_flops_formula():
    dense = 4 * 4 * 16 * 4096**2 * 128
    assert cli.attn_flops(_case(), "fwd") == dense
    assert cli.attn_flops(_case(causal=True), "fwd") == dense / 2
    assert cli.attn_flops(_case(), "bwd") == 2.5 * dense
    assert cli.attn_flops(_case(headdim=192), "fwd") == 2 * 4 * 16 * 4096**2 * (192 + 128)
    varlen = _case(batch=2, seqlens=(1000, 3000))
    assert cli.attn_flops(varlen, "fwd") == 4 * 16 * (1000**2 + 3000**2) * 128


def _brute_pairs(seqlen, causal, window):
    left, right = (None if w == -1 else w for w in window)
    if causal:
        right = 0 if right is None else min(right, 0)
    return sum(1 for i in range(seqlen) for j in range(seqlen)
               if (left is None or j >= i - left) and (right is None or j <= i + right))


@pytest.mark.parametrize(("causal", "window"), [
    (False, (1, 0)), (False, (3, 2)), (True, (5, -1)), (True, (2, 3)), (False, (-1, 4)), (False, (2, -2)),
])
def test_window_pairs_are_exact(causal, window):
    assert cli.visible_pairs(37, causal, window) == _brute_pairs(37, causal, window)


def test_random_seqlens_sum_to_total():
    lens = cli.random_seqlens(1000, 16000, seed=3)
    assert len(lens) == 16 and sum(lens) == 16000 and all(400 <= n <= 1600 for n in lens)
    assert lens == cli.random_seqlens(1000, 16000, seed=3)
    case = cli.make_case(4, 512, 8, 2, (64, 32), True, (-1, -1), varlen=True)
    assert case.varlen and sum(case.lengths) == 4 * 512 and case.batch == len(case.lengths)
    assert case.label == "b4-s512-h8-hk2-d64-dv32-causal-varlen"


def test_rows_and_jsonl_round_trip(tmp_path):
    env = {"device": "dev", "torch": "t", "triton": "tr", "triflash": "0", "git_sha": None, "date": "d"}
    case = _case(causal=True)
    ok = cli.make_row(case, "bwd", "triflash", 2.0, "bf16", env)
    na = cli.make_row(case, "fwd", "cudnn", "RuntimeError: no kernel", "bf16", env)
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (ok, na)))
    back = plot.load_rows(path)
    assert back == [ok, na]
    assert back[0]["tflops"] == pytest.approx(cli.attn_flops(case, "bwd") / 2e-3 / 1e12)
    assert (back[1]["median_ms"], back[1]["tflops"], back[1]["note"]) == (None, None, "RuntimeError: no kernel")
    assert {"op", "B", "S", "H", "Hk", "D", "Dv", "causal", "dtype", "provider", "median_ms", "tflops",
            "device", "torch", "triton", "triflash", "git_sha", "date"} <= set(back[0])


def test_results_table_has_ratios():
    rows = [{"S": 1024, "B": 16, "H": 16, "Hk": 16, "provider": p, "tflops": v}
            for p, v in (("triflash", 300.0), ("cudnn", 600.0), ("sdpa-flash", None))]
    headers, body = cli.results_table(rows, ["triflash", "cudnn", "sdpa-flash"])
    assert headers == ["S", "B", "H/Hk", "triflash", "cuDNN", "SDPA-FA2", "triflash/cuDNN", "triflash/SDPA-FA2"]
    assert body == [["1024", "16", "16/16", "300.0", "600.0", "n/a", "0.50x", "n/a"]]
    text = cli.plain_table("title", headers, body)
    assert text.splitlines()[0] == "title" and "0.50x" in text.splitlines()[2]


def _fake_provider(name, bind):
    return cli.Provider(name, name.upper(), load=lambda: None, bind=lambda _, case, t: bind(case, t))


def _unsupported(case, t):
    raise NotImplementedError("not this shape")


def _not_installed():
    raise ImportError("no such package")


def test_sweep_with_fake_providers(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli.PROVIDERS, "triflash", _fake_provider("triflash", lambda c, t: lambda: t.q + t.k + t.v))
    monkeypatch.setitem(cli.PROVIDERS, "cudnn", _fake_provider("cudnn", _unsupported))
    monkeypatch.setitem(cli.PROVIDERS, "fa3", cli.Provider("fa3", "FA3", _not_installed, _unsupported))
    monkeypatch.setattr(cli, "_do_bench", lambda fn, args: (fn(), 0.5)[1])
    out = tmp_path / "r.jsonl"
    args = cli.parse_args(["--seqlen", "16,32", "--headdim", "16", "--nheads", "2", "--batch", "1",
                           "--dtype", "fp16", "--providers", "triflash,cudnn,fa3", "--out", str(out)])
    assert cli.bench_sweep(args, "cpu") == 0
    rows = plot.load_rows(out)
    assert len(rows) == 2 * 2 * 2 * 2  # S x causal x op x available providers
    timed = [r for r in rows if r["provider"] == "triflash"]
    assert all(r["median_ms"] == 0.5 and r["tflops"] > 0 and r["runs_ms"] == [0.5] * 3 for r in timed)
    assert all(r["note"] == "NotImplementedError: not this shape" for r in rows if r["provider"] == "cudnn")
    printed = capsys.readouterr().out
    assert "fa3 (ImportError: no such package)" in printed and "n/a cudnn" in printed


def test_median_of_runs():
    """--repeats: the median of the runs' medians; a provider n/a in any run is n/a with that run's reason."""
    assert cli.median_of_runs([3.0, 1.0, 2.0]) == 2.0 and cli.median_of_runs([1.0, 2.0]) == 1.5
    assert cli.median_of_runs([1.0, "RuntimeError: x", "OSError: y"]) == "RuntimeError: x"
    args = cli.parse_args(["--seqlen", "1k,4k"])
    assert (args.repeats, args.repeat_upto) == (3, 2048)
    assert cli.parse_args(["--repeats", "1", "--repeat-upto", "4k"]).repeat_upto == 4096


def test_cpu_run_reruns_under_the_interpreter(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_interpreting", lambda: False)
    monkeypatch.setattr(cli, "_kernels_imported", lambda: True)
    monkeypatch.setattr(cli, "_rerun_interpreted", lambda argv: seen.append(argv) or 7)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["--quick"]) == 7
    assert seen == [["run", "--quick"]]


def test_plot_writes_pngs(tmp_path):
    base = {"B": 4, "H": 16, "Hk": 16, "D": 128, "Dv": 128, "dtype": "bf16", "window": [-1, -1],
            "varlen": False, "device": "H100"}
    rows = [{**base, "op": op, "S": s, "causal": causal, "provider": p, "tflops": (None if p == "fa3" else s / 10)}
            for op in ("fwd", "bwd") for causal in (False, True) for s in (1024, 4096)
            for p in ("triflash", "cudnn", "fa3")]
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["plot", str(results), "--out-dir", str(tmp_path / "img")]) == 0
    names = sorted(p.name for p in (tmp_path / "img").iterdir())
    assert names == ["bwd_d128_causal_bf16.png", "bwd_d128_noncausal_bf16.png",
                     "fwd_d128_causal_bf16.png", "fwd_d128_noncausal_bf16.png"]
    assert all((tmp_path / "img" / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    assert plot.figure_name(("bwd", 192, 128, False, "fp16", (256, 0), True, 4)) == \
        "bwd_d192-128_noncausal_fp16_w256_0_varlen_gqa4"


def test_decode_subcommand_parses():
    from triflash.bench import decode

    args = cli.parse_args(["decode"])
    assert args.command == "decode" and args.shapes == list(decode.DEFAULT_SHAPES)
    assert args.page_sizes == [0, 16, 64] and args.num_splits == [0] and not args.eager
    args = cli.parse_args(["decode", "--shapes", "1x64k,16x8192", "--page-sizes", "0,1", "--num-splits", "0,4",
                           "--eager", "--providers", "triflash"])
    assert args.shapes == [(1, 65536), (16, 8192)] and args.page_sizes == [0, 1] and args.num_splits == [0, 4]
    with pytest.raises(argparse.ArgumentTypeError):
        decode.parse_shapes("16-8192")


def test_decode_bytes_pages_and_table():
    from triflash.bench import decode

    assert decode.kv_bytes(1, 65536, 8, 128) == 2 * 65536 * 8 * 128 * 2
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 37, 2, 8), torch.randn(2, 37, 2, 8)
    kp, vp, table = decode.to_paged(k, v, 16, gen)
    assert kp.shape == (6, 16, 2, 8) and table.shape == (2, 3) and table.dtype == torch.int32
    for x, pages in ((k, kp), (v, vp)):
        gathered = pages[table.long()].flatten(1, 2)[:, :37]
        assert torch.equal(gathered, x)
    args = argparse.Namespace(page_sizes=[0, 16], num_splits=[0, 4])
    cols = decode.columns(args, ["triflash", "cudnn"])
    assert cols == [("triflash", 0, 0), ("triflash", 0, 4), ("triflash", 16, 0), ("triflash", 16, 4),
                    ("cudnn", 0, None)]
    assert [decode.label(*c) for c in cols] == ["tf-contig", "tf-contig-s4", "tf-paged16", "tf-paged16-s4", "cuDNN"]
    rows = [{"B": 1, "Sk": 8, "provider": p, "page_size": ps, "num_splits": n, "tbps": t, "note": None}
            for (p, ps, n), t in zip(cols, [1.0, 2.0, 3.0, 4.0, 2.0])]
    decode.print_tables(rows, cols)


def test_forward_launch_choices_parse_and_label():
    """``--num-splits`` (1 none, 0 automatic, N) and ``--pack-gqa`` (auto / yes / no) reach every case, its label
    and its JSONL row; the defaults leave the FlashAttention sweep as it was."""
    default = cli.parse_args([])
    assert (default.num_splits, default.pack_gqa) == (1, None)
    assert all((c.num_splits, c.pack_gqa) == (1, None) for c in cli.sweep_cases(default))
    args = cli.parse_args(["--seqlen", "8k", "--headdim", "128", "--gqa-ratio", "8", "--num-splits", "0",
                           "--pack-gqa", "yes", "--mode", "fwd", "--causal", "no"])
    (case,) = cli.sweep_cases(args)
    assert (case.num_splits, case.pack_gqa, case.nheads, case.nheads_k) == (0, True, 16, 2)
    assert case.label.endswith("-splits0-packgqa")
    assert all((c.num_splits, c.pack_gqa) == (0, True) for c in cli.check_cases(args, 333, args.headdims))
    row = cli.make_row(case, "fwd", "triflash", 1.0, "bf16", {})
    assert (row["num_splits"], row["pack_gqa"]) == (0, True)
    assert cli.parse_args(["--num-splits", "4", "--pack-gqa", "no"]).pack_gqa is False
    assert plot.figure_name(plot._key(row)) == "fwd_d128_noncausal_bf16_gqa8_splits0_packgqa"
    for bad in (["--num-splits", "-1"], ["--num-splits", "x"], ["--pack-gqa", "maybe"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)


def test_flash_family_gets_the_launch_choices_only_when_asked():
    """The FlashAttention-style call passes ``num_splits`` / ``pack_gqa`` only when they differ from the
    defaults (FA2's ``flash_attn_func`` takes neither: such a cell is n/a there, not an error of the run)."""
    seen = []

    def dense(q, k, v, **kwargs):
        seen.append(kwargs)
        return q

    t = cli.Inputs(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8))
    for splits, pack in ((1, None), (0, None), (3, False)):
        case = cli.make_case(1, 4, 2, 2, (8, 8), False, cli.NO_WINDOW, False, splits, pack)
        cli._bind_flash_family((dense, None), case, t)()
    assert seen == [{"causal": False}, {"causal": False, "num_splits": 0},
                    {"causal": False, "num_splits": 3, "pack_gqa": False}]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gate_checks_the_forward_under_its_launch_choices(causal, monkeypatch):
    """With gradients the forward runs unsplit and unpacked, so the gate also checks the forward without them
    (``out-nograd``), which takes the split and packed path (through the interpreter here)."""
    from triflash import interface

    plans = []
    real_plan = interface._plan

    def spy(*a, **kw):
        plans.append(real_plan(*a, **kw))
        return plans[-1]

    monkeypatch.setattr(interface, "_plan", spy)
    case = cli.make_case(1, 67, 4, 2, (64, 64), causal, cli.NO_WINDOW, False, num_splits=2, pack_gqa=True)
    results = cli.check_case(case, torch.float16, "cpu", backward=True)
    assert [r.name for r in results] == ["out", "dq", "dk", "dv", "out-nograd"]
    assert all(r.ok for r in results), results
    assert (1, False) in plans and (2, True) in plans


def test_decode_pack_gqa_flag():
    """``triflash-bench decode --pack-gqa``: auto (default), yes, no, recorded on every row."""
    from triflash.bench import decode

    assert cli.parse_args(["decode"]).pack_gqa == "auto"
    args = cli.parse_args(["decode", "--pack-gqa", "no"])
    row = decode.make_row(1, 4096, args, "triflash", 16, 0, 1.0, None, {})
    assert row["pack_gqa"] is False and row["num_splits"] == 0
    with pytest.raises(SystemExit):
        cli.parse_args(["decode", "--pack-gqa", "maybe"])
