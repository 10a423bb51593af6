#!/usr/bin/env python3
"""Write a random-weight Hugging Face Llama folder (model.safetensors + config.json + tokenizer.json),
streaming the weights to disk in row chunks so the writer itself stays small (tens of MB whatever the shape).

    python tools/synthetic_hf.py --shape llama-3.2-1b -o /tmp/l1b-hf            # bf16, vocab 128256: ~2.5 GB
    python tools/synthetic_hf.py --shape tiny --dtype F32 -o /tmp/tiny-hf

Shapes are tools/synthetic_model.py's (``llama-3.2-1b``: hidden 2048, 16 layers, 32 heads, 8 kv heads, ffn 8192,
tied embeddings); ``--vocab`` defaults to the real model's (128256 for llama-3.2-1b, 49152 for smollm2-135m, 512 for
tiny). Weights are N(0, 1/ncols) (norms 1 + N(0, 0.1^2)), deterministic by ``--seed``, in HF orientation and
naming. The tokenizer is a byte-level BPE of the 256 byte symbols (GPT-2 pre-tokenizer) plus the
a few merges and the Llama-3 special tokens at their ids; the converter pads the rest of the vocabulary with unused tokens.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_qgguf_synthetic_model", _HERE / "synthetic_model.py")
_sm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _sm
_spec.loader.exec_module(_sm)
SHAPES = _sm.SHAPES

REAL_VOCAB = {"llama-3.2-1b": 128256, "smollm2-135m": 49152, "tiny": 512}
_DTYPES = {"BF16": 2, "F16": 2, "F32": 4}
CHUNK_ELEMS = 1 << 22   # values generated and written at a time (16 MiB of float32)


def hf_tensors(s, vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, role) in the order transformers saves them; role: embd / norm / linear."""
    hd = s.dim // s.n_head
    out = [("model.embed_tokens.weight", (vocab, s.dim), "embd")]
    for i in range(s.n_layer):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (s.dim,), "norm"),
                (p + "self_attn.q_proj.weight", (s.n_head * hd, s.dim), "linear"),
                (p + "self_attn.k_proj.weight", (s.n_head_kv * hd, s.dim), "linear"),
                (p + "self_attn.v_proj.weight", (s.n_head_kv * hd, s.dim), "linear"),
                (p + "self_attn.o_proj.weight", (s.dim, s.n_head * hd), "linear"),
                (p + "post_attention_layernorm.weight", (s.dim,), "norm"),
                (p + "mlp.gate_proj.weight", (s.ffn, s.dim), "linear"),
                (p + "mlp.up_proj.weight", (s.ffn, s.dim), "linear"),
                (p + "mlp.down_proj.weight", (s.dim, s.ffn), "linear")]
    out.append(("model.norm.weight", (s.dim,), "norm"))
    if not s.tied:
        out.append(("lm_head.weight", (vocab, s.dim), "embd"))
    return out


def _encode(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "F32":
        return x.astype("<f4", copy=False).tobytes()
    if dtype == "F16":
        return x.astype("<f2").tobytes()
    u = x.astype(np.float32, copy=False).view(np.uint32)
    u = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)   # round to nearest even
    return u.astype("<u2").tobytes()


def _values(rng: np.random.Generator, role: str, n: int, ncols: int) -> np.ndarray:
    if role == "norm":
        return 1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)
    x = rng.standard_normal(n, dtype=np.float32)
    x *= np.float32(1.0 / np.sqrt(ncols))
    return x


def config(s, vocab: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.dim,
            "intermediate_size": s.ffn, "num_hidden_layers": s.n_layer, "num_attention_heads": s.n_head,
            "num_key_value_heads": s.n_head_kv, "head_dim": s.dim // s.n_head, "vocab_size": vocab,
            "max_position_embeddings": s.ctx, "rms_norm_eps": s.eps, "rope_theta": s.rope_base,
            "tie_word_embeddings": s.tied, "hidden_act": "silu", "torch_dtype": "bfloat16",
            "bos_token_id": special_ids(vocab)[0], "eos_token_id": special_ids(vocab)[1]}


def special_ids(vocab: int) -> tuple[int, int]:
    """<|begin_of_text|>, <|end_of_text|>: Llama 3's 128000/128001 when the vocabulary has them, else 256/257."""
    if vocab < 258:
        raise SystemExit(f"--vocab must be at least 258 (256 byte tokens + 2 special), got {vocab}")
    return (128000, 128001) if vocab > 128001 else (256, 257)


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer(vocab: int) -> dict:
    symbols = _bytes_to_unicode()
    v = {symbols[b]: b for b in range(256)}
    bos, eos = special_ids(vocab)
    merges = []
    for a, b in (("\u0120", "t"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("\u0120", "a")):
        nid = len(v) + (2 if bos < 1000 else 0)   # after the byte symbols (and the small vocabulary's specials)
        if nid >= vocab:
            break
        merges.append(f"{a} {b}")
        v[a + b] = nid
    added = [{"id": bos, "content": "<|begin_of_text|>", "special": True, "single_word": False,
              "lstrip": False, "rstrip": False, "normalized": False},
             {"id": eos, "content": "<|end_of_text|>", "special": True, "single_word": False,
              "lstrip": False, "rstrip": False, "normalized": False}]
    return {"version": "1.0", "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": True},
            "post_processor": None, "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False,
                      "byte_fallback": False, "vocab": v, "merges": merges}}


def write_hf(out, shape: str = "llama-3.2-1b", dtype: str = "BF16", vocab: int | None = None, seed: int = 0,
             progress: bool = False) -> dict:
    """Write the folder; returns {"path", "bytes", "seconds"}. The safetensors file is written to a temporary
    name and renamed when complete."""
    t0 = time.perf_counter()
    dtype = dtype.upper()
    if dtype not in _DTYPES:
        raise SystemExit(f"--dtype must be one of {', '.join(_DTYPES)}")
    s = SHAPES[shape]
    vocab = int(vocab or REAL_VOCAB[shape])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(s, vocab)
    header, off = {}, 0
    for name, shp, _ in tensors:
        nb = int(np.prod(shp)) * _DTYPES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shp), "data_offsets": [off, off + nb]}
        off += nb
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    st = out / "model.safetensors"
    tmp = out / ".model.safetensors.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for i, (name, shp, role) in enumerate(tensors):
            rng = np.random.default_rng(_sm._seed(seed, name))
            n = int(np.prod(shp))
            for a in range(0, n, CHUNK_ELEMS):
                f.write(_encode(_values(rng, role, min(CHUNK_ELEMS, n - a), shp[-1]), dtype))
            if progress:
                print(f"\r{i + 1}/{len(tensors)} {name}   ", end="", file=sys.stderr, flush=True)
    os.replace(tmp, st)
    if progress:
        print(file=sys.stderr)
    (out / "config.json").write_text(json.dumps(config(s, vocab), indent=1))
    (out / "tokenizer.json").write_text(json.dumps(tokenizer(vocab)))
    return {"path": str(out), "bytes": st.stat().st_size, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    p.add_argument("--dtype", default="BF16", help="BF16 (default), F16 or F32")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the real model's)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    r = write_hf(a.output, a.shape, a.dtype, a.vocab, a.seed, progress=not a.quiet)
    print(f"wrote {r['path']}: model.safetensors {r['bytes'] / 2**20:.1f} MiB in {r['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
