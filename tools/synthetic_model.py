#!/usr/bin/env python3
"""Write a random-weight llama GGUF of a named shape, in any tensor type, streaming tensor by tensor.

    python tools/synthetic_model.py --shape llama-3.2-1b --type aq-2x8-g8 -o out/l1b-aq.gguf
    python tools/synthetic_model.py --shape llama-3.2-1b --type F16 -o out/l1b-f16.gguf
    python tools/synthetic_model.py --shape tiny --type Q4_0 -o /tmp/tiny.gguf --seed 3

Shapes: ``llama-3.2-1b`` (dim 2048, 16 layers, 32 heads, 8 kv heads, ffn 8192, rope base 500000, tied
embeddings), ``smollm2-135m`` (576, 30 layers, 9/3 heads, ffn 1536, rope base 100000, tied), ``tiny``
(stories260K's: 64, 5 layers, 8/4 heads, ffn 172, vocab 512, untied). The vocabulary is small by default (4096;
512 for tiny) with a minimal SentencePiece-style tokenizer (<unk>, <s>, </s>, 256 byte tokens, then letters and
letter pairs) so that llama.cpp loads the file.

``--type`` applies to the block linears: a standard type is quantized from random float weights through the
qgguf registry (round to nearest); a qgguf codebook type (``aq-MxB-gG``, ``vq-vV-kK[-KR][-oP][-gG]``) gets random codes / indices, codebooks and
scales (no calibration). A linear whose row length does not fit the type falls back to F16. ``token_embd`` (and
``output`` when untied) take ``--embd-type`` (default: Q6_K for quantized types, else ``--type``); norms are F32.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gguf import GGUFValueType as V  # noqa: E402

from qgguf import gguf_types  # noqa: E402
from qgguf.convert.writer import OutputFile  # noqa: E402
from qgguf.gguf_types.codebook import is_codebook  # noqa: E402


@dataclass(frozen=True)
class Shape:
    dim: int
    n_layer: int
    n_head: int
    n_head_kv: int
    ffn: int
    rope_base: float
    tied: bool
    vocab: int
    ctx: int = 4096
    eps: float = 1e-5


SHAPES = {
    "llama-3.2-1b": Shape(2048, 16, 32, 8, 8192, 500000.0, True, 4096, 4096),
    "smollm2-135m": Shape(576, 30, 9, 3, 1536, 100000.0, True, 4096, 2048),
    "tiny": Shape(64, 5, 8, 4, 172, 10000.0, False, 512, 2048),
}


def tokenizer_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A minimal llama (SentencePiece) vocabulary of exactly ``n`` pieces (n >= 259)."""
    if n < 259:
        raise SystemExit(f"--vocab must be at least 259 (3 special + 256 byte tokens), got {n}")
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    cand = ["\u2581"] + [f"\u2581{c}" for c in letters] + list(letters) + list(letters.upper()) + \
        [f"\u2581{c}" for c in letters.upper()] + list("0123456789.,!?'\"-:;()")
    cand += [a + b for a in letters for b in letters] + [f"\u2581{a}{b}" for a in letters for b in letters]
    cand += [f"\u2581{a}{b}{c}" for a in letters[:12] for b in letters for c in letters]
    seen = set(toks)
    for c in cand:
        if len(toks) >= n:
            break
        if c not in seen:
            seen.add(c)
            toks.append(c)
            types.append(1)
    i = 0
    while len(toks) < n:
        toks.append(f"<extra_{i}>")
        types.append(4)   # user-defined
        i += 1
    scores = [0.0] * 259 + [-float(i) for i in range(n - 259)]
    return toks, scores, types


def tensor_list(s: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape, role) in llama.cpp's file order; role: embd / norm / linear."""
    hd = s.dim // s.n_head
    out = [("token_embd.weight", (s.vocab, s.dim), "embd")]
    for i in range(s.n_layer):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (s.dim,), "norm"),
                (p + "attn_q.weight", (s.n_head * hd, s.dim), "linear"),
                (p + "attn_k.weight", (s.n_head_kv * hd, s.dim), "linear"),
                (p + "attn_v.weight", (s.n_head_kv * hd, s.dim), "linear"),
                (p + "attn_output.weight", (s.dim, s.n_head * hd), "linear"),
                (p + "ffn_norm.weight", (s.dim,), "norm"),
                (p + "ffn_gate.weight", (s.ffn, s.dim), "linear"),
                (p + "ffn_up.weight", (s.ffn, s.dim), "linear"),
                (p + "ffn_down.weight", (s.dim, s.ffn), "linear")]
    out.append(("output_norm.weight", (s.dim,), "norm"))
    if not s.tied:
        out.append(("output.weight", (s.vocab, s.dim), "embd"))
    return out


def _seed(seed: int, name: str) -> int:
    import zlib
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def write_synthetic(out, shape: str = "tiny", type: str = "F32", vocab: int | None = None, seed: int = 0,
                    embd_type: str | None = None, progress: bool = False) -> dict:
    """Write the model; returns {"path", "bytes", "types": {name: type}, "seconds"}."""
    t0 = time.perf_counter()
    s = SHAPES[shape]
    if vocab:
        s = Shape(**{**s.__dict__, "vocab": int(vocab)})
    qt_main = gguf_types.get(type)
    if embd_type is None:
        embd_type = "Q6_K" if not qt_main.is_float else qt_main.name
    qt_embd = gguf_types.get(embd_type)
    f16 = gguf_types.get("F16")
    f32 = gguf_types.get("F32")
    of = OutputFile(out, "llama")
    a = "llama"
    of.set("general.name", f"synthetic-{shape}-{qt_main.name}", V.STRING)
    of.set(f"{a}.context_length", s.ctx, V.UINT32)
    of.set(f"{a}.embedding_length", s.dim, V.UINT32)
    of.set(f"{a}.block_count", s.n_layer, V.UINT32)
    of.set(f"{a}.feed_forward_length", s.ffn, V.UINT32)
    of.set(f"{a}.attention.head_count", s.n_head, V.UINT32)
    of.set(f"{a}.attention.head_count_kv", s.n_head_kv, V.UINT32)
    of.set(f"{a}.rope.freq_base", float(s.rope_base), V.FLOAT32)
    of.set(f"{a}.rope.dimension_count", s.dim // s.n_head, V.UINT32)
    of.set(f"{a}.attention.layer_norm_rms_epsilon", float(s.eps), V.FLOAT32)
    of.set(f"{a}.vocab_size", s.vocab, V.UINT32)
    of.set("general.quantization_version", 2, V.UINT32)
    ftype = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K": 15, "Q6_K": 18}.get(qt_main.name)
    if ftype is not None:
        of.set("general.file_type", ftype, V.UINT32)
    toks, scores, types = tokenizer_vocab(s.vocab)
    of.set("tokenizer.ggml.model", "llama", V.STRING)
    of.set("tokenizer.ggml.tokens", toks, V.ARRAY, V.STRING)
    of.set("tokenizer.ggml.scores", scores, V.ARRAY, V.FLOAT32)
    of.set("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32)
    of.set("tokenizer.ggml.unknown_token_id", 0, V.UINT32)
    of.set("tokenizer.ggml.bos_token_id", 1, V.UINT32)
    of.set("tokenizer.ggml.eos_token_id", 2, V.UINT32)
    of.set("tokenizer.ggml.add_bos_token", True, V.BOOL)
    of.set("tokenizer.ggml.add_eos_token", False, V.BOOL)

    plan = []
    for name, shp, role in tensor_list(s):
        qt = f32 if role == "norm" else (qt_embd if role == "embd" else qt_main)
        if len(shp) == 2 and not _fits(qt, shp):
            qt = f16
        plan.append((name, shp, role, qt))
        of.plan_qtensor(name, shp, qt)
    types_used = {}
    with of:
        of.open()
        for i, (name, shp, role, qt) in enumerate(plan):
            rng = np.random.default_rng(_seed(seed, name))
            if role == "norm":
                data = qt.quantize((1.0 + 0.1 * rng.standard_normal(shp, dtype=np.float32)).reshape(1, -1))
            elif is_codebook(qt):
                data = qt.pack(qt.random_fields(shp, rng))
            else:
                w = rng.standard_normal(shp, dtype=np.float32)
                w *= np.float32(1.0 / np.sqrt(shp[-1]))
                data = qt.quantize(w.reshape(-1, shp[-1]))
                del w
            of.write_tensor(name, data)
            types_used[name] = qt.name
            del data
            if progress:
                print(f"\r{i + 1}/{len(plan)} {name} ({qt.name})   ", end="", file=sys.stderr, flush=True)
        of.commit()
    if progress:
        print(file=sys.stderr)
    return {"path": str(out), "bytes": Path(out).stat().st_size, "types": types_used,
            "seconds": time.perf_counter() - t0}


def _fits(qt, shape) -> bool:
    if hasattr(qt, "fits_shape"):   # VQ: rows in vectors of v
        return qt.fits_shape(shape)
    return shape[-1] % qt.block_size == 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--type", default="F32", help="type of the block linears (standard, aq-MxB-gG or vq-vV-kK[-KR][-oP][-gG])")
    p.add_argument("--embd-type", default=None, help="type of token_embd (and output when untied)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 4096; tiny: 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    r = write_synthetic(a.output, a.shape, a.type, a.vocab, a.seed, a.embd_type, progress=not a.quiet)
    counts = {}
    for t in r["types"].values():
        counts[t] = counts.get(t, 0) + 1
    print(f"wrote {r['path']}: {r['bytes'] / 2**20:.1f} MiB in {r['seconds']:.1f} s; types: "
          + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
