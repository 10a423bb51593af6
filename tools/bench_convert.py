#!/usr/bin/env python3
"""Conversion speed and memory, side by side with llama.cpp's quantize, in one run.

    .venv/bin/python tools/bench_convert.py --src smollm2-135m --type Q8_0 [--repeat 3] [--json]

Runs `qgguf convert SRC --method rtn --type T` and llama.cpp's `llama_model_quantize` (through llama-cpp-python,
with allow_requantize, as `llama-quantize --allow-requantize`) on the same input file, each in a fresh process,
and reports wall time and peak RSS of each, and their ratios. The best of --repeat runs is kept for time
(the first qgguf run also compiles numba code into the cache; a user's second conversion does not pay that).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_QUANTIZE = r"""
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
p.allow_requantize = True
p.nthread = int(sys.argv[4])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
sys.exit(rc)
"""


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run cmd in a child; return (wall seconds, peak RSS in MB of that child)."""
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter(); rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "dt = time.perf_counter() - t\n"
        "print(json.dumps([rc, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    rc, dt, rss = json.loads(out.stdout.strip().splitlines()[-1])
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return dt, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="smollm2-135m")
    ap.add_argument("--type", default="Q8_0")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from qgguf.convert.sources import alias_path, is_alias

    src = str(alias_path(a.src.lower()) if is_alias(a.src) else a.src)
    qgguf_bin = str(Path(sys.executable).with_name("qgguf"))
    res: dict[str, list[tuple[float, float]]] = {"qgguf": [], "llama.cpp": []}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(a.repeat):
            res["qgguf"].append(run_measured([qgguf_bin, "convert", src, "--method", "rtn", "--type", a.type,
                                              "-t", str(a.threads), "-o", f"{d}/q.gguf"]))
            res["llama.cpp"].append(run_measured([sys.executable, "-c", LLAMA_QUANTIZE, src, f"{d}/l.gguf",
                                                  a.type, str(a.threads)]))
        sizes = {"qgguf": os.path.getsize(f"{d}/q.gguf"), "llama.cpp": os.path.getsize(f"{d}/l.gguf")}
    summary = {
        k: {"wall_s": min(t for t, _ in v), "wall_s_first": v[0][0], "peak_rss_mb": max(r for _, r in v),
            "bytes": sizes[k]} for k, v in res.items()
    }
    summary["ratio_wall"] = summary["qgguf"]["wall_s"] / summary["llama.cpp"]["wall_s"]
    summary["ratio_rss"] = summary["qgguf"]["peak_rss_mb"] / summary["llama.cpp"]["peak_rss_mb"]
    summary.update(src=src, type=a.type, threads=a.threads, repeat=a.repeat)
    if a.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"input {src}, type {a.type}, {a.threads} threads, best of {a.repeat}")
    print(f"{'tool':10s} {'wall s':>8s} {'first s':>8s} {'peak RSS MB':>12s} {'bytes':>12s}")
    for k in ("qgguf", "llama.cpp"):
        s = summary[k]
        print(f"{k:10s} {s['wall_s']:8.2f} {s['wall_s_first']:8.2f} {s['peak_rss_mb']:12.0f} {s['bytes']:12d}")
    print(f"ratio qgguf/llama.cpp: wall {summary['ratio_wall']:.2f}x, peak RSS {summary['ratio_rss']:.2f}x")


if __name__ == "__main__":
    main()
