#!/usr/bin/env python3
"""Peak memory of a conversion of a Llama-3.2-1B-shape model from safetensors (issue 7).

    flock /tmp/qgguf-heavy.lock nice -n 10 .venv/bin/python tools/bench_memory.py --dir /tmp/qgguf-l1b-hf \
        [--type Q4_K_M] [--method rtn] [-- EXTRA CONVERT ARGS] [--json]

Writes the random-weight Hugging Face folder with tools/synthetic_hf.py first (bf16, vocab 128256, ~2.5 GB)
unless ``--dir`` already holds it, then runs ``qgguf convert DIR --type T --method M --json`` in a child under
``/usr/bin/time -v`` and reports the child's maximum resident set size as /usr/bin/time measures it, the
``peak_rss_bytes`` of the convert report, the wall time and the output size. ``--limit-gb`` (default 2.5): the
exit status is 1 when the peak is at or above it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _synthetic_hf():
    spec = importlib.util.spec_from_file_location("_qgguf_synthetic_hf", _HERE / "synthetic_hf.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; returns rc, wall_s, max_rss_bytes (GNU time's figure) and stdout."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return {"rc": p.returncode, "wall_s": wall, "max_rss_bytes": int(m.group(1)) * 1024 if m else None,
            "stdout": p.stdout, "stderr": p.stderr}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/qgguf-l1b-hf", help="Hugging Face folder (written if missing)")
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--dtype", default="BF16")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("-o", "--out", default=None, help="output GGUF (default DIR-TYPE-METHOD.gguf; removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the output GGUF")
    ap.add_argument("--limit-gb", type=float, default=2.5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("extra", nargs="*", help="more `qgguf convert` arguments (after --)")
    a = ap.parse_args(argv)

    d = Path(a.dir)
    made = None
    if not (d / "model.safetensors").is_file():
        made = _synthetic_hf().write_hf(d, a.shape, a.dtype, progress=False)
        print(f"wrote {d}: {made['bytes'] / 2**30:.2f} GiB in {made['seconds']:.0f} s", file=sys.stderr)
    out = Path(a.out) if a.out else d.with_name(f"{d.name}-{a.type}-{a.method}.gguf")
    cmd = [sys.executable, "-m", "qgguf", "convert", str(d), "--type", a.type, "--method", a.method,
           "-o", str(out), "-q", "--json", *a.extra]
    r = measure(cmd)
    if r["rc"] != 0:
        print(r["stderr"][-3000:], file=sys.stderr)
        return 2
    rep = json.loads(r["stdout"])
    res = {"command": " ".join(cmd), "src_bytes": (d / "model.safetensors").stat().st_size,
           "out_bytes": out.stat().st_size, "wall_s": round(r["wall_s"], 1),
           "max_rss_bytes_time_v": r["max_rss_bytes"], "peak_rss_bytes_report": rep["peak_rss_bytes"],
           "limit_bytes": int(a.limit_gb * 1e9), "n_params": rep["n_params"], "bpw": rep["bpw"]}
    peak = max(v for v in (r["max_rss_bytes"], rep["peak_rss_bytes"]) if v)
    res["ok"] = peak < res["limit_bytes"]
    if not a.keep:
        out.unlink()
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{a.method} {a.type}: {res['n_params'] / 1e9:.3f} G params, source {res['src_bytes'] / 1e9:.2f} GB, "
              f"output {res['out_bytes'] / 1e9:.3f} GB, {res['wall_s']} s, peak RSS {peak / 1e9:.3f} GB "
              f"(/usr/bin/time -v {r['max_rss_bytes'] / 1e9:.3f} GB, report {rep['peak_rss_bytes'] / 1e9:.3f} GB), "
              f"limit {a.limit_gb} GB: {'ok' if res['ok'] else 'OVER'}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
