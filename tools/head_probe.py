"""The tied token embedding / output matrix of a llama model in AQ against standard types (session 12, AQ issue).

Three measurements, each on the F32 model (run from the repository root):

  errors     layer error tr(dW H dW^T)/N of the matrix in standard types and AQ configurations, H the Gram matrix
             of the float model's final normed hidden states on --nsamples x 256 calibration tokens (what
             quantize/sensitivity.py measures for the head)
             python tools/head_probe.py errors --types Q5_0,IQ4_NL,Q4_0,aq-4x8-g8,aq-3x8-g8
  roles      WikiText-2 KL divergence (--chunks x 512 tokens, second halves) with only that matrix replaced by a
             stored one (a conversion checkpoint's head.npz), in both roles, as the output matrix only and as the
             embedding only
             python tools/head_probe.py roles --head IQ4_NL=bench-out/b-qe/pristine-recipe/head.npz \
                 --head aq-4x8-g8=bench-out/b-emb/pristine-recipe/head.npz
  rowweight  the AQ fit with rows weighted by their tokens' mean predicted probability plus a floor (rows scaled
             by sqrt(w) before the fit and the scales divided after: exactly sum_t w_t ||dW_t||_H^2), then the
             both-roles KL divergence
             python tools/head_probe.py rowweight --floors 1,100
  tiers      (session 14) the rows split into tiers by their tokens' mean predicted probability on the calibration
             text, each tier in its own type (standard types, or an AQ configuration fitted on the tier's rows), then
             the both-roles KL divergence; plans list the tiers from the likeliest rows down, the last takes the rest
             python tools/head_probe.py tiers IQ4_NL Q8_0@1024,IQ4_NL Q8_0@4096,IQ4_NL@12288,aq-3x8-g8
             (--text FILE or --c4-from 600: evaluate on another text; --exact: also the per-token weighted error)
  swap       a converted file's KL divergence, the F32 model's with only its embedding/output matrix, and the
             file's with the F32 matrix
             python tools/head_probe.py swap bench-out/b-tier/whole.gguf
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

F32 = "out/smollm2-f32.gguf"
CALIB = "../shared/data/c4-sample-1000.jsonl"
WIKI = "../shared/data/wikitext-2-raw-test.txt"


def _model(path, threads):
    from qgguf.runtime.model import LlamaModel
    return LlamaModel.from_gguf(path, threads=threads)


def _final_states(m, nsamples: int):
    """(final normed hidden states (N, n_embd), the matrix W (V, n_embd)) of the calibration text."""
    from qgguf.quantize.calib import calibration_sequences
    from qgguf.runtime import model as rm
    from qgguf.runtime.tokenizer import Tokenizer
    tok = Tokenizer.from_metadata(m.metadata)
    seqs, _ = calibration_sequences(CALIB, None, tok, m.metadata, nsamples, 256, 0)
    ids = torch.tensor(seqs)
    W = m.tok_embd.dense_weight().float().clone()
    with torch.no_grad():
        x = rm.embed(W, ids)
        rope = rm.rope_tables(m.hp, ids.shape[1])
        for il in range(m.hp.n_layer):
            x = rm.block_forward(m.hp, m.block_weights(il), x, rope)
        h = rm.final_norm(m.hp, m.output_norm, x).reshape(-1, m.hp.n_embd)
    return h, W


def _aq_options():
    from qgguf.quantize.aq_core import AQOptions   # the conversion's defaults (quantize/aq.py)
    return AQOptions(beam=1, adam_steps=20, adam_later=5, lr=0.005, kmeans_iters=15, kmeans_points=16384, damp=1.0)


def _kld_both(m, base, Wq, chunks, text=WIKI):
    from qgguf.runtime.evaluate import evaluate_loaded, load_tokenizer
    from qgguf.runtime.linear import DenseLinear
    m.tok_embd = DenseLinear("token_embd.weight", Wq)
    m.output = m.tok_embd
    r = evaluate_loaded(m, load_tokenizer(F32), text, ctx=512, chunks=chunks, base_model=base, progress=False)
    return r["kld"], r["kld_err"]


def errors(a):
    from qgguf import gguf_types
    from qgguf.quantize.aq_core import dequantize, parse_config, quantize_matrix
    h, W = _final_states(_model(F32, a.threads), a.nsamples)
    H = h.double().T @ h.double()
    N = h.shape[0]
    imp = torch.diagonal(H).float().numpy() / N
    res = {}
    for q in a.types.split(","):
        t0 = time.time()
        if q.startswith("aq-"):
            r = quantize_matrix(W, H.float(), parse_config(q), _aq_options(), seed=0)
            Wq = dequantize(r.codes, r.codebooks.half().float(), r.scales)
        else:
            qt = gguf_types.get(q)
            Wq = torch.from_numpy(np.array(qt.dequantize(qt.quantize(W.numpy(), imp), tuple(W.shape)), np.float32))
        D = Wq.double() - W.double()
        res[q] = float(((D @ H) * D).sum()) / N
        print(q, f"layer error {res[q]:.1f}", f"({time.time() - t0:.0f} s)", flush=True)
    print(json.dumps(res))


def roles(a):
    from qgguf import gguf_types
    from qgguf.runtime.evaluate import evaluate_loaded, load_tokenizer
    from qgguf.runtime.linear import DenseLinear
    base, m = _model(F32, a.threads), _model(F32, a.threads)
    Wf = base.tok_embd.dense_weight().float().clone()
    res = {}
    for spec in a.head:
        typ, path = spec.split("=", 1)
        with np.load(path) as z:
            b = z["t/token_embd.weight"]
        Wq = torch.from_numpy(np.array(gguf_types.get(typ).dequantize(b.view(np.uint8), tuple(Wf.shape)),
                                       np.float32).reshape(Wf.shape))
        print(typ, "relative squared error", float((Wq - Wf).pow(2).sum() / Wf.pow(2).sum()), flush=True)
        for role, (we, wo) in {"both": (Wq, Wq), "output": (Wf, Wq), "embedding": (Wq, Wf)}.items():
            m.tok_embd = DenseLinear("token_embd.weight", we)
            m.output = DenseLinear("output.weight", wo)
            r = evaluate_loaded(m, load_tokenizer(F32), WIKI, ctx=512, chunks=a.chunks, base_model=base, progress=False)
            res[f"{typ}/{role}"] = (r["kld"], r["kld_err"])
            print(typ, role, r["kld"], r["kld_err"], flush=True)
    print(json.dumps(res))


def rowweight(a):
    from qgguf.quantize.aq_core import dequantize, parse_config, quantize_matrix
    m = _model(F32, a.threads)
    h, W = _final_states(m, a.nsamples)
    with torch.no_grad():
        pbar = torch.zeros(W.shape[0], dtype=torch.float64)
        for s in range(0, h.shape[0], 512):
            pbar += torch.softmax(h[s:s + 512] @ W.T, -1).double().sum(0)
        pbar /= h.shape[0]
        H = (h.double().T @ h.double()).float()
    V = W.shape[0]
    base = _model(F32, a.threads)
    res = {}
    for f in a.floors.split(","):
        w = (pbar + float(f) / V).float()
        sw = (w / w.mean()).sqrt()
        r = quantize_matrix(W * sw[:, None], H, parse_config(a.config), _aq_options(), seed=0)
        Wq = dequantize(r.codes, r.codebooks.half().float(), r.scales / sw)
        res[f"p+{f}/V"] = _kld_both(m, base, Wq, a.chunks)
        print(f"p+{f}/V", "relative squared error", float((Wq - W).pow(2).sum() / W.pow(2).sum()),
              "KLD", res[f"p+{f}/V"], flush=True)
    print(json.dumps(res))


def _mean_probs(h, W):
    with torch.no_grad():
        pbar = torch.zeros(W.shape[0], dtype=torch.float64)
        for s in range(0, h.shape[0], 512):
            pbar += torch.softmax(h[s:s + 512] @ W.T, -1).double().sum(0)
    return pbar / h.shape[0]


def tiers(a):
    """Rows split by their tokens' mean predicted probability on the calibration text, each tier its own type."""
    from qgguf import gguf_types
    from qgguf.quantize.aq_core import dequantize, parse_config, quantize_matrix
    m = _model(F32, a.threads)
    h, W = _final_states(m, a.nsamples)
    pbar = _mean_probs(h, W)
    order = torch.argsort(pbar, descending=True)
    H = (h.double().T @ h.double())
    N = h.shape[0]
    imp = torch.diagonal(H).float().numpy() / N
    base = _model(F32, a.threads)
    V, K = W.shape
    res = {}
    cache = {}
    for plan in a.plans:
        Wq = torch.empty_like(W)
        start, nbytes = 0, 0
        for part in plan.split(","):
            typ, _, n = part.partition("@")
            n = V - start if not n else int(n)
            rows = order[start:start + n]
            key = (typ, start, n)
            if key not in cache:
                if typ.startswith("aq-"):
                    cfg = parse_config(typ)
                    r = quantize_matrix(W[rows].contiguous(), H.float(), cfg, _aq_options(), seed=0)
                    cache[key] = (dequantize(r.codes, r.codebooks.half().float(), r.scales),
                                  cfg.nbytes(n, K))
                else:
                    qt = gguf_types.get(typ)
                    Ws = W[rows].contiguous()
                    cache[key] = (torch.from_numpy(np.array(qt.dequantize(qt.quantize(Ws.numpy(), imp), tuple(Ws.shape)), np.float32)),
                                  qt.nbytes((n, K)))
            Wq[rows] = cache[key][0].reshape(n, K)
            nbytes += cache[key][1]
            start += n
        D = Wq.double() - W.double()
        w_err = float(((D @ H) * D).sum()) / N
        res[plan] = dict(bytes=nbytes, layer_error=w_err, **_weighted(h, W, pbar, D, a.exact),
                         kld=_kld_both(m, base, Wq, a.chunks, a.text))
        print(plan, res[plan], flush=True)
    ref = res.get("IQ4_NL")
    if ref:   # the allocator's weighted errors relative to IQ4_NL's
        print({p: round(r["weighted_error"] / ref["weighted_error"], 3) for p, r in res.items()})
    print(json.dumps(res))


@torch.no_grad()
def _weighted(h, W, pbar, D, exact: bool) -> dict:
    """The allocator's probability-weighted layer error of the error D (quantize/sensitivity.py: sum_v V pbar_v
    D_v^T H D_v / N, all rows), and with ``exact`` the per-token weighting sum_t sum_v p_tv (h_t . D_v)^2 / N."""
    H = (h.double().T @ h.double())
    N, V = h.shape[0], W.shape[0]
    row = ((D @ H) * D).sum(1) / N
    out = {"weighted_error": float((pbar * V * row).sum())}
    if exact:
        tot = 0.0
        Df = D.float()
        for s in range(0, N, 512):
            hs = h[s:s + 512]
            E = hs @ Df.T
            tot += float((torch.softmax(hs @ W.T, -1) * E * E).double().sum())
        out["per_token_weighted_error"] = tot / N
    return out


def swap(a):
    """A converted file: its KL divergence, the F32 model's with only the file's embedding/output matrix, and the
    file's with the F32 matrix (tied models)."""
    from qgguf.runtime.evaluate import evaluate_loaded, load_tokenizer
    from qgguf.runtime.linear import DenseLinear, load_llama
    base = _model(F32, a.threads)
    Wf = base.tok_embd.dense_weight().float().clone()
    q = load_llama(a.file, threads=a.threads)
    Wq = q.tok_embd.dense_weight().float().clone()

    def ev(m):
        r = evaluate_loaded(m, load_tokenizer(F32), a.text, ctx=512, chunks=a.chunks, base_model=base, progress=False)
        return round(r["kld"], 4), round(r["kld_err"], 4)
    res = {"file": ev(q)}
    m = _model(F32, a.threads)
    m.tok_embd = m.output = DenseLinear("token_embd.weight", Wq)
    res["f32_with_its_matrix"] = ev(m)
    q.tok_embd = q.output = DenseLinear("token_embd.weight", Wf)
    res["file_with_f32_matrix"] = ev(q)
    print(json.dumps(res))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("errors", "roles", "rowweight", "tiers", "swap"):
        p = sub.add_parser(name)
        p.add_argument("-t", "--threads", type=int, default=2)
        p.add_argument("--nsamples", type=int, default=32)
        p.add_argument("--chunks", type=int, default=8)
        p.add_argument("--text", default=WIKI, help="evaluation text (tiers, swap)")
        p.add_argument("--c4-from", type=int, default=None, metavar="N",
                       help="evaluate on the calibration file's documents N.. instead (held out from its first ones)")
        if name == "errors":
            p.add_argument("--types", default="Q5_0,IQ4_NL,Q4_0,aq-4x8-g8,aq-3x8-g8")
        if name == "roles":
            p.add_argument("--head", action="append", required=True, metavar="TYPE=HEAD.npz")
        if name == "rowweight":
            p.add_argument("--floors", default="1,100", help="w_t = mean p_t + FLOOR / n_vocab")
            p.add_argument("--config", default="aq-4x8-g8")
        if name == "tiers":
            p.add_argument("plans", nargs="+", metavar="TYPE@ROWS,...,TYPE",
                           help="tiers from the likeliest rows down; the last takes the rest")
            p.add_argument("--exact", action="store_true", help="also the per-token weighted error")
        if name == "swap":
            p.add_argument("file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.c4_from is not None:
        import tempfile
        with open(CALIB) as f:
            docs = [json.loads(line)["text"] for line in f if line.strip()]
        t = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        t.write("\n\n".join(docs[a.c4_from:]))
        t.close()
        a.text = t.name
    {"errors": errors, "roles": roles, "rowweight": rowweight, "tiers": tiers, "swap": swap}[a.cmd](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
