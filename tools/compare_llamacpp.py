#!/usr/bin/env python3
"""Run qgguf's evaluator and llama.cpp's (through llama-cpp-python) on the same model and text, side by side.

Both follow llama-perplexity's protocol (see qgguf.runtime.evaluate): qgguf with its own tokenizer and
torch forward pass, llama.cpp with its own tokenizer and logits, chunk by chunk. Prints PPL (and, with
--base, KLD, its 99th percentile and the same-top rate) for both, and their ratio.

    python tools/compare_llamacpp.py MODEL.gguf --text wiki.test.raw [--ctx 512] [--chunks 40]
        [--base REF.gguf] [--threads 2] [--kv-f32] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def llamacpp_backend(model_path: str, ctx: int, threads: int, kv_f32: bool):
    import llama_cpp

    kw = dict(n_ctx=ctx, n_batch=ctx, n_ubatch=min(ctx, 512), logits_all=True, verbose=False,
              n_threads=threads, n_threads_batch=threads)
    if kv_f32:
        kw.update(type_k=0, type_v=0)  # GGML_TYPE_F32 (llama.cpp's default cache is F16)
    llm = llama_cpp.Llama(model_path=model_path, **kw)

    def logits(chunk: list, first: int):
        import numpy as np

        llm.reset()
        llm.eval(chunk)
        return np.array(llm.scores[first:len(chunk)], dtype=np.float32)

    return llm, logits


def run_llamacpp(model: str, text: str, ctx: int, chunks, base, threads: int, kv_f32: bool, progress: bool) -> dict:
    import llama_cpp

    from qgguf.runtime.evaluate import plan_chunks, run_protocol

    llm, fn = llamacpp_backend(model, ctx, threads, kv_f32)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    bos = int(llama_cpp.llama_vocab_bos(vocab))
    n_chunk = plan_chunks(len(tokens), ctx, chunks)
    base_fn = None
    if base:
        _, base_fn = llamacpp_backend(base, ctx, threads, kv_f32)
    stats = run_protocol(tokens, ctx, n_chunk, add_bos, bos, fn, base_fn, progress=progress, desc="llama.cpp")
    res = stats.result()
    res.update(chunks=n_chunk, ctx=ctx, tokens=len(tokens))
    return res, tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--text", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--base", default=None, help="reference model for KL divergence")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--kv-f32", action="store_true", help="llama.cpp KV cache in F32 (default: its F16)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from qgguf.runtime.evaluate import evaluate, read_text

    text = read_text(args.text)
    progress = not args.no_progress
    t0 = time.time()
    ours = evaluate(args.model, args.text, ctx=args.ctx, chunks=args.chunks, base=args.base,
                    threads=args.threads, progress=progress)
    t1 = time.time()
    theirs, lc_tokens = run_llamacpp(args.model, text, args.ctx, args.chunks, args.base, args.threads,
                                     args.kv_f32, progress)
    t2 = time.time()
    keys = ["ppl", "ppl_err", "kld", "kld_err", "kld_p99", "same_top", "same_top_err", "chunks", "ctx", "tokens"]
    out = {"model": args.model, "text": args.text, "base": args.base,
           "qgguf": {k: ours.get(k) for k in keys} | {"seconds": round(t1 - t0, 1)},
           "llamacpp": {k: theirs.get(k) for k in keys} | {"seconds": round(t2 - t1, 1),
                                                          "kv_cache": "f32" if args.kv_f32 else "f16"}}
    ratios = {}
    for k in ("ppl", "kld", "kld_p99", "same_top"):
        a, b = ours.get(k), theirs.get(k)
        if a is not None and b is not None and b != 0:
            ratios[k] = a / b
    out["ratio_qgguf_over_llamacpp"] = ratios
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"model {args.model}  text {args.text}  ctx {args.ctx}  chunks {ours['chunks']}"
          + (f"  base {args.base}" if args.base else ""))
    print(f"tokens: qgguf {ours['tokens']}, llama.cpp {theirs['tokens']}")
    print(f"{'':10s}{'qgguf':>24s}{'llama.cpp':>24s}{'ratio':>10s}")

    def row(name, key, errkey=None, scale=1.0, fmt="{:.4f}"):
        a, b = ours.get(key), theirs.get(key)
        if a is None or b is None:
            return
        sa = fmt.format(a * scale) + (f" ± {fmt.format(ours[errkey] * scale)}" if errkey else "")
        sb = fmt.format(b * scale) + (f" ± {fmt.format(theirs[errkey] * scale)}" if errkey else "")
        r = f"{a / b:.4f}" if b else "-"
        print(f"{name:10s}{sa:>24s}{sb:>24s}{r:>10s}")

    row("PPL", "ppl", "ppl_err")
    row("KLD", "kld", "kld_err", fmt="{:.6f}")
    row("KLD p99", "kld_p99", fmt="{:.6f}")
    row("same top%", "same_top", "same_top_err", scale=100, fmt="{:.3f}")
    print(f"time: qgguf {t1 - t0:.1f}s, llama.cpp {t2 - t1:.1f}s (KV cache {out['llamacpp']['kv_cache']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
