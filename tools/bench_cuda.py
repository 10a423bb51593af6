#!/usr/bin/env python3
"""Benchmark qgguf's CUDA codebook kernels (qgguf.native.cuda) against torch's fp16 dense matvec (cuBLAS).

    python tools/bench_cuda.py                                   # default shapes and types
    python tools/bench_cuda.py --shapes 2048x2048 --types aq-2x8-g8,vq-v8-k4096-256 --json out.json

Shapes are "RxC": R output rows by C input columns (torch's weight shape [out, in]); the defaults are the
Llama-3.2-1B block linears (q/o 2048x2048, k/v 512x2048, gate/up 8192x2048, down 2048x8192) and a Llama-2-7B
FFN weight in both orientations (4096x11008: down; 11008x4096: gate/up, the "4096x11008" of the CPU benchmarks,
which name shapes CxR).

For each shape and type: the fused matvec y = W x (float32 x and y, the weight compressed), torch.mv on a random
fp16 weight of the same shape (fp16 x, cuBLAS), their ratio (> 1: ours is faster), the effective bandwidth of the
bytes each reads for its weight (ours: every byte the compressed tensor holds on the GPU), the fp16
dequantization time, and the matvec's relative error against torch.mv(our float32 dequantization, x). Timing
(METHOD.md): each variant runs as a CUDA graph of many calls that rotate over copies of the weight totalling
>= --rotate-mb MiB (so that the weight streams from memory, not the 50 MB L2), replayed --replays times;
the figure is the median over replays of the time per call. "eager" is the same loop without a graph (launch
overhead from Python included). --matmul N,...: also Y = X W^T for N tokens through the fused matvec per token
and through fp16 dequantization + cuBLAS, beside cuBLAS's fp16 matmul of the dense weight.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DEFAULT_SHAPES = "2048x2048,512x2048,8192x2048,2048x8192,4096x11008,11008x4096"
TUNING = ("FIN_MAX_CHUNKS", "STAGE_MAX_BYTES", "VQ_UNROLL", "AQ_PREFETCH")
DEFAULT_TYPES = ("aq-2x8-g8:lut,aq-2x8-g8:direct,aq-1x16-g8,aq-4x8-g8:lut,aq-4x8-g8:direct,aq-1x8-g8:lut,"
                 "aq-1x8-g8:direct,vq-v8-k4096-256,vq-v8-k256-256,vq-v4-k256")


def _graph_time(calls, reps: int, replays: int) -> tuple[float, float]:
    """(median µs per call over graph replays, median µs per call of the eager loop)."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls[:2]:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            calls[i % len(calls)]()
    g.replay()
    torch.cuda.synchronize()
    tg = []
    for _ in range(replays):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        tg.append(e0.elapsed_time(e1) * 1e3 / reps)
    te = []
    for _ in range(3):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for i in range(reps):
            calls[i % len(calls)]()
        e1.record()
        e1.synchronize()
        te.append(e0.elapsed_time(e1) * 1e3 / reps)
    del g
    return statistics.median(tg), statistics.median(te)


def _copies(nbytes: int, rotate_mb: float, cap: int = 1024) -> int:
    return max(1, min(cap, -(-int(rotate_mb * 2**20) // max(1, nbytes))))


def _copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read and written."""
    import torch
    a = torch.empty(2**28, device="cuda", dtype=torch.float32).uniform_()
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    return 2 * a.numel() * 4 / statistics.median(ts) / 1e9


def bench_shape(R: int, C: int, types: list[str], args) -> list[dict]:
    import torch

    from qgguf import gguf_types
    from qgguf.native import cuda

    rng = np.random.default_rng(args.seed)
    rows = []
    # dense fp16 reference: torch.mv (cuBLAS gemv)
    W = torch.randn(R, C, device="cuda", dtype=torch.float16) / C ** 0.5
    n = _copies(W.numel() * 2, args.rotate_mb)
    Ws = [W] + [torch.randn_like(W) for _ in range(n - 1)]
    x16 = torch.randn(C, device="cuda", dtype=torch.float16)
    ys = torch.empty(R, device="cuda", dtype=torch.float16)
    calls = [lambda w=w: torch.mv(w, x16, out=ys) for w in Ws]
    reps = max(args.reps, n)
    t_dense, te_dense = _graph_time(calls, reps, args.replays)
    dense = {"shape": f"{R}x{C}", "type": "fp16 dense (torch.mv)", "us": t_dense, "eager_us": te_dense,
             "bytes": R * C * 2, "bpw": 16.0, "gbps": R * C * 2 / t_dense / 1e3, "copies": n}
    if args.matmul:                   # fp16 dense matmul of N tokens (cuBLAS), the same rotation
        dense["matmul"] = {}
        for N in args.matmul:
            X16 = torch.randn(N, C, device="cuda", dtype=torch.float16)
            mcalls = [lambda w=w, X16=X16: torch.nn.functional.linear(X16, w) for w in Ws]
            dense["matmul"][N] = _graph_time(mcalls, max(args.reps, len(Ws)), args.replays)[0]
    del Ws, calls
    rows.append(dense)
    print(f"{R}x{C} fp16 dense: {t_dense:.2f} us ({dense['gbps']:.0f} GB/s, {n} copies)", flush=True)
    for spec in types:
        name, _, method = spec.partition(":")
        qt = gguf_types.get(name)
        if qt.family == "vq" and not qt.fits_shape((R, C)) or qt.family == "aq" and C % qt.g:
            continue
        t0 = time.perf_counter()
        f = qt.random_fields((R, C), rng)
        t = cuda.from_companions(qt, (R, C), qt.pack(f))
        prep = time.perf_counter() - t0
        x = torch.randn(C, device="cuda", dtype=torch.float32)
        kw = {"method": method} if method else {}
        # correctness on this shape: against torch.mv on our own float32 dequantization
        ref = torch.mv(t.dequantize(torch.float32).double(), x.double())
        y = t.matvec(x, **kw).double()
        err = float((y - ref).norm() / ref.norm())
        n = _copies(t.nbytes, args.rotate_mb)
        ts = [t] + [t.clone() for _ in range(n - 1)]
        reps = max(args.reps, n)
        calls = [lambda tt=tt: tt.matvec(x, **kw) for tt in ts]
        t_ours, te_ours = _graph_time(calls, reps, args.replays)
        dcalls = [lambda tt=tt: tt.dequantize(torch.float16) for tt in ts[: max(1, min(n, 8))]]
        t_deq, _ = _graph_time(dcalls, max(8, len(dcalls)), args.replays)
        mm = {}
        for N in args.matmul:         # Y = X W^T for N tokens: fused per token, and fp16 dequantization + cuBLAS
            X = torch.randn(N, C, device="cuda", dtype=torch.float32)
            mm[N] = {path: _graph_time([lambda tt=tt, X=X, fm=fm: tt.matmul(X, fused_max=fm) for tt in ts],
                                       max(args.reps, n), args.replays)[0]
                     for path, fm in (("fused", N), ("dequant", 0))}
            print(f"{R}x{C} {spec} matmul N={N}: fused {mm[N]['fused']:.1f} us, dequant+cuBLAS "
                  f"{mm[N]['dequant']:.1f} us, fp16 dense {dense['matmul'][N]:.1f} us", flush=True)
        del ts, calls, dcalls
        r = {"shape": f"{R}x{C}", "type": spec, "us": t_ours, "eager_us": te_ours, "bytes": t.nbytes, "matmul": mm,
             "bpw": 8.0 * t.nbytes / (R * C), "gbps": t.nbytes / t_ours / 1e3, "copies": n,
             "vs_fp16": t_dense / t_ours, "eager_vs_fp16": te_dense / te_ours, "dequant_fp16_us": t_deq,
             "rel_err": err, "prep_s": prep}
        rows.append(r)
        print(f"{R}x{C} {spec}: {t_ours:.2f} us ({r['gbps']:.0f} GB/s, {r['bpw']:.2f} bpw) = "
              f"{r['vs_fp16']:.2f}x fp16; eager {te_ours:.1f} vs {te_dense:.1f} us; dequant fp16 {t_deq:.1f} us; "
              f"err {err:.1e}", flush=True)
        del t
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--types", default=DEFAULT_TYPES, help="comma list; aq types take :lut, :direct or :auto "
                    "(default: auto, the kernel the runner uses)")
    ap.add_argument("--rotate-mb", type=float, default=256.0)
    ap.add_argument("--reps", type=int, default=200, help="calls per graph (at least the number of copies)")
    ap.add_argument("--replays", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--matmul", default="", help="comma list of token counts N: also time Y = X W^T both ways")
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=INT",
                    help="set a tuning constant of qgguf.native.cuda (" + ", ".join(TUNING) + ")")
    args = ap.parse_args(argv)
    args.matmul = [int(v) for v in args.matmul.split(",") if v]

    import torch

    from qgguf.native import cuda
    if not cuda.available():
        print(f"bench_cuda: {cuda.unavailable_reason()}", file=sys.stderr)
        return 2
    import cupy
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k not in TUNING:
            ap.error(f"--set {k}: not a tuning constant")
        setattr(cuda, k, int(v))
    props = torch.cuda.get_device_properties(0)
    info = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cupy": cupy.__version__, "copy_gbps": _copy_bandwidth(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "settings": {k: getattr(cuda, k) for k in TUNING}}
    print(json.dumps(info), flush=True)
    rows = []
    for s in args.shapes.split(","):
        R, C = (int(v) for v in s.lower().split("x"))
        rows += bench_shape(R, C, [t for t in args.types.split(",") if t], args)
    print()
    print(f"{'shape RxC':>11} {'type':>22} {'bpw':>5} {'us':>7} {'fp16 us':>8} {'ratio':>6} {'GB/s':>6} "
          f"{'deq us':>7} {'rel err':>8}")
    dense = {}
    for r in rows:
        if "vs_fp16" not in r:
            dense[r["shape"]] = r
            continue
        d = dense[r["shape"]]
        print(f"{r['shape']:>11} {r['type']:>22} {r['bpw']:5.2f} {r['us']:7.2f} {d['us']:8.2f} "
              f"{r['vs_fp16']:6.2f} {r['gbps']:6.0f} {r['dequant_fp16_us']:7.1f} {r['rel_err']:8.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
