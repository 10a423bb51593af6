#!/usr/bin/env python3
"""Single-layer KL divergence of one role's matrices, taken from quantized files, on the calibration text.

    python tools/layer_kld.py --files bench-out/e2e/ffn_down-base.gguf,bench-out/e2e/bits3-final.gguf \\
        --key ffn_down --top 6

For every block ``l`` and every file, the float model with only ``blk.l.KEY`` replaced by that file's tensor (as
the runner reads it: codebooks, scales and sparse outliers included) is run on ``--nsamples x --seqlen`` tokens of
the calibration text (``--calib``, the conversions' own sequences: nothing of the evaluation text is used), and
the mean KL divergence from the float model's next-token distribution is printed. With two files (a cheaper and
a larger configuration of the same role), ``--top K`` prints the K layers whose tensor gains most from the larger
one, as a ``--tensor-type`` pattern for ``qgguf convert``: the per-layer choice of AQ configuration used for the
AQ issue's ffn_down comparison (docs/BENCHMARKS.md). Single-layer divergences add up to roughly the whole
model's (SmolLM2 ffn_down in aq-2x8-g8: sum 0.311 against 0.281 for all 30 replaced at once).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "out" / "smollm2-f32.gguf"))
    ap.add_argument("--files", required=True, help="comma-separated GGUF files whose KEY tensors are tried")
    ap.add_argument("--key", default="ffn_down")
    ap.add_argument("--calib", default=str(ROOT.parent / "shared" / "data" / "c4-sample-1000.jsonl"))
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--top", type=int, default=0, help="with two files: the K layers that gain most from the second")
    ap.add_argument("--json", default=None, help="write {layer: [kld per file]} here")
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args(argv)

    from qgguf.convert.sources import open_source
    from qgguf.quantize.calib import calibration_sequences
    from qgguf.runtime import model as rm
    from qgguf.runtime.model import LlamaModel
    from qgguf.runtime.tokenizer import Tokenizer

    torch.set_num_threads(a.threads)
    base = LlamaModel.from_gguf(a.model, threads=a.threads)
    src = open_source(a.model)
    md = {k: v.value for k, v in src.metadata.items()}
    md["general.architecture"] = src.arch
    seqs, _ = calibration_sequences(a.calib, None, Tokenizer.from_metadata(md), md, a.nsamples, a.seqlen, 0)
    ids = torch.tensor(seqs)
    hp = base.hp
    emb = base.tok_embd.dense_weight()
    out_w = base.output.dense_weight()       # the token embedding itself when the model ties them
    onorm = base.output_norm
    rope = rm.rope_tables(hp, ids.shape[1])
    W = [base.block_weights(i) for i in range(hp.n_layer)]
    files = [LlamaModel.from_gguf(f, threads=a.threads) for f in a.files.split(",")]

    def block(w, x):
        return torch.cat([rm.block_forward(hp, w, x[s:s + 4], rope) for s in range(0, x.shape[0], 4)])

    def blocks(x, l0, w0):      # blocks l0.. with block l0's weights w0
        for i in range(l0, hp.n_layer):
            x = block(w0 if i == l0 else W[i], x)
        return x

    def logp(h):
        return torch.cat([F.log_softmax(rm.lm_head(out_w, rm.final_norm(hp, onorm, h[s])), -1)
                          for s in range(h.shape[0])])

    res: dict[int, list[float]] = {}
    with torch.no_grad():
        xs = [rm.embed(emb, ids)]
        for i in range(hp.n_layer):
            xs.append(block(W[i], xs[-1]))
        lt = logp(xs[-1])
        pt = lt.exp()
        for l in range(hp.n_layer):
            row = []
            for m in files:
                w = dict(W[l])
                w[a.key] = m.block_weights(l)[a.key]
                lp = logp(blocks(xs[l], l, w))
                row.append(float((pt * (lt - lp)).sum(-1).mean()))
            res[l] = row
            print(f"blk.{l}.{a.key} " + " ".join(f"{v:.5f}" for v in row), flush=True)
    print("sum " + " ".join(f"{sum(r[k] for r in res.values()):.4f}" for k in range(len(files))))
    if a.top and len(files) == 2:
        gain = sorted(res, key=lambda l: res[l][1] - res[l][0])[:a.top]
        print("gain " + ", ".join(f"blk.{l} {res[l][0] - res[l][1]:.5f}" for l in gain))
        print(f"--tensor-type 'blk\\.({'|'.join(str(l) for l in sorted(gain))})\\.{a.key}=TYPE'")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
