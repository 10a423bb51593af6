#!/usr/bin/env python3
"""Decode and prompt speed, side by side: qgguf's runner on AQ files vs llama.cpp (llama-cpp-python) on Q4_K_M,
on the same random-weight model shape (default: Llama-3.2-1B, vocabulary 4096), same thread count.

    python tools/bench_decode.py                       # AQ 2x8-g8, 1x8-g8, 2x8-g16 vs Q4_K_M, 2 threads
    python tools/bench_decode.py --rounds 3 --json     # interleaved rounds, best of each; one JSON object
    python tools/bench_decode.py --memory              # also: RSS after loading SmolLM2-135M-shaped AQ vs F32

Files are made once in --dir (default out/bench/): the AQ files by tools/synthetic_model.py (random codes), the
Q4_K_M file by llama.cpp's llama_model_quantize from a synthetic F16 file. Every measurement runs in a fresh
process (``qgguf bench --json`` for ours; a llama-cpp-python worker for llama.cpp: pp = the prompt in one
llama_decode batch from an empty cache, tg = n_gen single-token decodes), and the configurations are interleaved
round by round, so that a shared machine's load falls on all of them alike; the best of all repetitions counts.
Ratios are ours / llama.cpp's (> 1: we are faster). The acceptance bar: AQ 2x8-g8 tg >= 0.8x Q4_K_M tg.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _run_json(cmd: list[str], timeout: float) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def ensure_files(d: Path, shape: str, aq_types: list[str], vocab: int | None, log) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    syn = [PY, str(ROOT / "tools" / "synthetic_model.py"), "--shape", shape, "--quiet"]
    if vocab:
        syn += ["--vocab", str(vocab)]
    tag = shape + (f"-v{vocab}" if vocab else "")
    for t in aq_types:
        f = d / f"{tag}-{t}.gguf"
        if not f.exists():
            log(f"making {f} ...")
            subprocess.run(syn + ["--type", t, "-o", str(f)], check=True, cwd=ROOT, stdout=sys.stderr)
        files[t] = f
    q4 = d / f"{tag}-Q4_K_M.gguf"
    if not q4.exists():
        f16 = d / f"{tag}-F16.gguf"
        if not f16.exists():
            log(f"making {f16} ...")
            subprocess.run(syn + ["--type", "F16", "-o", str(f16)], check=True, cwd=ROOT, stdout=sys.stderr)
        log(f"quantizing {q4} with llama.cpp (llama_model_quantize Q4_K_M) ...")
        code = ("import ctypes, llama_cpp as L; p = L.llama_model_quantize_default_params(); "
                "p.ftype = L.LLAMA_FTYPE_MOSTLY_Q4_K_M; p.nthread = 2; "
                f"rc = L.llama_model_quantize({str(f16).encode()!r}, {str(q4).encode()!r}, ctypes.byref(p)); "
                "raise SystemExit(rc)")
        subprocess.run([PY, "-c", code], check=True, cwd=ROOT, capture_output=True)
    files["Q4_K_M"] = q4
    return files


# ------------------------------------------------------------------------------------------------ llama.cpp worker
def llamacpp_worker(path: str, n_prompt: int, n_gen: int, threads: int, reps: int, seed: int) -> dict:
    import numpy as np
    import llama_cpp

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    r0 = rss()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=max(512, n_prompt + n_gen + 8),
                          n_batch=max(512, n_prompt), n_ubatch=max(512, n_prompt), verbose=False, use_mmap=True)
    load_s = time.perf_counter() - t0
    rss_model = rss() - r0
    n_vocab = llm.n_vocab()
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, n_vocab, size=max(1, n_prompt)).tolist()
    gen = rng.integers(0, n_vocab, size=max(1, n_gen)).tolist()
    pp, tg = [], []
    if n_prompt:
        llm.reset()
        llm.eval(prompt[:8])
        for _ in range(reps):
            llm.reset()
            llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
            t1 = time.perf_counter()
            llm.eval(prompt)
            pp.append(time.perf_counter() - t1)
    if n_gen:
        llm.reset()
        for tok in gen[:4]:
            llm.eval([tok])
        for _ in range(reps):
            llm.reset()
            llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
            t1 = time.perf_counter()
            for tok in gen:
                llm.eval([tok])
            tg.append(time.perf_counter() - t1)
    return {"model": path, "model_bytes": Path(path).stat().st_size, "threads": threads, "n_prompt": n_prompt,
            "n_gen": n_gen, "reps": reps, "pp_tps": n_prompt / min(pp) if pp else None,
            "tg_tps": n_gen / min(tg) if tg else None, "pp_s": pp, "tg_s": tg, "load_s": load_s,
            "rss_model_bytes": rss_model, "load_avg": [round(v, 2) for v in os.getloadavg()]}


def measure(kind: str, f: Path, a) -> dict:
    if kind == "llama.cpp":
        cmd = [PY, __file__, "--worker", str(f), "-p", str(a.n_prompt), "-n", str(a.n_gen), "-t", str(a.threads),
               "-r", str(a.reps)]
    else:
        cmd = [PY, "-m", "qgguf", "bench", str(f), "-p", str(a.n_prompt), "-n", str(a.n_gen), "-t", str(a.threads),
               "-r", str(a.reps), "--json"]
    return _run_json(cmd, timeout=a.timeout)


def memory_section(a, log) -> dict:
    """RSS after loading a SmolLM2-135M-shaped file: AQ 2x8-g8 vs F32 (our runner)."""
    d = Path(a.dir)
    out = {}
    for t in ("aq-2x8-g8", "F32"):
        f = d / f"smollm2-135m-{t}.gguf"
        if not f.exists():
            log(f"making {f} ...")
            subprocess.run([PY, str(ROOT / "tools" / "synthetic_model.py"), "--shape", "smollm2-135m", "--type", t,
                            "--embd-type", "Q8_0" if t != "F32" else "F32", "-o", str(f), "--quiet"],
                           check=True, cwd=ROOT, stdout=sys.stderr)   # --json: stdout holds the JSON alone
        r = _run_json([PY, "-m", "qgguf", "bench", str(f), "-p", "0", "-n", "8", "-t", str(a.threads), "-r", "1",
                       "--json"], timeout=a.timeout)
        out[t] = {"file_bytes": r["model_bytes"], "rss_model_bytes": r["rss_model_bytes"], "tg_tps": r["tg_tps"]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--types", default="aq-2x8-g8,aq-1x8-g8,aq-2x8-g16", help="our codebook types (AQ or VQ, e.g. vq-v8-k4096-256), comma-separated")
    p.add_argument("--dir", default=str(ROOT / "out" / "bench"))
    p.add_argument("-p", "--n-prompt", type=int, default=64)
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-r", "--reps", type=int, default=2, help="repetitions inside each process")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (fresh processes)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--memory", action="store_true", help="also measure RSS on the SmolLM2-135M shape")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(llamacpp_worker(a.worker, a.n_prompt, a.n_gen, a.threads, a.reps, 0)))
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    aq = [t.strip() for t in a.types.split(",") if t.strip()]
    files = ensure_files(Path(a.dir), a.shape, aq, a.vocab, log)
    configs = [(t, "qgguf", files[t]) for t in aq] + [("Q4_K_M", "llama.cpp", files["Q4_K_M"])]
    best: dict[str, dict] = {}
    runs: dict[str, list] = {c[0]: [] for c in configs}
    for rnd in range(a.rounds):
        for name, kind, f in configs:
            log(f"round {rnd + 1}/{a.rounds}: {kind} {name} ...")
            r = measure(kind, f, a)
            runs[name].append({"pp_tps": r["pp_tps"], "tg_tps": r["tg_tps"], "load_avg": r.get("load_avg")})
            b = best.setdefault(name, dict(r, runtime=kind, type=name))
            for k in ("pp_tps", "tg_tps"):
                if r[k] is not None and (b[k] is None or r[k] > b[k]):
                    b[k] = r[k]
    ref = best["Q4_K_M"]
    for name, b in best.items():
        b["tg_ratio_vs_q4_k_m"] = (b["tg_tps"] / ref["tg_tps"]) if b["tg_tps"] and ref["tg_tps"] else None
        b["pp_ratio_vs_q4_k_m"] = (b["pp_tps"] / ref["pp_tps"]) if b["pp_tps"] and ref["pp_tps"] else None
        b["runs"] = runs[name]
    res = {"shape": a.shape, "threads": a.threads, "n_prompt": a.n_prompt, "n_gen": a.n_gen, "reps": a.reps,
           "rounds": a.rounds, "cpu_count": os.cpu_count(), "load_avg_end": [round(v, 2) for v in os.getloadavg()],
           "results": {k: {kk: v for kk, v in b.items() if kk not in ("pp_s", "tg_s", "kinds")}
                       for k, b in best.items()},
           "bar_tg_2x8_vs_q4km": 0.8,
           "bar_met": (best.get("aq-2x8-g8", {}).get("tg_ratio_vs_q4_k_m") or 0) >= 0.8}
    if a.memory:
        res["memory_smollm2_135m"] = memory_section(a, log)
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"shape {a.shape}, {a.threads} threads, pp{a.n_prompt} / tg{a.n_gen}, best of {a.rounds} rounds x "
          f"{a.reps} reps; machine load at the end {res['load_avg_end']} on {os.cpu_count()} cores")
    print(f"{'runtime':<10} {'type':<11} {'MiB':>7} {'pp t/s':>8} {'tg t/s':>8} {'pp x':>6} {'tg x':>6} "
          f"{'RSS MiB':>8}")
    for name, b in best.items():
        print(f"{b['runtime']:<10} {name:<11} {b['model_bytes'] / 2**20:>7.1f} {b['pp_tps'] or 0:>8.2f} "
              f"{b['tg_tps'] or 0:>8.2f} {b['pp_ratio_vs_q4_k_m'] or 0:>6.2f} {b['tg_ratio_vs_q4_k_m'] or 0:>6.2f} "
              f"{b['rss_model_bytes'] / 2**20:>8.0f}")
    print(f"acceptance (AQ 2x8-g8 tg >= 0.8x Q4_K_M): {'met' if res['bar_met'] else 'NOT met'}")
    if a.memory:
        for t, m in res["memory_smollm2_135m"].items():
            print(f"SmolLM2-135M shape {t}: file {m['file_bytes'] / 2**20:.1f} MiB, RSS after load "
                  f"{m['rss_model_bytes'] / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
