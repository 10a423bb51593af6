#!/usr/bin/env python3
"""Benchmark qgguf's native AQ and VQ kernels: matvec time per ISA path and thread count.

    python tools/bench_kernels.py                      # 4096x11008 and 2048x8192, all configs
    python tools/bench_kernels.py --shapes 4096x11008 --configs 2x8-g8 --threads 1,2 --json
    python tools/bench_kernels.py --shapes 4096x11008 --configs vq-v8-k256-256,vq-v8-k4096-256 --threads 1

Shapes are "CxR" as in the usual "4096x11008" (input x output).  For each shape it also times
numpy's float32 matvec (np.dot) and, when llama-cpp-python is installed, llama.cpp's own Q4_K
mat-vec (ggml_mul_mat with a Q4_K weight and an F32 vector, through ggml's graph compute with a
persistent threadpool, the path llama.cpp decodes with).  Ratios > 1 mean the AQ kernel is faster.
Times are the minimum over --reps runs (robust on a shared machine).  By default the weights
stay in the CPU caches between runs; --cold MB cycles through copies (>= MB MiB in all) so they
stream from memory, as in real decoding.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from qgguf import native  # noqa: E402


def tmin(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def copies(cold_mb: int, nbytes: float) -> int:
    return max(1, int(np.ceil(cold_mb * 2**20 / nbytes))) if cold_mb else 1


def cycler(fns):
    state = [0]

    def call():
        fns[state[0] % len(fns)]()
        state[0] += 1
    return call


def parse_cfg(s: str) -> tuple[int, int, int]:
    mb, g = s.split("-g")
    m, b = mb.split("x")
    return int(m), int(b), int(g)


def vq_tensor(name: str, R: int, C: int, rng):
    """A native VQTensor of type ``name`` (e.g. vq-v8-k4096-256) with random fields; (tensor, true bpw)."""
    from qgguf import gguf_types
    from qgguf.gguf_types import vq as V
    qt = gguf_types.get(name)
    comp = qt.pack(qt.random_fields((R, C), rng))
    L = qt.layout((R, C))
    t = native.VQTensor(comp[V.VQ_IDX], comp[V.VQ_BOOKS], comp[V.VQ_PERM], comp[V.VQ_COLSCALE], comp[V.VQ_COLBIAS],
                        v=qt.v, k=qt.k, R=R, C=C, ridx=comp.get(V.VQ_RIDX), rbooks=comp.get(V.VQ_RBOOKS), kr=qt.kr,
                        obook=comp.get(V.VQ_OBOOK), n_out=L["n_out"], groups=qt.groups)
    return t, qt.bits_per_weight((R, C))


# ---------------------------------------------------------------- llama.cpp Q4_K reference
class GGMLMatVec:
    """W (R x C, Q4_K) times x (C) with ggml's CPU backend, through ctypes."""

    Q4_K, F32 = 12, 0

    def __init__(self, W: np.ndarray, qtype: int = Q4_K):
        import llama_cpp

        libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
        mode = getattr(ctypes, "RTLD_GLOBAL", 0)
        self.base = base = ctypes.CDLL(str(next(libdir.glob("libggml-base.so*"))), mode=mode)
        self.cpu = cpu = ctypes.CDLL(str(next(libdir.glob("libggml-cpu.so*"))), mode=mode)

        class Params(ctypes.Structure):
            _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p),
                        ("no_alloc", ctypes.c_bool)]

        vp = ctypes.c_void_p
        base.ggml_init.restype = vp
        base.ggml_init.argtypes = [Params]
        base.ggml_new_tensor_2d.restype = vp
        base.ggml_new_tensor_2d.argtypes = [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        base.ggml_get_data.restype = vp
        base.ggml_get_data.argtypes = [vp]
        base.ggml_mul_mat.restype = vp
        base.ggml_mul_mat.argtypes = [vp, vp, vp]
        base.ggml_new_graph.restype = vp
        base.ggml_new_graph.argtypes = [vp]
        base.ggml_build_forward_expand.argtypes = [vp, vp]
        base.ggml_free.argtypes = [vp]
        base.ggml_quantize_chunk.restype = ctypes.c_size_t
        base.ggml_quantize_chunk.argtypes = [ctypes.c_int, vp, vp, ctypes.c_int64, ctypes.c_int64,
                                             ctypes.c_int64, vp]
        base.ggml_row_size.restype = ctypes.c_size_t
        base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
        cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]
        if hasattr(cpu, "ggml_cpu_init"):
            cpu.ggml_cpu_init()
        R, C = W.shape
        nbytes = base.ggml_row_size(qtype, C) * R
        self.ctx = base.ggml_init(Params(nbytes + 4 * (C + R) + (64 << 20), None, False))
        self.w = base.ggml_new_tensor_2d(self.ctx, qtype, C, R)
        self.x = base.ggml_new_tensor_2d(self.ctx, self.F32, C, 1)
        W = np.ascontiguousarray(W, dtype=np.float32)
        base.ggml_quantize_chunk(qtype, W.ctypes.data, base.ggml_get_data(self.w), 0, R, C, None)
        self.y = base.ggml_mul_mat(self.ctx, self.w, self.x)
        self.gf = base.ggml_new_graph(self.ctx)
        base.ggml_build_forward_expand(self.gf, self.y)
        self.xv = np.ctypeslib.as_array((ctypes.c_float * C).from_address(base.ggml_get_data(self.x)))
        self.yv = np.ctypeslib.as_array((ctypes.c_float * R).from_address(base.ggml_get_data(self.y)))

    def __call__(self, x: np.ndarray, threads: int) -> np.ndarray:
        self.xv[:] = x
        self.cpu.ggml_graph_compute_with_ctx(self.ctx, self.gf, threads)
        return self.yv

    def close(self):
        self.base.ggml_free(self.ctx)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x11008,2048x8192", help="CxR list (input x output)")
    ap.add_argument("--configs", default="2x8-g8,1x16-g8,1x8-g8,4x8-g8,2x8-g16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--isas", default="", help="comma list (default: every path this CPU runs)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp's Q4_K reference")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    ap.add_argument("--cold", type=int, default=0, metavar="MB",
                    help="cycle through copies of each weight totalling at least MB MiB, so they are "
                         "streamed from memory as in real decoding (e.g. 128; default: 0, cache-warm)")
    a = ap.parse_args(argv)
    if not native.available():
        print(f"native kernels unavailable: {native.build_error()}", file=sys.stderr)
        return 1
    isas = a.isas.split(",") if a.isas else native.isas()
    threads = [int(t) for t in a.threads.split(",")]
    rng = np.random.default_rng(0)
    results = {"cpu_isas": native.isas(), "default_isa": native.isa(), "cold_mb": a.cold, "shapes": []}
    say = (lambda *x: None) if a.json else print
    for shp in a.shapes.split(","):
        C, R = (int(v) for v in shp.split("x"))
        x = rng.standard_normal(C).astype(np.float32)
        W = (rng.standard_normal((R, C)) * 0.02).astype(np.float32)
        ent = {"C": C, "R": R, "numpy_f32_ms": tmin(lambda: np.dot(W, x), a.reps) * 1e3,
               "llamacpp_q4k_ms": {}, "aq": []}
        say(f"== {C}x{R} (C x R)   numpy f32 matvec {ent['numpy_f32_ms']:.3f} ms")
        if not a.no_llamacpp:
            try:
                gs_ = [GGMLMatVec(W) for _ in range(copies(a.cold, R * C * 4.5 / 8))]
                yq = gs_[0](x, 1).copy()
                yr = W.astype(np.float64) @ x
                for th in threads:
                    ent["llamacpp_q4k_ms"][th] = tmin(cycler([lambda g=g: g(x, th) for g in gs_]),
                                                      a.reps) * 1e3
                    say(f"   llama.cpp Q4_K t{th}: {ent['llamacpp_q4k_ms'][th]:.3f} ms  "
                        f"(rel. error {np.linalg.norm(yq - yr) / np.linalg.norm(yr):.3f})")
                for g in gs_:
                    g.close()
            except Exception as e:  # noqa: BLE001 - optional reference
                say(f"   llama.cpp Q4_K: unavailable ({type(e).__name__}: {e})")
        del W
        for cs in a.configs.split(","):
            if cs.startswith("vq-"):   # a VQ type: random packed indices, codebooks, permutation, norms
                t, bpw = vq_tensor(cs, R, C, rng)
                ts = [t] + [vq_tensor(cs, R, C, rng)[0] for _ in range(copies(a.cold, t.nbytes) - 1)]
            else:
                M, B, gs = parse_cfg(cs)
                bpw = M * B / gs
                codes = rng.integers(0, 1 << B, (C // gs, M, R), dtype=np.uint8 if B == 8 else np.uint16)
                cb = (rng.standard_normal((M, 1 << B, gs)) * 0.05).astype(np.float16)
                s = (rng.random(R) + 0.5).astype(np.float32)
                t = native.AQTensor(codes, cb, s, M, B, gs, R, C)
                ts = [t] + [native.AQTensor(codes.copy(), cb, s, M, B, gs, R, C)
                            for _ in range(copies(a.cold, codes.nbytes) - 1)]
            yref = t.dequantize(threads=max(threads)).astype(np.float64) @ x
            for isa in isas:
                with native.use_isa(isa):
                    y = t.matvec(x, 1)
                    err = float(np.linalg.norm(y - yref) / np.linalg.norm(yref))
                    for th in threads:
                        reps = max(3, a.reps // 5) if isa == "scalar" else a.reps
                        ms = tmin(cycler([lambda t=t: t.matvec(x, th) for t in ts]), reps) * 1e3
                        q4 = ent["llamacpp_q4k_ms"].get(th)
                        row = {"config": cs, "isa": isa, "threads": th, "ms": ms, "rel_err": err,
                               "vs_numpy": ent["numpy_f32_ms"] / ms,
                               "vs_llamacpp_q4k": (q4 / ms) if q4 else None,
                               "bits_per_weight": bpw}
                        ent["aq"].append(row)
                        say(f"   {cs:18s} {isa:7s} t{th}: {ms:8.3f} ms   x{row['vs_numpy']:6.1f} vs numpy"
                            + (f"   x{row['vs_llamacpp_q4k']:5.2f} vs Q4_K" if q4 else "")
                            + f"   rel.err {err:.1e}")
        results["shapes"].append(ent)
    if a.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
