#!/usr/bin/env python3
"""Issue 6's measurements: llama.cpp's file-type presets (with an importance matrix) against qgguf's
measured mixed precision at the same file sizes, every file evaluated by qgguf's evaluator.

For every preset P in ``--presets``: ``llama-quantize --imatrix I F32 OUT P`` (llama.cpp's own tool, built by
tools/build_llamacpp_tools.sh). For every preset P in ``--match``: ``qgguf convert F32 --method M --calib C
--target-size <bytes of llama.cpp's P file> --compat llama.cpp --sens-from SENS`` (the sensitivities measured
once, saved in a recipe; with ``--measure`` and no SENS yet, the first of these conversions measures them,
with ``--proxy-check``, and its search time and conversion time are recorded under ``_measure``). ``--size NAME=BYTES``
adds a qgguf budget of any size (e.g. the AQ 2-bit file's). Every file: ``qgguf eval FILE --text T --ctx 512
--chunks 40 --base F32 --json``, and a load by llama.cpp (llama-cpp-python) for the standard files.

Results are merged into ``OUT/results.json`` (one entry per file; a finished entry is not redone unless
``--force``); tools/plot_kld_size.py draws them. Run it under the shared lock:

    flock /tmp/qgguf-heavy.lock nice -n 10 .venv/bin/python tools/bench_mixed.py --measure \\
        --presets Q4_K_M,Q3_K_M --match Q4_K_M,Q3_K_M --method gptq
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".llamacpp-tools" / "bin"
SHARED = ROOT.parent / "shared"
QG = [sys.executable, "-m", "qgguf"]


def run(cmd: list[str], log: Path, stdout: Path | None = None) -> float:
    """Run ``cmd`` (output appended to ``log``; stdout to ``stdout`` when given); returns the wall seconds."""
    t0 = time.perf_counter()
    with open(log, "ab") as f, open(stdout or os.devnull, "wb") as o:
        f.write(("$ " + " ".join(map(str, cmd)) + "\n").encode())
        f.flush()
        r = subprocess.run([str(c) for c in cmd], stdout=o if stdout else f, stderr=subprocess.STDOUT if not stdout
                           else f, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}; see {log}")
    return time.perf_counter() - t0


def evaluate(path: Path, args, log: Path) -> dict:
    out = path.with_suffix(".eval.json")
    cmd = QG + ["eval", path, "--text", args.text, "--ctx", str(args.ctx), "--chunks", str(args.chunks),
                "--base", args.f32, "--json", "-t", str(args.threads), "--no-progress"]
    if args.base_cache:
        cmd += ["--base-cache", args.base_cache]
    t0 = time.perf_counter()
    with open(log, "ab") as f, open(out, "wb") as o:
        f.write(("$ " + " ".join(map(str, cmd)) + "\n").encode())
        r = subprocess.run([str(c) for c in cmd], stdout=o, stderr=f, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"eval failed: {path}; see {log}")
    res = json.loads(out.read_text())
    res["eval_s"] = time.perf_counter() - t0
    return res


def loads_in_llamacpp(path: Path) -> bool | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    try:
        llm = llama_cpp.Llama(str(path), verbose=False, n_ctx=64, n_threads=1)
        llm.tokenize(b"hello")
        del llm
        return True
    except Exception:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--f32", default=str(ROOT / "out" / "smollm2-f32.gguf"))
    ap.add_argument("--imatrix", default=None, help="llama.cpp importance matrix (default: out/llamacpp-imatrix-c4.gguf, "
                                                   "else bench-out/methods/llamacpp-imatrix.gguf)")
    ap.add_argument("--calib", default=str(SHARED / "data" / "c4-sample-1000.jsonl"))
    ap.add_argument("--text", default=str(SHARED / "data" / "wikitext-2-raw-test.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--presets", default="Q4_K_M,Q3_K_M", help="llama.cpp presets to make and evaluate")
    ap.add_argument("--match", default="Q4_K_M,Q3_K_M", help="qgguf budgets at these presets' file sizes")
    ap.add_argument("--size", action="append", default=[], metavar="NAME=BYTES", help="more qgguf budgets")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration samples of the qgguf method")
    ap.add_argument("--compat", default="llama.cpp")
    ap.add_argument("--mix-types", default=None, help="qgguf convert --mix-types (candidate types)")
    ap.add_argument("--tag", default="", help="suffix of the qgguf entries' names (e.g. -noQ41)")
    ap.add_argument("--sens", default=None, help="recipe with measured sensitivities (default OUT/sensitivity.json)")
    ap.add_argument("--measure", action="store_true", help="measure the sensitivities first (if SENS is missing)")
    ap.add_argument("--proxy-check", type=int, default=24)
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "mixed"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base-cache", default=None,
                    help="the F32 model's logits for qgguf eval --base-cache (default: bench-out/methods/base-logits.npy "
                         "when present, else OUT/base-logits.npy)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--no-eval", action="store_true", help="make the files only")
    ap.add_argument("--table", action="store_true", help="only print OUT/results.json as a markdown table")
    ap.add_argument("--aq-rounds-check", type=int, default=None, metavar="LAYER",
                    help="only compare, on the linears of block LAYER, the AQ layer errors of the measurement's short "
                         "search with the conversion's full one (does the cheap proxy rank the same?)")
    ap.add_argument("--aq-sample-check", default=None, metavar="L1,L2,...",
                    help="only check the sampled AQ search: search the AQ candidates in the layers of the KL divergence "
                         "measurements and in these layers, predict these layers' AQ errors from the others "
                         "(sensitivity.predict_aq_errors) and compare with their searched errors")
    args = ap.parse_args()
    if args.aq_rounds_check is not None:
        print(json.dumps(aq_rounds_check(args.f32, args.calib, args.aq_rounds_check, args.mix_types), indent=1))
        return 0
    if args.aq_sample_check is not None:
        print(json.dumps(aq_sample_check(args.f32, args.calib, [int(v) for v in args.aq_sample_check.split(",")]),
                         indent=1))
        return 0
    if args.table:
        print(table(json.loads((Path(args.out) / "results.json").read_text())))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.base_cache is None:
        shared = ROOT / "bench-out" / "methods" / "base-logits.npy"
        args.base_cache = str(shared if shared.is_file() else out / "base-logits.npy")
    log = out / "bench.log"
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}

    def save():
        tmp = res_path.with_name(".results.json.tmp")
        tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
        os.replace(tmp, res_path)

    imatrix = args.imatrix or next((str(p) for p in (ROOT / "out" / "llamacpp-imatrix-c4.gguf",
                                                     ROOT / "bench-out" / "methods" / "llamacpp-imatrix.gguf")
                                    if p.is_file()), None)
    presets = [p for p in args.presets.split(",") if p]
    if presets and imatrix is None:
        raise SystemExit("no llama.cpp importance matrix: give --imatrix")
    sizes: dict[str, int] = {}
    for p in presets:
        key = f"llama.cpp {p}"
        dest = out / f"llamacpp-{p}.gguf"
        if not dest.is_file() or args.force:
            dt = run([TOOLS / "llama-quantize", "--imatrix", imatrix, args.f32, dest, p, str(args.threads)], log)
            results.setdefault(key, {})["quantize_s"] = dt
        e = results.setdefault(key, {})
        e.update({"kind": "llama.cpp", "preset": p, "file": str(dest), "file_bytes": dest.stat().st_size,
                  "imatrix": imatrix})
        sizes[p] = dest.stat().st_size
        save()

    sens = Path(args.sens) if args.sens else out / "sensitivity.json"
    if not sens.is_file() and not args.measure:
        raise SystemExit(f"no sensitivities at {sens}: run with --measure")

    for p in args.match.split(","):
        if p and p not in sizes:
            f = out / f"llamacpp-{p}.gguf"
            if not f.is_file():
                raise SystemExit(f"--match {p}: no llama.cpp file {f} (add it to --presets)")
            sizes[p] = f.stat().st_size
    budgets = {f"qgguf{args.tag}@{p}": sizes[p] for p in args.match.split(",") if p}
    for item in args.size:
        name, _, b = item.partition("=")
        budgets[f"qgguf{args.tag}@{name}"] = int(b)
    for key, nbytes in budgets.items():
        dest = out / (key.replace("@", "-") + f"-{args.method}.gguf")
        e = results.setdefault(key, {})
        if not dest.is_file() or args.force or e.get("target_bytes") != nbytes:
            rjson = dest.with_suffix(".recipe.json")
            measuring = not sens.is_file()   # the first budget measures; the others reuse its sensitivities
            cmd = QG + ["convert", args.f32, "-o", dest, "--method", args.method, "--calib", args.calib,
                        "--target-size", str(nbytes), "--compat", args.compat, "--save-recipe", rjson,
                        "-t", str(args.threads), "-q", "--json"]
            cmd += ["--proxy-check", str(args.proxy_check)] if measuring else ["--sens-from", sens]
            if args.nsamples:
                cmd += ["--nsamples", str(args.nsamples)]
            if args.mix_types:
                cmd += ["--mix-types", args.mix_types]
            cjson = dest.with_suffix(".convert.json")
            dt = run(cmd, log, stdout=cjson)
            r = json.loads(rjson.read_text())
            c = json.loads(cjson.read_text())
            e.clear()
            e.update({"convert_s": dt, "predicted_kld": r.get("predicted_kld"), "types": _count(r["types"]),
                      "command": " ".join(map(str, cmd)), "tensor_bytes": r.get("tensor_bytes"),
                      "search_s": r.get("search_seconds"), "peak_rss_bytes": c.get("peak_rss_bytes"),
                      "needs_qgguf_runner": c.get("needs_qgguf_runner"),
                      "aq_search_s": r.get("sensitivity", {}).get("_calibration", {}).get("aq_search_seconds")})
            if measuring:
                sens.write_text(rjson.read_text())
                results["_measure"] = {"file": key, "convert_wall_s": dt, "search_s": r.get("search_seconds"),
                                       "conversion_without_search_s": dt - float(r.get("search_seconds") or 0),
                                       "proxy_check": r.get("proxy_check"), "command": " ".join(map(str, cmd))}
        e.update({"kind": "qgguf", "method": args.method, "mix_types": args.mix_types, "file": str(dest), "file_bytes": dest.stat().st_size,
                  "target_bytes": nbytes})
        save()

    if not args.no_eval:
        for key, e in sorted(results.items()):
            if key.startswith("_") or "kld" in e and not args.force:
                continue
            p = Path(e["file"])
            r = evaluate(p, args, log)
            e.update({k: r.get(k) for k in ("ppl", "ppl_err", "kld", "kld_err", "kld_p99", "same_top", "eval_s")})
            e["llama_cpp_loads"] = None if e.get("needs_qgguf_runner") else loads_in_llamacpp(p)
            save()
            print(f"{key}: {e['file_bytes']:,} bytes, KLD {e['kld']:.4f} ± {e['kld_err']:.4f}, PPL {e['ppl']:.3f}",
                  file=sys.stderr)
    print(json.dumps(results, indent=1, sort_keys=True))
    return 0


def _calibrated_inputs(f32: str, calib: str, nsamples: int, seqlen: int):
    """(source, tensor names, hparams, rope tables, embedded calibration tokens) of the checks below (1 thread)."""
    import numpy as np
    import torch

    from qgguf.convert.sources import open_source
    from qgguf.quantize.blockwise import _calibration
    from qgguf.runtime import model as rm

    torch.set_num_threads(1)
    src = open_source(f32)
    md = {k: v.value for k, v in src.metadata.items()}
    md["general.architecture"] = src.arch
    names = {t.name for t in src.tensors}
    seqs, _ = _calibration(src, md, names, calib, nsamples, seqlen, 0, False, 1)
    emb = torch.from_numpy(np.array(src.load("token_embd.weight"), np.float32))
    hp = rm.hparams_from_metadata(md, emb.shape[0], src.path)
    rope = rm.rope_tables(hp, seqlen, None)
    return src, names, hp, rope, rm.embed(emb, torch.tensor(seqs, dtype=torch.long))


def _linear_grams(hp, w: dict, x, rope) -> dict:
    """Float32 Gram matrix ``X^T X`` of each block linear's inputs (float weights ``w``, block input ``x``)."""
    import torch

    from qgguf.runtime import model as rm

    n = rm.rms_norm(x, w["attn_norm"], hp.norm_eps)
    a = rm.attention(hp, w, n, rope)
    m = rm.rms_norm(x + rm.linear(w, "attn_output", a), w["ffn_norm"], hp.norm_eps)
    h = rm.ffn_hidden(w, m)
    inputs = {"attn_q": n, "attn_k": n, "attn_v": n, "attn_output": a, "ffn_gate": m, "ffn_up": m, "ffn_down": h}
    grams = {}
    for k, inp in inputs.items():
        t2 = inp.reshape(-1, inp.shape[-1])
        grams[k] = (t2.T @ t2).to(torch.float32)
    return grams


def aq_rounds_check(f32: str, calib: str, layer: int, types: str | None, nsamples: int = 8, seqlen: int = 256) -> dict:
    """Layer errors e(t, q) = tr(dW H dW^T)/N of block ``layer``'s linears for every AQ candidate, with the
    sensitivity measurement's short AQ search (AQ_MEASURE) and with the conversion's (quantize/aq.py defaults,
    without block fine-tuning); Spearman rank correlation over all (tensor, type) pairs and per tensor."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from qgguf import gguf_types
    from qgguf.quantize.aq import METHOD_DEFAULTS
    from qgguf.quantize.sensitivity import AQ_CANDIDATES, _aq_quantized, _err, _spearman
    from qgguf.runtime import model as rm

    src, names, hp, rope, x = _calibrated_inputs(f32, calib, nsamples, seqlen)
    shapes = {t.name: tuple(t.shape) for t in src.tensors}
    from qgguf.quantize.blockwise import short_key
    with torch.no_grad():
        for il in range(layer + 1):
            keys = {short_key(n, il): n for n in names if short_key(n, il) is not None}
            w = {k: torch.from_numpy(np.array(src.load(n), np.float32).reshape(shapes[n])) for k, n in keys.items()}
            if il < layer:
                x = rm.block_forward(hp, w, x, rope)
        grams = _linear_grams(hp, w, x, rope)
    N = float(x.shape[0] * x.shape[1])
    cands = [t for t in (types.split(",") if types else AQ_CANDIDATES)]
    full = {k: v for k, v in METHOD_DEFAULTS.items()}
    pairs, per_tensor = [], {}
    for k, H in grams.items():
        name = keys[k]
        W = w[k].reshape(-1, shapes[name][-1])
        ws = np.ascontiguousarray(W.numpy())
        row = {}
        for q in cands:
            qt = gguf_types.get(q)
            t0 = time.perf_counter()
            e_cheap = _err(W, _aq_quantized(qt, ws, H, name, 0), H, N)
            t1 = time.perf_counter()
            e_full = _err(W, _aq_quantized(qt, ws, H, name, 0, full), H, N)
            t2_ = time.perf_counter()
            row[q] = {"cheap": e_cheap, "full": e_full, "cheap_s": t1 - t0, "full_s": t2_ - t1}
            pairs.append((e_cheap, e_full))
            print(f"{name} {q}: cheap {e_cheap:.4g} ({t1 - t0:.1f} s), full {e_full:.4g} ({t2_ - t1:.1f} s)",
                  file=sys.stderr, flush=True)
        per_tensor[name] = row
    c, f = np.array(pairs).T
    same_order = sum(_spearman([v["cheap"] for v in r.values()], [v["full"] for v in r.values()]) > 0.999
                     for r in per_tensor.values())
    return {"layer": layer, "types": cands, "pairs": len(pairs), "spearman": _spearman(c, f),
            "ratio_full_to_cheap_median": float(np.median(f / c)), "tensors_same_type_order": int(same_order),
            "tensors": per_tensor, "nsamples": nsamples, "seqlen": seqlen,
            "cheap_s": sum(v["cheap_s"] for r in per_tensor.values() for v in r.values()),
            "full_s": sum(v["full_s"] for r in per_tensor.values() for v in r.values())}


def aq_sample_check(f32: str, calib: str, check: list[int], nsamples: int = 8, seqlen: int = 256) -> dict:
    """The sampled AQ search checked against the searched errors: layer errors of every standard candidate and every
    AQ candidate (the measurement's search, AQ_MEASURE) of the block linears in the searched layers (every
    ``n_layer // 6``-th and the last, as the measurement) and in ``check``; the check layers' AQ errors predicted
    from the searched layers (sensitivity.predict_aq_errors) and compared (Spearman, type order per tensor)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from qgguf import gguf_types
    from qgguf.convert.budget import file_bytes
    from qgguf.quantize.blockwise import short_key
    from qgguf.quantize.sensitivity import (AQ_CANDIDATES, STANDARD_CANDIDATES, TensorSensitivity, _aq_prediction_check,
                                            _aq_quantized, _err, _quantized, candidate_types, predict_aq_errors)
    from qgguf.runtime import model as rm

    src, names, hp, rope, x = _calibrated_inputs(f32, calib, nsamples, seqlen)
    N = float(x.shape[0] * x.shape[1])
    shapes = {t.name: tuple(t.shape) for t in src.tensors}
    stride = max(1, hp.n_layer // 6)
    searched = sorted(set(range(0, hp.n_layer, stride)) | {hp.n_layer - 1})
    sens, keys_of, held = {}, {}, {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for il in range(max(searched + check) + 1):
            keys = {short_key(n, il): n for n in names if short_key(n, il) is not None}
            w = {k: torch.from_numpy(np.array(src.load(n), np.float32).reshape(shapes[n])) for k, n in keys.items()}
            if il in searched or il in check:
                for k, H in _linear_grams(hp, w, x, rope).items():
                    name = keys[k]
                    W = w[k].reshape(-1, shapes[name][-1])
                    ws = np.ascontiguousarray(W.numpy())
                    imp = np.ascontiguousarray((torch.diagonal(H) / N).numpy(), dtype=np.float32)
                    ts = TensorSensitivity(name, shapes[name], {}, {})
                    for q in candidate_types(shapes[name], STANDARD_CANDIDATES + AQ_CANDIDATES):
                        qt = gguf_types.get(q)
                        ts.nbytes[q] = file_bytes(name, shapes[name], qt)
                        aq = q.startswith("aq-")
                        e = _err(W, _aq_quantized(qt, ws, H, name, 0) if aq else _quantized(qt, ws, imp), H, N)
                        if aq and il in check:
                            held.setdefault(name, {})[q] = e
                        else:
                            ts.error[q] = e
                    sens[name] = ts
                    keys_of[name] = (il, k)
                print(f"layer {il} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            x = rm.block_forward(hp, w, x, rope)
    pending = {n: list(d) for n, d in held.items()}
    predict_aq_errors(sens, keys_of, pending)
    res = _aq_prediction_check(sens, held, keys_of)
    res.update({"searched_layers": searched, "check_layers": check, "nsamples": nsamples, "seqlen": seqlen,
                "seconds": time.perf_counter() - t0})
    return res


def table(results: dict) -> str:
    """Markdown: one row per evaluated file, by size."""
    rows = ["| file | bytes | KLD | PPL | same top | types | loads in llama.cpp |",
            "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    items = sorted(((k, e) for k, e in results.items() if not k.startswith("_") and e.get("kld") is not None),
                   key=lambda kv: kv[1]["file_bytes"])
    for k, e in items:
        types = e.get("types") or {}
        mix = ", ".join(f"{t} {n}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]))
        extra = f" (predicted {e['predicted_kld']:.4f})" if e.get("predicted_kld") is not None else ""
        rows.append(f"| {k} | {e['file_bytes']:,} | {e['kld']:.4f} ± {e['kld_err']:.4f}{extra} | "
                    f"{e['ppl']:.3f} | {100 * e['same_top']:.2f} % | {mix} | {e.get('llama_cpp_loads')} |")
    m = results.get("_measure")
    if m:
        rows.append("")
        rows.append(f"search {m['search_s']:.1f} s, the conversion it planned {m['conversion_without_search_s']:.1f} s "
                    f"(ratio {m['search_s'] / max(1e-9, m['conversion_without_search_s']):.2f}); proxy check: "
                    f"Spearman {m['proxy_check'].get('spearman', float('nan')):.3f} over "
                    f"{m['proxy_check'].get('pairs')} pairs")
    return "\n".join(rows)


def _count(types: dict) -> dict:
    out: dict[str, int] = {}
    for t in types.values():
        out[t] = out.get(t, 0) + 1
    return out


if __name__ == "__main__":
    raise SystemExit(main())
