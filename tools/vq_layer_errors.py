#!/usr/bin/env python3
"""Relative layer errors of codebook configurations (VQ and AQ) on the linears of chosen blocks of a model.

    python tools/vq_layer_errors.py --layers 3 --configs vq-v4-k128-o2-g8,vq-v8-k256-64-o1,aq-3x8-g16
    python tools/vq_layer_errors.py --layers 3 --configs "aq-2x8-g8,aq-2x8-g8:beam=4;max_rounds=8"

For each block in ``--layers``, the Gram matrices ``H = X^T X`` of its seven linears are collected the way the
block methods collect them (true-sequential, :func:`qgguf.quantize.blockwise.sequential_quantize`, here with the
float weights, on ``--nsamples x --seqlen`` calibration tokens of ``--calib`` propagated through the float
blocks before it); every configuration then quantizes each linear (VQ: :func:`qgguf.quantize.vq_core.
quantize_matrix`; AQ: :func:`qgguf.quantize.aq_core.quantize_matrix` with the AQ method's defaults), without
the block fine-tuning, and the relative output error ``tr(dW H dW^T) / tr(W H W^T)`` is printed with the true
bits per weight of the seven linears. Used to choose ``--bits``'s ranking (quantize/vq.py, ``_rank``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qgguf import gguf_types  # noqa: E402
from qgguf.convert.sources import open_source  # noqa: E402
from qgguf.quantize.base import QuantContext  # noqa: E402
from qgguf.quantize.blockwise import Block, chunk_samples, sequential_quantize  # noqa: E402
from qgguf.quantize.calib import calibration_sequences  # noqa: E402
from qgguf.runtime import model as rm  # noqa: E402
from qgguf.runtime.tokenizer import Tokenizer  # noqa: E402


def layer_error(cfg: str, W: np.ndarray, H: np.ndarray, name: str = "") -> tuple[float, int]:
    """(relative error, bytes) of one linear in configuration ``cfg`` (``file:PATH``: the tensor ``name`` as stored
    in the GGUF file PATH, e.g. one of llama.cpp's, where it has a quantized type)."""
    if cfg.startswith("file:"):      # through the runner's loader: standard, i-quant and codebook types alike
        if cfg not in _files:
            from qgguf.runtime.linear import load_llama
            _files[cfg] = load_llama(cfg[5:], threads=1)
        il, key = int(name.split(".")[1]), name.split(".")[2]
        Wq = _files[cfg].block_weights(il)[key].double().numpy()
        dW = Wq - W.astype(np.float64)
        Hd = H.astype(np.float64)
        err = float(np.einsum("ij,jk,ik->", dW, Hd, dW) / np.einsum("ij,jk,ik->", W.astype(np.float64), Hd, W))
        return err, 0
    if cfg.startswith("aq-"):    # aq-MxB-gG[:KEY=VALUE;KEY=VALUE]: AQ options over the method's defaults
        from qgguf.quantize.aq import aq_options
        from qgguf.quantize.aq_core import parse_config, quantize_matrix
        name, _, opts = cfg.partition(":")
        c = parse_config(name)
        o = aq_options(dict(kv.split("=", 1) for kv in opts.split(";") if kv))
        return quantize_matrix(W, H, c, o, seed=0).rel_err, c.nbytes(*W.shape)
    from qgguf.quantize.vq_core import VQOptions, quantize_matrix
    qt = gguf_types.get(cfg)
    return quantize_matrix(W, H, qt, VQOptions(), seed=0).rel_err, qt.nbytes(W.shape)


_files: dict = {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="out/smollm2-f32.gguf")
    ap.add_argument("--calib", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                           "c4-sample-1000.jsonl"))
    ap.add_argument("--layers", default="3")
    ap.add_argument("--configs", default="vq-v4-k128-o2-g8,vq-v4-k128,vq-v8-k256-64-o1")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    layers = sorted(int(v) for v in a.layers.split(","))
    src = open_source(a.model)
    md = {k: v.value for k, v in src.metadata.items()}
    md["general.architecture"] = src.arch
    emb = np.array(src.load("token_embd.weight"), np.float32)
    hp = rm.hparams_from_metadata(md, emb.shape[0])
    seqs, _ = calibration_sequences(a.calib, None, Tokenizer.from_metadata(md), md, a.nsamples, a.seqlen, 0)
    ids = torch.tensor(seqs)
    rope = rm.rope_tables(hp, ids.shape[1])
    x = rm.embed(torch.from_numpy(emb), ids)
    f32 = gguf_types.get("F32")
    for il in range(layers[-1] + 1):
        names = {k: f"blk.{il}.{k}.weight" for k in rm.BLOCK_LINEARS + ("attn_norm", "ffn_norm")}
        w = {k: torch.from_numpy(np.array(src.load(n), np.float32)) for k, n in names.items()}
        if il in layers:
            grams: dict[str, np.ndarray] = {}
            blk = Block(index=il, hp=hp, weights=w, qtypes={k: f32 for k in rm.BLOCK_LINEARS}, names=names, x_q=x,
                        rope=rope, chunk=chunk_samples(a.seqlen))
            sequential_quantize(blk, QuantContext(progress=False),
                                lambda n, W, qt, H, imp, ctx: np.ascontiguousarray(W).view(np.uint8),
                                grams_out=grams)
            for cfg in a.configs.split(","):
                t0 = time.perf_counter()
                errs, nbytes, n = {}, 0, 0
                for k in rm.BLOCK_LINEARS:
                    W = w[k].numpy()
                    errs[k], nb = layer_error(cfg, W, grams[k], names[k])
                    nbytes += nb
                    n += W.size
                bpw = f"{8 * nbytes / n:.3f} bpw" if nbytes else "(file)"     # file: sizes are the file's own
                print(f"blk.{il} {cfg:24s} {bpw}  mean rel. error {np.mean(list(errs.values())):.4f}  "
                      + " ".join(f"{k}={v:.4f}" for k, v in errs.items()) + f"  ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
        with torch.no_grad():
            out = torch.empty_like(x)
            for s in range(0, x.shape[0], 4):
                out[s:s + 4] = rm.block_forward(hp, w, x[s:s + 4], rope)
            x = out
    return 0


if __name__ == "__main__":
    sys.exit(main())
