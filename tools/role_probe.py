#!/usr/bin/env python3
"""Quick ablations of the AQ fit on one role of every block: the float model with that role's 30 matrices
replaced, no fine-tuning, KLD against the float model on a few WikiText-2 chunks (and, for an AQ fit, the mean
of its 30 searches' own relative error tr(dW H dW^T) / tr(W H W^T): H damped as the options say, the outlier
positions zeroed in W before the fit, as :func:`qgguf.quantize.aq.fit_matrix` reports it).

    python tools/role_probe.py --configs "aq-2x8-g8:outliers=0.002;damp=1" "file:bench-out/aq/lc-ffn_down-IQ2_XXS.gguf"

Each ``--configs`` entry is ``aq-MxB-gG[:KEY=VALUE;...]`` (AQ options over the method's defaults, plus
``outliers=F``: the share of weights kept exact, as in a conversion: :func:`qgguf.quantize.aq.fit_matrix`; ``diag=1``: fit
against diag(H) only) or ``file:PATH`` (that file's matrices of the role, e.g. llama.cpp's). The Gram matrices
come from the float model on ``--nsamples`` x 256 tokens of ``--calib``; every matrix sees the float model's
inputs (not the quantized model's, as in a conversion), so a probe takes minutes, not a conversion's quarter hour.
The figures are indicative (``--chunks`` chunks of 512 tokens, default 2); a conversion and ``qgguf eval`` give
the real ones (tools/compare_codebooks.py).

Two ablations of the objective (session 19; docs/BENCHMARKS.md, both worse than the plain Gram matrix):
``--fisher sampled[:ALPHA]`` weights each token's row of X by ||dL/dy_t||^2 (the gradient of the cross-entropy
at that linear's output, on tokens drawn from the model or, ``empirical``, the text's next tokens), a one-group
GuidedQuant-style objective; ``--transform fold|rotate`` fits an input-side role after folding its norm weight
into it (and rotating the residual stream by a random orthogonal matrix, QuaRot-style).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qgguf.quantize.aq import aq_options, fit_matrix  # noqa: E402
from qgguf.quantize.aq_core import dequantize, parse_config  # noqa: E402
from qgguf.quantize.calib import calibration_sequences  # noqa: E402
from qgguf.runtime.evaluate import load_tokenizer  # noqa: E402
from qgguf.runtime.linear import DenseLinear, load_llama  # noqa: E402

ATTR = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo", "ffn_gate": "w_gate", "ffn_up": "w_up",
        "ffn_down": "w_down"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "out" / "smollm2-f32.gguf"))
    ap.add_argument("--calib", default=str(ROOT.parent / "shared" / "data" / "c4-sample-1000.jsonl"))
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"))
    ap.add_argument("--role", default="ffn_down", choices=sorted(ATTR))
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--fisher", default="", metavar="KIND[:ALPHA]", help="weight each calibration token's row of X by its squared output "
                    "gradient norm ||dL/dy_t||^2 (cross-entropy on the next tokens: 'empirical'; on tokens drawn from "
                    "the model: 'sampled'); ALPHA as 'empirical:0.5' takes the weights to that power")
    ap.add_argument("--transform", default="", choices=["", "fold", "rotate"],
                    help="fit W T against T^-1 H T^-T and use the fit times T^-1 (input-side roles: T = diag(norm "
                    "weight) for 'fold', times a random orthogonal matrix for 'rotate': the residual stream rotation "
                    "a model could absorb, QuaRot/SpinQuant-style)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    attr = ATTR[a.role]
    base, m = load_llama(a.model, threads=1), load_llama(a.model, threads=1)
    tok = load_tokenizer(a.model)
    toks = tok.encode(Path(a.text).read_text()[:40000 * a.chunks])
    evals = [torch.tensor(toks[i * 512:(i + 1) * 512]) for i in range(a.chunks)]
    with torch.no_grad():
        ref = [torch.log_softmax(base(ids).double(), -1) for ids in evals]

    def kld() -> float:
        tot = 0.0
        with torch.no_grad():
            for ids, la in zip(evals, ref):
                lb = torch.log_softmax(m(ids).double(), -1)
                tot += float((la.exp() * (la - lb)).sum(-1).mean())
        return tot / len(evals)

    from qgguf.convert.sources import open_source
    from qgguf.runtime.tokenizer import Tokenizer
    src = open_source(a.model)
    md = {k: v.value for k, v in src.metadata.items()}
    md["general.architecture"] = src.arch
    seqs, _ = calibration_sequences(a.calib, None, Tokenizer.from_metadata(md), md, a.nsamples, 256, 0)
    grams: dict[int, torch.Tensor] = {}
    kind, _, alpha = a.fisher.partition(":")
    alpha = float(alpha or 1)
    if kind not in ("", "empirical", "sampled"):
        ap.error(f"--fisher {a.fisher}: KIND is 'empirical' or 'sampled'")
    weights: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(base.layers))}
    if kind:
        gen = torch.Generator().manual_seed(0)

        def ghook(il):
            def f(_mod, _inp, out):
                if not out.requires_grad:
                    out = out.detach().requires_grad_()
                out.register_hook(lambda g: weights[il].append(g.reshape(-1, g.shape[-1]).double().pow(2).sum(-1)))
                return out
            return f

        def fresh_cache():   # empty, and cut from the last sequence's autograd graph
            base.reset()
            base.cache.k = [k.detach() for k in base.cache.k]
            base.cache.v = [v.detach() for v in base.cache.v]

        hs = [getattr(L, attr).register_forward_hook(ghook(i)) for i, L in enumerate(base.layers)]
        for s in seqs:
            ids = torch.tensor(s)
            fresh_cache()
            with torch.enable_grad():   # Model.forward is no_grad; its body is differentiable
                logits = type(base).forward.__wrapped__(base, ids).double()
            if kind == "sampled":
                tgt = torch.multinomial(torch.softmax(logits.detach()[:-1], -1), 1, generator=gen).squeeze(-1)
            else:
                tgt = ids[1:]
            with torch.enable_grad():
                torch.nn.functional.cross_entropy(logits[:-1], tgt, reduction="sum").backward()
        fresh_cache()
        for h in hs:
            h.remove()
        for il in (0, 5, 15, 29):
            w = torch.cat(weights[il]) if weights[il] else None
            if w is not None:
                w = w / w.mean()
                q = torch.quantile(w.float(), torch.tensor([0.5, 0.9, 0.99]))
                print(f"layer {il} weights / mean: median {q[0]:.3f}, 90% {q[1]:.3f}, 99% {q[2]:.3f}, "
                      f"max {float(w.max()):.1f} at token {int(w.argmax())}", flush=True)

    def hook(il):
        def f(_mod, inp, _out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            if kind:
                w = weights[il][cnt[il]].pow(alpha)
                cnt[il] += 1
                x = x * w.sqrt().unsqueeze(-1)
            grams[il] = grams.get(il, 0) + x.t() @ x
        return f

    cnt = {i: 0 for i in range(len(base.layers))}
    hs = [getattr(L, attr).register_forward_hook(hook(i)) for i, L in enumerate(base.layers)]
    with torch.no_grad():
        for s in seqs:
            base(torch.tensor(s))
    for h in hs:
        h.remove()
    if kind:   # the same scale as the plain Gram matrix (damping is relative to its diagonal)
        ntok = sum(len(s) for s in seqs)
        for il in grams:
            wsum = float(torch.cat(weights[il]).pow(alpha).sum())
            grams[il] *= ntok / wsum
    for spec in a.configs:
        t0 = time.perf_counter()
        rel = []   # an AQ fit's relative errors, one per layer
        if spec.startswith("file:"):
            other = load_llama(spec[5:], threads=1)
            for L, O in zip(m.layers, other.layers):
                setattr(L, attr, getattr(O, attr))
        else:
            name, _, opts = spec.partition(":")
            kv = dict(x.split("=", 1) for x in opts.split(";") if x)
            outl, diag = float(kv.pop("outliers", 0)), bool(int(kv.pop("diag", 0)))
            cfg, o = parse_config(name), aq_options(kv)
            for il, L in enumerate(m.layers):
                W = getattr(base.layers[il], attr).dense_weight().numpy().astype(np.float32)
                H = grams[il].numpy()
                T = None
                if a.transform:
                    norm = {"ffn_gate": "ffn_norm", "ffn_up": "ffn_norm", "attn_q": "attn_norm", "attn_k": "attn_norm",
                            "attn_v": "attn_norm"}[a.role]
                    T = np.diag(getattr(base.layers[il], norm).double().numpy())
                    if a.transform == "rotate":
                        q, r = np.linalg.qr(np.random.default_rng(1000 + il).standard_normal(T.shape))
                        T = T @ (q * np.sign(np.diag(r)))
                    Ti = np.linalg.inv(T)
                    W = (W.astype(np.float64) @ T).astype(np.float32)
                    H = Ti @ H @ Ti.T
                if diag:
                    H = np.diag(np.diag(H))
                r, idx = fit_matrix(W, H, cfg, o, outl, seed=il)
                rel.append(r.rel_err)
                Wq = dequantize(r.codes, r.codebooks, r.scales).numpy()
                if idx is not None:
                    Wq.reshape(-1)[idx] = W.reshape(-1)[idx]
                if T is not None:
                    Wq = (Wq.astype(np.float64) @ Ti).astype(np.float32)
                setattr(L, attr, DenseLinear(getattr(L, attr).name, torch.from_numpy(Wq)))
        fit = f", mean relative error {np.mean(rel):.5f}" if rel else ""
        print(f"{a.role} {spec}: KLD ({a.chunks} chunks) {kld():.4f}{fit}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
