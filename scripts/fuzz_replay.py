"""Replay the GPU fuzz tier's examples one by one, each printed before it runs.

Hypothesis draws tests/test_fuzz.py::test_fuzz_dense_gpu's examples from a fixed seed (derandomize), and
the draws do not depend on the outcomes while examples pass; so recording them with a stub test gives the
exact problems the tier runs. Each then runs through the same check against attention_ref with blocking
launches (CUDA_LAUNCH_BLOCKING=1 is set here): a wrong result is printed and the replay goes on; a CUDA
error stops it and the problem is re-run in a child under compute-sanitizer memcheck when available.
    python3 scripts/fuzz_replay.py            # all examples
    python3 scripts/fuzz_replay.py '{...}'    # one problem (the child's form)
"""

import json
import os
import shutil
import subprocess
import sys
import types

os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import test_fuzz  # noqa: E402
import torch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def record():
    examples = []
    real = test_fuzz.test_fuzz_dense
    test_fuzz.test_fuzz_dense = types.SimpleNamespace(
        hypothesis=types.SimpleNamespace(inner_test=lambda p, device: examples.append(p)))
    try:
        test_fuzz.test_fuzz_dense_gpu(device=DEV)
    finally:
        test_fuzz.test_fuzz_dense = real
    return examples


def to_json(p):
    return json.dumps(dict(p, dtype=str(p["dtype"]).removeprefix("torch.")))


def from_json(s):
    p = json.loads(s)
    return dict(p, dtype=getattr(torch, p["dtype"]), window=tuple(p["window"]))


def check(p):
    test_fuzz.test_fuzz_dense.hypothesis.inner_test(p, DEV)
    if DEV == "cuda":
        torch.cuda.synchronize()


if len(sys.argv) > 1:
    check(from_json(sys.argv[1]))
    print("ok")
    sys.exit(0)

examples = record()
wrong = 0
for i, p in enumerate(examples):
    print(f"[{i}]", to_json(p), flush=True)
    try:
        check(p)
    except AssertionError as exc:
        wrong += 1
        print("  WRONG", str(exc).splitlines()[0][:300], flush=True)
    except Exception as exc:  # noqa: BLE001 - a CUDA error: locate it and stop
        print("  FAULT", type(exc).__name__, str(exc).splitlines()[0][:300], flush=True)
        if shutil.which("compute-sanitizer"):
            res = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--print-limit", "3", sys.executable,
                                  __file__, to_json(p)], capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "CUDA_LAUNCH_BLOCKING": "0"})
            lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("=========")]
            print("  memcheck:", f"rc={res.returncode}", *lines[:40], sep="\n    ", flush=True)
        sys.exit(1)
print(f"{len(examples)} examples, {wrong} wrong")
sys.exit(1 if wrong else 0)
