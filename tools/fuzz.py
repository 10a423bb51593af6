#!/usr/bin/env python3
"""Mutation fuzzer for qgguf's readers of untrusted files (issue 7).

Two targets:

* ``gguf``: bytes of a GGUF file -> :class:`qgguf.convert.ggufread.GGUFFile` (header, metadata, tensor table,
  codebook layout), then what the converter and the runner do with an opened file: every tensor's data
  (:class:`qgguf.convert.sources.GGUFSource` dequantizes it through the type registry), the tokenizer from the
  metadata (encode/decode a sentence) and every codebook tensor through the decoder path;
* ``types``: the tensor-type decoders, structure-aware: a file's metadata and tensors in memory, mutated at the
  level of ``qgguf.tensor.NAME.*`` values, companion types, shapes and payload bytes, then
  ``check_codebook_layout`` -> ``runtime.linear.codebook_companions`` -> ``CodebookType.dequantize`` and the
  runtime module (native kernels where built; one matrix-vector product), and every standard type's dequantize.
  Its seeds are the corpus files plus one generated tensor of every codebook type the registry knows (and of
  every standard type), so new codebook families are fuzzed as soon as they are registered.

An input passes when the target returns or raises :class:`qgguf.errors.QggufError`. Anything else (another
exception, more than ``--timeout`` seconds: a hang) is a finding: the input is written to ``--crashes`` as a GGUF
file with the traceback next to it, and the run exits 1. Every iteration ``i`` is reproducible alone: its
mutations come from ``random.Random((seed, target, i))``.

    python tools/fuzz.py corpus                    # (re)write the seed corpus in tests/fuzz_corpus/
    python tools/fuzz.py run -n 100000 --target gguf
    python tools/fuzz.py run -n 100000 --target types
    python tools/fuzz.py replay                    # every corpus file through both targets
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import signal
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tools"))

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType as V  # noqa: E402

from qgguf.errors import QggufError  # noqa: E402

CORPUS = ROOT / "tests" / "fuzz_corpus"
TARGETS = ("gguf", "types")
MAX_DECODE_BYTES = 1 << 22        # tensors larger than this are opened but not dequantized (speed, not safety)

_FMT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
        V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}


class Hang(Exception):
    """An input ran longer than the per-input time limit."""


# ================================================================================================
# GGUF serialization (any field values, also invalid ones) and the header field map used by mutations

@dataclass
class KV:
    key: str
    vtype: int
    value: object
    sub: int | None = None


@dataclass
class RawTensor:
    name: str
    ne: tuple[int, ...]        # GGUF order
    ggml_type: int
    data: bytes
    offset: int | None = None  # written instead of the computed data offset (malformed-input tests)

    # what runtime.linear.codebook_companions expects of a tensor (gguf.ReaderTensor's fields)
    @property
    def tensor_type(self) -> int:
        return self.ggml_type

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ne

    @property
    def data_array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.uint8)


@dataclass
class Doc:
    """A GGUF file as values: metadata in order and tensors (data stored whole, no padding)."""
    kvs: list[KV] = field(default_factory=list)
    tensors: list[RawTensor] = field(default_factory=list)
    version: int = 3
    alignment: int = 32


def _enc(b: str | bytes) -> bytes:
    return b if isinstance(b, bytes) else b.encode("utf-8", "surrogateescape")


def _value_bytes(vt: int, v, sub: int | None) -> bytes:
    if vt == V.STRING:
        b = _enc(v)
        return struct.pack("<Q", len(b)) + b
    if vt == V.ARRAY:
        items = list(v)
        return struct.pack("<IQ", int(sub), len(items)) + b"".join(_value_bytes(sub, x, None) for x in items)
    return struct.pack(_FMT[V(vt)], v)


def gguf_bytes(doc: Doc) -> bytes:
    out = bytearray(b"GGUF" + struct.pack("<IQQ", doc.version, len(doc.tensors), len(doc.kvs)))
    for kv in doc.kvs:
        out += _value_bytes(V.STRING, kv.key, None) + struct.pack("<I", int(kv.vtype))
        out += _value_bytes(kv.vtype, kv.value, kv.sub)
    a = doc.alignment
    off = 0
    offsets = []
    for t in doc.tensors:
        offsets.append(off)
        off = (off + len(t.data) + a - 1) // a * a
    for t, o in zip(doc.tensors, offsets):
        out += _value_bytes(V.STRING, t.name, None) + struct.pack("<I", len(t.ne))
        out += b"".join(struct.pack("<Q", d) for d in t.ne)
        out += struct.pack("<IQ", t.ggml_type, o if t.offset is None else t.offset)
    out += bytes(-len(out) % a)
    for t, o in zip(doc.tensors, offsets):
        out += t.data + bytes((-len(t.data)) % a)
    return bytes(out)


def doc_from_file(path) -> Doc:
    """A valid GGUF file as a :class:`Doc` (through qgguf's reader)."""
    from qgguf.convert.ggufread import GGUFFile

    with GGUFFile(path) as g:
        doc = Doc(version=g.version, alignment=g.alignment)
        for k, mv in g.metadata.items():
            doc.kvs.append(KV(k, int(mv.vtype), mv.value, None if mv.sub_type is None else int(mv.sub_type)))
        for t in g.tensors:
            doc.tensors.append(RawTensor(t.name, tuple(t.ne), t.ggml_type, bytes(g.raw(t))))
    return doc


def header_fields(buf: bytes) -> list[tuple[int, int]]:
    """``[(byte offset, size)]`` of every integer field of a (valid) GGUF header: counts, lengths, value types,
    scalar values, dimensions, tensor types and offsets. Stops quietly at the first inconsistency."""
    out: list[tuple[int, int]] = []
    pos = 4
    try:
        def take(n):
            nonlocal pos
            out.append((pos, n))
            pos += n
            return int.from_bytes(buf[pos - n:pos], "little")

        def string():
            nonlocal pos
            n = take(8)
            pos += n

        def value(vt):
            nonlocal pos
            if vt == V.STRING:
                string()
            elif vt == V.ARRAY:
                sub, n = take(4), take(8)
                if n > 64:            # long arrays: map the first elements only, skip the rest
                    for _ in range(64):
                        value(sub)
                    if sub == V.STRING:
                        for _ in range(n - 64):
                            pos += 8 + int.from_bytes(buf[pos:pos + 8], "little")
                    else:
                        pos += (n - 64) * struct.calcsize(_FMT[V(sub)])
                else:
                    for _ in range(n):
                        value(sub)
            else:
                take(struct.calcsize(_FMT[V(vt)]))

        take(4)
        n_t, n_kv = take(8), take(8)
        for _ in range(n_kv):
            string()
            value(take(4))
        for _ in range(n_t):
            string()
            nd = take(4)
            for _ in range(nd):
                take(8)
            take(4)
            take(8)
    except (ValueError, KeyError, IndexError, struct.error):
        pass
    return [(p, n) for p, n in out if p + n <= len(buf)]


# ================================================================================================
# seed corpus

def _scalar_kvs(prefix: str) -> list[KV]:
    vals = {V.UINT8: 200, V.INT8: -5, V.UINT16: 60000, V.INT16: -300, V.UINT32: 4_000_000_000, V.INT32: -7,
            V.FLOAT32: 1.5, V.BOOL: True, V.UINT64: 1 << 40, V.INT64: -(1 << 40), V.FLOAT64: 2.25}
    kvs = [KV(f"{prefix}.{V(t).name.lower()}", int(t), v) for t, v in vals.items()]
    kvs += [KV(f"{prefix}.arr_{V(t).name.lower()}", int(V.ARRAY), [v, v], int(t)) for t, v in vals.items()]
    kvs += [KV(f"{prefix}.string", int(V.STRING), "héllo"), KV(f"{prefix}.empty_string", int(V.STRING), ""),
            KV(f"{prefix}.arr_string", int(V.ARRAY), ["a", "", "ü"], int(V.STRING)),
            KV(f"{prefix}.empty_array", int(V.ARRAY), [], int(V.UINT32))]
    return kvs


def _llama_kvs(n_embd=32, n_layer=1, n_head=4, n_ff=64, vocab: int = 260, bpe: bool = False) -> list[KV]:
    U32, F32, S, A = int(V.UINT32), int(V.FLOAT32), int(V.STRING), int(V.ARRAY)
    kvs = [KV("general.architecture", S, "llama"), KV("general.name", S, "fuzz-seed"),
           KV("llama.context_length", U32, 128), KV("llama.embedding_length", U32, n_embd),
           KV("llama.block_count", U32, n_layer), KV("llama.feed_forward_length", U32, n_ff),
           KV("llama.attention.head_count", U32, n_head), KV("llama.attention.head_count_kv", U32, n_head // 2),
           KV("llama.rope.dimension_count", U32, n_embd // n_head),
           KV("llama.attention.layer_norm_rms_epsilon", F32, 1e-5)]
    if bpe:
        from qgguf.runtime.tokenizer import _byte_to_char_table
        chars = _byte_to_char_table()
        toks = list(chars) + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
        merges = ["Ġ t", "h e", "Ġt he"]
        kvs += [KV("tokenizer.ggml.model", S, "gpt2"), KV("tokenizer.ggml.pre", S, "smollm"),
                KV("tokenizer.ggml.tokens", A, toks, S),
                KV("tokenizer.ggml.token_type", A, [1] * (len(toks) - 1) + [3], int(V.INT32)),
                KV("tokenizer.ggml.merges", A, merges, S),
                KV("tokenizer.ggml.bos_token_id", U32, len(toks) - 1),
                KV("tokenizer.ggml.eos_token_id", U32, len(toks) - 1)]
    else:
        from synthetic_model import tokenizer_vocab
        toks, scores, types = tokenizer_vocab(vocab)
        kvs += [KV("tokenizer.ggml.model", S, "llama"), KV("tokenizer.ggml.tokens", A, toks, S),
                KV("tokenizer.ggml.scores", A, scores, F32), KV("tokenizer.ggml.token_type", A, types, int(V.INT32)),
                KV("tokenizer.ggml.bos_token_id", U32, 1), KV("tokenizer.ggml.eos_token_id", U32, 2),
                KV("tokenizer.ggml.unknown_token_id", U32, 0)]
    return kvs


def _std_tensor(name: str, qt, rows: int, blocks: int, rng) -> RawTensor:
    """A tensor of standard type ``qt`` quantized from random values (so that its bytes are realistic)."""
    C = qt.block_size * blocks
    if qt.name in ("F32", "F16", "BF16"):
        x = rng.standard_normal((rows, C)).astype(np.float32)
        data = np.asarray(qt.quantize(x)).tobytes() if qt.name != "F32" else x.tobytes()
    else:
        try:
            data = np.asarray(qt.quantize(rng.standard_normal((rows, C)).astype(np.float32))).tobytes()
        except QggufError:
            data = rng.integers(0, 256, rows * qt.nbytes((1, C)), dtype=np.uint8).tobytes()
    return RawTensor(name, (C, rows), int(qt.ggml_type), data)


def codebook_tensors_for(qt, name: str, shape: tuple[int, int], rng) -> tuple[list[KV], list[RawTensor]]:
    """Metadata and companion tensors of one codebook tensor of type ``qt`` with valid random payloads built
    from the type's companion specs alone (works for any registered codebook family)."""
    kvs = []
    for k, mv in qt.metadata(name, shape).items():
        kvs.append(KV(k, int(mv.vtype), mv.value, None if mv.sub_type is None else int(mv.sub_type)))
    tensors = []
    fields = None
    if hasattr(qt, "random_fields"):
        try:
            fields = qt.as_companions(qt.pack(qt.random_fields(shape, rng)), shape)
        except QggufError:
            fields = None
    for c in qt.companion_specs(shape):
        if fields is not None:
            data = np.ascontiguousarray(fields[c.suffix]).tobytes()
        elif c.dtype.kind == "f":
            data = (rng.standard_normal(c.shape) * 0.1).astype(c.dtype).tobytes()
        else:
            data = rng.integers(0, 1 << min(16, 8 * c.dtype.itemsize), size=c.shape).astype(c.dtype).tobytes()
        tensors.append(RawTensor(name + c.suffix, c.gguf_shape, c.ggml_type, data))
    return kvs, tensors


def codebook_shape_for(qt, small: bool = True) -> tuple[int, int]:
    """A small numpy shape (R, C) that codebook type ``qt`` accepts (families constrain rows and columns)."""
    for shape in ((8, 4 * qt.block_size), (16, 4 * qt.block_size), (16, 64), (32, 64), (64, 64), (64, 256),
                  (256, 256)):
        try:
            qt.companion_specs(shape)
            return shape
        except QggufError:
            continue
    raise SystemExit(f"no small shape fits codebook type {qt.name}")


def codebook_types() -> list:
    from qgguf import gguf_types
    return [qt for qt in gguf_types.all_types() if gguf_types.is_codebook(qt)]


def standard_types() -> list:
    from qgguf import gguf_types
    return [qt for qt in gguf_types.all_types() if qt.ggml_type is not None]


def tiny_llama_doc(rng=None, E: int = 32, F: int = 64, vocab: int = 260) -> Doc:
    """A complete one-layer llama (4 heads, 2 KV heads) that `qgguf run` loads: the base of the malformed-input
    tests and a fuzz seed."""
    from qgguf import gguf_types
    rng = rng if rng is not None else np.random.default_rng(0)
    q8, f16, f32 = gguf_types.get("Q8_0"), gguf_types.get("F16"), gguf_types.get("F32")
    d = Doc(kvs=_llama_kvs(E, 1, 4, F, vocab=vocab))
    kv_rows = E // 2
    spec = [("token_embd.weight", q8, vocab, E // 32), ("output_norm.weight", f32, 1, E),
            ("blk.0.attn_norm.weight", f32, 1, E), ("blk.0.attn_q.weight", f16, E, E),
            ("blk.0.attn_k.weight", q8, kv_rows, E // 32), ("blk.0.attn_v.weight", q8, kv_rows, E // 32),
            ("blk.0.attn_output.weight", f16, E, E), ("blk.0.ffn_norm.weight", f32, 1, E),
            ("blk.0.ffn_gate.weight", q8, F, E // 32), ("blk.0.ffn_up.weight", q8, F, E // 32),
            ("blk.0.ffn_down.weight", q8, E, F // 32)]
    for name, qt, rows, blocks in spec:
        t = _std_tensor(name, qt, rows, blocks, rng)
        if name.endswith("norm.weight"):
            t.ne = (t.ne[0],)
            t.data = np.ones(E, np.float32).tobytes()
        d.tensors.append(t)
    return d


def seed_docs() -> dict[str, Doc]:
    """The seed corpus: small valid files covering every metadata value type, every standard type the
    registry decodes, both tokenizer kinds and the small codebook configurations."""
    rng = np.random.default_rng(7)
    from qgguf import gguf_types
    docs: dict[str, Doc] = {}
    U32 = int(V.UINT32)
    # a complete tiny llama (loads and runs): SPM tokenizer, norms F32, linears Q8_0 / F16, tied output
    docs["llama-spm-tiny.gguf"] = tiny_llama_doc(rng)
    E, F = 32, 64
    # BPE tokenizer, GGUF v2, alignment 64
    d = Doc(kvs=_llama_kvs(E, 1, 4, F, bpe=True) + [KV("general.alignment", U32, 64)], version=2, alignment=64)
    d.tensors = [_std_tensor("output_norm.weight", gguf_types.get("F32"), 1, E, rng)]
    d.tensors[0].ne = (E,)
    docs["llama-bpe-v2-align64.gguf"] = d
    # every metadata value type and every standard tensor type (one to two blocks each)
    d = Doc(kvs=[KV("general.architecture", int(V.STRING), "llama")] + _scalar_kvs("fuzz"))
    for qt in standard_types():
        d.tensors.append(_std_tensor(f"t.{qt.name.lower()}", qt, 2, 1, rng))
    docs["all-types.gguf"] = d
    # codebook tensors (the registry's configurations whose codebooks are small)
    for qt in codebook_types():
        try:                                    # the tiny llama with attn_q in the codebook type
            qt.companion_specs((E, E))
            shape = (E, E)
        except QggufError:
            shape = codebook_shape_for(qt)
        if qt.nbytes(shape) > 64 * 1024:
            continue
        d = tiny_llama_doc(rng) if shape == (E, E) else Doc(kvs=_llama_kvs(E, 1, 4, F)[:10])
        d.kvs.append(KV("qgguf.version", U32, 1))
        kvs, ts = codebook_tensors_for(qt, "blk.0.attn_q.weight", shape, rng)
        d.kvs += kvs
        d.tensors = [t for t in d.tensors if t.name != "blk.0.attn_q.weight"] + ts
        docs[f"codebook-{qt.name}.gguf"] = d
    docs["empty.gguf"] = Doc()
    return docs


def write_corpus(out: Path = CORPUS) -> list[Path]:
    (out / "seeds").mkdir(parents=True, exist_ok=True)
    paths = []
    for name, doc in seed_docs().items():
        p = out / "seeds" / name
        p.write_bytes(gguf_bytes(doc))
        paths.append(p)
    return paths


def corpus_files(corpus: Path = CORPUS) -> list[Path]:
    return sorted(p for p in corpus.rglob("*.gguf") if p.is_file())


# ================================================================================================
# targets

def run_gguf(path: str) -> None:
    """Open a GGUF file the way `qgguf convert` and `qgguf run` do and use everything in it."""
    from qgguf.convert.ggufread import GGUFFile
    from qgguf.convert.sources import GGUFSource

    with GGUFFile(path) as g:
        md = {k: mv.value for k, mv in g.metadata.items()}
        tensors = {t.name: RawTensor(t.name, t.ne, t.ggml_type, bytes(g.raw(t)))
                   for t in g.tensors if t.nbytes <= MAX_DECODE_BYTES}
    if "tokenizer.ggml.model" in md:
        from qgguf.runtime.tokenizer import Tokenizer
        tok = Tokenizer(md, source=path)
        ids = tok.encode("Hello the world 123", add_special=True)
        tok.decode(ids)
    try:
        layout = decode_codebooks(md, tensors, path, native=False)
    except QggufError as e:
        raise e.at(path) from None
    if md.get("general.architecture") == "llama" and "token_embd.weight" in tensors:
        from qgguf.runtime.model import LlamaModel
        model = LlamaModel.from_gguf(path)
        model.forward([i % model.n_vocab for i in (1, 5, 7)])
    companions = {n + c.suffix for n, (qt, shape) in layout.items() for c in qt.companion_specs(shape)}
    if md.get("general.architecture") in ("llama", "qwen2"):
        try:
            src = GGUFSource(path)
        except QggufError:
            return
        with src:
            for t in src.tensors:
                if t.name not in companions and src.file.tensor(t.name).nbytes <= MAX_DECODE_BYTES:
                    src.load(t.name)


def decode_codebooks(md: dict, tensors: dict, path, native: bool = True) -> dict:
    """Every codebook tensor through the runner's decoder path, and every standard tensor through its type."""
    from qgguf import gguf_types
    from qgguf.gguf_types.codebook import check_codebook_layout

    layout = check_codebook_layout(md, {n: (t.ggml_type, t.ne) for n, t in tensors.items()}, path)
    for name, (qt, shape) in layout.items():
        comp = {}
        for c in qt.companion_specs(shape):
            t = tensors[name + c.suffix]
            comp[c.suffix] = t.data_array.view(c.dtype).reshape(c.shape)
        w = qt.dequantize(comp, shape)
        assert w.shape == shape and w.dtype == np.float32, (w.shape, w.dtype)
        if native:
            _runtime_linear(name, tensors, md, path, shape)
    for t in tensors.values():
        try:
            qt = gguf_types.by_ggml(t.ggml_type)
        except QggufError:
            continue
        if gguf_types.is_codebook(qt):
            continue
        ne = t.ne or (1,)
        shape = (math.prod(ne[1:]), ne[0])
        raw = t.data_array
        if raw.size != qt.nbytes(shape):
            continue        # a file's tensor always has its size: only the in-memory target can break that
        w = qt.dequantize(raw, shape)
        assert w.shape == shape, (w.shape, shape)
    return layout


def _runtime_linear(name: str, tensors: dict, md: dict, path, shape) -> None:
    from qgguf.runtime import linear

    check_family = md.get(f"qgguf.tensor.{name}.config")
    from qgguf import gguf_types
    if gguf_types.get(str(check_family)).family not in linear._CODEBOOK_KINDS:
        return                      # a family without a runtime module yet: decoded above, nothing more to run
    with_data = {n: _ReaderLike(t) for n, t in tensors.items()}
    lin = linear.codebook_linear(name, with_data, md, None, path)
    if lin is None:
        return
    import torch
    x = torch.ones(1, shape[1])
    y = lin(x)
    assert tuple(y.shape) == (1, shape[0])


class _ReaderLike:
    def __init__(self, t: RawTensor):
        self.tensor_type, self.shape, self.data = t.ggml_type, t.ne, t.data_array


def run_types(doc: Doc, path="<fuzz input>") -> None:
    md = {kv.key: kv.value for kv in doc.kvs}
    tensors = {t.name: t for t in doc.tensors}
    try:
        decode_codebooks(md, tensors, path, native=True)
    except QggufError as e:   # as the readers do: the decoder's error names the file
        raise e.at(path) from None


# ================================================================================================
# mutations

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 1023, 4096, 65535, 65536,
               (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 62), (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def mutate_bytes(buf: bytes, fields: list[tuple[int, int]], others: list[bytes], rng: random.Random) -> bytes:
    b = bytearray(buf)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
        op = rng.randrange(8)
        hdr_end = max((p + n for p, n in fields), default=min(len(b), 256))
        if op == 0 and b:                                     # bit flips, mostly in the header
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(hdr_end if rng.random() < 0.8 and hdr_end else len(b)) if b else 0
                if i < len(b):
                    b[i] ^= 1 << rng.randrange(8)
        elif op in (1, 2, 3) and fields:                      # smash an integer field of the header
            p, n = rng.choice(fields)
            if p + n > len(b):
                continue
            old = int.from_bytes(b[p:p + n], "little")
            v = rng.choice(INTERESTING + [old + 1, old - 1, old * 2, old // 2, old + 8, len(b), len(b) + 1,
                                          rng.getrandbits(8 * n)])
            b[p:p + n] = (v % (1 << (8 * n))).to_bytes(n, "little")
        elif op == 4:                                         # truncate
            cut = rng.randrange(len(b) + 1) if rng.random() < 0.5 else rng.randrange(min(len(b), hdr_end) + 1)
            del b[cut:]
        elif op == 5 and others:                              # splice with another seed
            o = rng.choice(others)
            i, j = rng.randrange(len(b) + 1), rng.randrange(len(o) + 1)
            b = b[:i] + bytearray(o[j:j + rng.randint(1, 512)]) + (b[i:] if rng.random() < 0.5 else b"")
        elif op == 6 and b:                                   # delete or duplicate a range
            i = rng.randrange(min(len(b), hdr_end) or 1)
            n = rng.randint(1, 32)
            if rng.random() < 0.5:
                del b[i:i + n]
            else:
                b[i:i] = b[i:i + n]
        elif op == 7 and b:                                   # overwrite a range with interesting bytes
            i = rng.randrange(len(b))
            fill = rng.choice((b"\x00", b"\xff", b"\x7f", b"\x80", bytes([rng.randrange(256)])))
            b[i:i + rng.randint(1, 16)] = fill * rng.randint(1, 16)
    return bytes(b)


_BAD_STRINGS = ["", "aq", "aq-2x8-g8", "aq-9x8-g8", "aq-2x8-g3", "aq-0x8-g8", "aq-2x12-g8", "aq-2x8-g8-s16",
                "AQ-1X16-G8", "q4_0", "Q8_0", "F32", "vq", "aq-2x8-g8 ", "\udcff", "aq-99999999999999999999x8-g8"]


def _bad_value(rng: random.Random, old):
    """A replacement metadata value: same shape with other numbers, another value type, or garbage."""
    c = rng.randrange(10)
    if c == 0:
        return int(V.STRING), rng.choice(_BAD_STRINGS), None
    if c == 1:
        return int(V.UINT64), rng.choice(INTERESTING), None
    if c == 2:
        return int(V.INT32), rng.choice((-1, -(1 << 31), 0, 8, 16)), None
    if c == 3:
        return int(V.FLOAT32), rng.choice((float("nan"), float("inf"), 8.0, -0.0)), None
    if c == 4:
        return int(V.BOOL), rng.random() < 0.5, None
    if c == 5:
        n = rng.choice((0, 1, 2, 2, 2, 3))
        return int(V.ARRAY), [rng.choice(INTERESTING) for _ in range(n)], int(V.UINT64)
    if c == 6:
        n = rng.choice((0, 1, 2, 3))
        return int(V.ARRAY), [rng.choice((-1, 0, 1, 64, 1 << 31)) for _ in range(n)], int(V.INT64)
    if c == 7:
        return int(V.ARRAY), [rng.choice(_BAD_STRINGS + [".aq_codes", ".aq_codebooks", ".aq_scales"])
                              for _ in range(rng.randint(0, 4))], int(V.STRING)
    if c == 8 and isinstance(old, list) and old and all(isinstance(v, int) for v in old):
        new = list(old)
        i = rng.randrange(len(new))
        new[i] = max(0, rng.choice((new[i] + 1, new[i] - 1, new[i] * 2, new[i] // 2, 0, 1)))
        return int(V.ARRAY), new, int(V.UINT64)
    if c == 9 and isinstance(old, list) and len(old) == 2:
        return int(V.ARRAY), [old[1], old[0]], int(V.UINT64)
    return int(V.STRING), rng.choice(_BAD_STRINGS), None


_CONTAINERS = [0, 1, 24, 25, 26, 27, 28, 30, 2, 8]   # F32 F16 I8 I16 I32 I64 F64 BF16 Q4_0 Q8_0


def _type_nbytes(tt: int, ne: tuple[int, ...]) -> int | None:
    try:
        bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType(tt)]
    except (ValueError, KeyError):
        return None
    n = math.prod(ne) if ne else 1
    if ne and ne[0] % bs:
        return None
    return n // bs * ts


def mutate_doc(doc: Doc, rng: random.Random, any_key: bool = False) -> Doc:
    """Value-level mutations of a file: ``qgguf.*`` metadata (``any_key``: any key, e.g. hyper-parameters and
    tokenizer arrays), tensor types, shapes, names and payloads."""
    d = Doc([KV(k.key, k.vtype, k.value, k.sub) for k in doc.kvs],
            [RawTensor(t.name, t.ne, t.ggml_type, t.data) for t in doc.tensors], doc.version, doc.alignment)
    for _ in range(rng.choice((1, 1, 2, 3))):
        op = rng.randrange(10)
        qkeys = [i for i, kv in enumerate(d.kvs) if any_key or kv.key.startswith("qgguf.")]
        if op == 9 and qkeys:                                   # shorten or lengthen an array value
            i = rng.choice(qkeys)
            kv = d.kvs[i]
            if kv.vtype == V.ARRAY and isinstance(kv.value, list):
                v = list(kv.value)
                v = v[:rng.randrange(len(v) + 1)] if rng.random() < 0.5 or not v else v + v[:rng.randint(1, 3)]
                d.kvs[i] = KV(kv.key, kv.vtype, v, kv.sub)
        elif op <= 2 and qkeys:                                 # replace a metadata value
            i = rng.choice(qkeys)
            vt, v, sub = _bad_value(rng, d.kvs[i].value)
            d.kvs[i] = KV(d.kvs[i].key, vt, v, sub)
        elif op == 3 and qkeys:                                 # drop a qgguf.* key
            del d.kvs[rng.choice(qkeys)]
        elif op == 4 and d.tensors:                             # another container type (size follows)
            t = rng.choice(d.tensors)
            t.ggml_type = rng.choice(_CONTAINERS)
        elif op == 5 and d.tensors:                             # another shape (size follows)
            t = rng.choice(d.tensors)
            ne = list(t.ne)
            k = rng.randrange(4)
            if k == 0 and ne:
                i = rng.randrange(len(ne))
                ne[i] = max(1, ne[i] + rng.choice((-1, 1, ne[i], -ne[i] // 2)))   # files have no empty dims
            elif k == 1:
                ne.append(rng.choice((1, 1, 2)))
            elif k == 2 and len(ne) > 1:
                ne.reverse()
            elif ne:
                ne.pop()
            t.ne = tuple(ne)
        elif op == 6 and d.tensors:                             # drop or rename a tensor
            i = rng.randrange(len(d.tensors))
            if rng.random() < 0.5:
                del d.tensors[i]
            else:
                t = d.tensors[i]
                base = t.name.rsplit(".", 1)[0] if rng.random() < 0.5 else t.name
                d.tensors[i] = RawTensor(base + rng.choice(("", ".aq_codes", ".x", ".aq_scales")), t.ne,
                                         t.ggml_type, t.data)
        elif op == 7 and d.tensors:                             # payload: special values or random bytes
            t = rng.choice(d.tensors)
            a = bytearray(t.data)
            if a:
                fill = rng.choice((b"\x00\x7e", b"\xff\xff", b"\x00\x7c", b"\x00\x00\xc0\x7f", b"\xff",
                                   bytes([rng.randrange(256)])))
                i = rng.randrange(len(a))
                a[i:i + len(fill) * rng.randint(1, 64)] = fill * rng.randint(1, 64)
                t.data = bytes(a[:len(t.data)])
        else:                                                   # payload bit flips
            if d.tensors:
                t = rng.choice(d.tensors)
                a = bytearray(t.data)
                for _ in range(rng.randint(1, 8)):
                    if a:
                        a[rng.randrange(len(a))] ^= 1 << rng.randrange(8)
                t.data = bytes(a)
    # a file's tensor has the size its type and shape give: pad or cut the payload to it
    for t in d.tensors:
        n = _type_nbytes(t.ggml_type, t.ne)
        if n is None or n > (1 << 24):
            t.ggml_type, t.ne = 24, (len(t.data),)
            continue
        t.data = t.data[:n] + bytes(rng.getrandbits(8) for _ in range(max(0, min(64, n - len(t.data))))) \
            + bytes(max(0, n - len(t.data) - 64))
    return d


# ================================================================================================
# runner

@dataclass
class Finding:
    target: str
    iteration: int
    kind: str
    where: str
    trace: str
    data: bytes


@dataclass
class Report:
    target: str
    inputs: int = 0
    accepted: int = 0       # the target returned normally
    rejected: int = 0       # QggufError
    seconds: float = 0.0
    slowest: float = 0.0
    findings: list[Finding] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.target}: {self.inputs} inputs in {self.seconds:.1f} s ({self.inputs / max(self.seconds, 1e-9):.0f}/s): "
                f"{self.accepted} accepted, {self.rejected} rejected with QggufError, "
                f"{len(self.findings)} findings; slowest input {self.slowest * 1000:.0f} ms")


def _alarm(signum, frame):
    raise Hang()


def _where(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    fr = tb[-1] if tb else None
    return f"{type(exc).__name__} at {Path(fr.filename).name}:{fr.lineno}" if fr else type(exc).__name__


def _guarded(fn, timeout: float):
    """``fn()`` under a per-input timer; returns (outcome, exception, seconds)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    t0 = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        fn()
        out, exc = "ok", None
    except QggufError as e:
        out, exc = "rejected", e
    except Hang as e:
        out, exc = "hang", e
    except Exception as e:  # noqa: BLE001 - everything else is a finding
        out, exc = "crash", e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return out, exc, time.perf_counter() - t0


def load_seeds(corpus: Path = CORPUS) -> list[bytes]:
    files = corpus_files(corpus)
    if not files:
        raise SystemExit(f"no seed corpus in {corpus}: run `python tools/fuzz.py corpus` first")
    return [p.read_bytes() for p in files]


def fuzz(target: str, n: int, seed: int = 0, timeout: float = 1.0, corpus: Path = CORPUS,
         budget: float | None = None, progress: float = 0.0, max_findings: int = 20,
         keep: dict[int, bytes | None] | None = None) -> Report:
    """Run ``n`` mutated inputs (or until ``budget`` seconds) through ``target``. ``keep``: ``{iteration: None}``
    to fill with those iterations' inputs (as GGUF bytes) instead of running them (reproducing findings)."""
    rep = Report(target)
    seeds = load_seeds(corpus)
    tmpdir = Path(tempfile.mkdtemp(prefix="qgguf-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    tmp = tmpdir / "input.gguf"
    if target == "gguf":
        fields = [header_fields(s) for s in seeds]
        gdocs = []
        for s in seeds:
            tmp.write_bytes(s)
            try:
                gdocs.append(doc_from_file(tmp))
            except QggufError:
                pass
    else:
        docs = []
        for s in seeds:
            tmp.write_bytes(s)
            try:
                docs.append(doc_from_file(tmp))
            except QggufError:
                pass
        docs = [d for d in docs if d.tensors]
        rng0 = np.random.default_rng(seed)
        for qt in codebook_types():           # every codebook type the registry knows, generated fresh
            kvs, ts = codebook_tensors_for(qt, "w", codebook_shape_for(qt), rng0)
            docs.append(Doc(kvs=[KV("qgguf.version", int(V.UINT32), 1)] + kvs, tensors=ts))
        docs.append(Doc(tensors=[_std_tensor(f"t.{qt.name.lower()}", qt, 2, 1, rng0) for qt in standard_types()]))
    # warm up outside the timer: imports (torch), numba compilation and native kernels on the seeds as they are
    import torch
    torch.set_num_threads(1)
    import qgguf.runtime.linear  # noqa: F401
    import qgguf.runtime.tokenizer  # noqa: F401
    import qgguf.convert.sources  # noqa: F401
    for i, s in enumerate(seeds if target == "gguf" else docs):
        try:
            if target == "gguf":
                tmp.write_bytes(s)
                run_gguf(str(tmp))
            else:
                run_types(s)
        except QggufError:
            pass
    seen: set[str] = set()
    start = time.perf_counter()
    last = start
    try:
        for i in range(n):
            if budget is not None and time.perf_counter() - start > budget:
                break
            rng = random.Random(f"{seed}/{target}/{i}")
            if target == "gguf":
                data = None
                if gdocs and rng.random() < 0.3:            # a third: values, then serialized
                    try:
                        data = gguf_bytes(mutate_doc(rng.choice(gdocs), rng, any_key=True))
                    except (struct.error, OverflowError, ValueError):
                        data = None
                if data is None:                            # bytes: flips, field smashing, cuts, splices
                    k = rng.randrange(len(seeds))
                    data = mutate_bytes(seeds[k], fields[k], seeds, rng)
                tmp.write_bytes(data)
                fn = lambda: run_gguf(str(tmp))  # noqa: E731
            else:
                doc = mutate_doc(rng.choice(docs), rng)
                data = None
                fn = lambda: run_types(doc)  # noqa: E731
            if keep is not None and i in keep:
                keep[i] = data if data is not None else gguf_bytes(doc)
                continue
            out, exc, dt = _guarded(fn, timeout)
            if out == "rejected" and target == "gguf" and exc.path is None:
                out = "unnamed"      # a QggufError that does not name the file: a finding too
            rep.inputs += 1
            rep.slowest = max(rep.slowest, dt)
            if out == "ok":
                rep.accepted += 1
            elif out == "rejected":
                rep.rejected += 1
            else:
                where = {"hang": "hang", "unnamed": f"error without the file name: {exc}"[:120]}.get(out) \
                    or _where(exc)
                if where not in seen and len(rep.findings) < max_findings:
                    seen.add(where)
                    if data is None:
                        try:
                            data = gguf_bytes(doc)
                        except (struct.error, OverflowError, ValueError):   # a value its type cannot hold
                            data = repr(doc).encode("utf-8", "backslashreplace")
                    rep.findings.append(Finding(target, i, out, where, "".join(
                        traceback.format_exception(type(exc), exc, exc.__traceback__)), data))
            if progress and time.perf_counter() - last > progress:
                last = time.perf_counter()
                rep.seconds = last - start
                print("  " + rep.line(), file=sys.stderr, flush=True)
    finally:
        rep.seconds = time.perf_counter() - start
        tmp.unlink(missing_ok=True)
        tmpdir.rmdir()
    return rep


def replay(path: Path, timeout: float = 5.0) -> dict[str, tuple[str, BaseException | None]]:
    """One corpus file through both targets: ``{target: (outcome, exception)}``."""
    out = {}
    o, e, _ = _guarded(lambda: run_gguf(str(path)), timeout)
    out["gguf"] = (o, e)

    def types():
        try:
            doc = doc_from_file(path)
        except QggufError:
            return
        run_types(doc, path)
    o, e, _ = _guarded(types, timeout)
    out["types"] = (o, e)
    return out


def save_findings(rep: Report, crashes: Path) -> None:
    crashes.mkdir(parents=True, exist_ok=True)
    for f in rep.findings:
        h = hashlib.sha1(f.data).hexdigest()[:12]
        (crashes / f"{f.target}-{h}.gguf").write_bytes(f.data)
        (crashes / f"{f.target}-{h}.txt").write_text(f"iteration {f.iteration}: {f.kind} {f.where}\n\n{f.trace}")


def main(argv=None) -> int:
    np.seterr(all="ignore")   # NaN/overflow in decoded garbage is expected, not a finding
    import faulthandler
    faulthandler.enable()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus", help="write the generated seeds to tests/fuzz_corpus/seeds/")
    c.add_argument("--dir", type=Path, default=CORPUS)
    r = sub.add_parser("run", help="fuzz")
    r.add_argument("--target", choices=TARGETS + ("all",), default="all")
    r.add_argument("-n", type=int, default=100_000, help="inputs per target (default 100000)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--timeout", type=float, default=1.0, help="seconds per input before it counts as a hang")
    r.add_argument("--budget", type=float, default=None, help="stop a target after this many seconds")
    r.add_argument("--corpus", type=Path, default=CORPUS)
    r.add_argument("--crashes", type=Path, default=ROOT / "out" / "fuzz-crashes")
    x = sub.add_parser("reproduce", help="write the input of iterations I... of a run (same --seed) as files")
    x.add_argument("--target", choices=TARGETS, required=True)
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--corpus", type=Path, default=CORPUS)
    x.add_argument("iterations", type=int, nargs="+")
    x.add_argument("-o", "--out", type=Path, default=CORPUS / "found")
    p = sub.add_parser("replay", help="every corpus file through both targets")
    p.add_argument("--corpus", type=Path, default=CORPUS)
    a = ap.parse_args(argv)
    if a.cmd == "corpus":
        for p_ in write_corpus(a.dir):
            print(f"{p_.relative_to(ROOT) if p_.is_relative_to(ROOT) else p_}  {p_.stat().st_size} bytes")
        return 0
    if a.cmd == "reproduce":
        keep: dict[int, bytes | None] = {i: None for i in a.iterations}
        fuzz(a.target, max(a.iterations) + 1, seed=a.seed, corpus=a.corpus, keep=keep)
        a.out.mkdir(parents=True, exist_ok=True)
        for i, data in keep.items():
            f = a.out / f"{a.target}-seed{a.seed}-it{i}.gguf"
            f.write_bytes(data)
            print(f)
        return 0
    if a.cmd == "replay":
        bad = 0
        for f in corpus_files(a.corpus):
            res = replay(f)
            for t, (o, e) in res.items():
                if o not in ("ok", "rejected"):
                    bad += 1
                    print(f"{f.name} [{t}]: {o} {_where(e) if e else ''}")
            print(f"{f.relative_to(ROOT) if f.is_relative_to(ROOT) else f}: "
                  + ", ".join(f"{t} {o}" for t, (o, _e) in res.items()))
        return 1 if bad else 0
    targets = TARGETS if a.target == "all" else (a.target,)
    failed = False
    for t in targets:
        rep = fuzz(t, a.n, seed=a.seed, timeout=a.timeout, corpus=a.corpus, budget=a.budget, progress=30.0)
        print(rep.line(), flush=True)
        if rep.findings:
            failed = True
            save_findings(rep, a.crashes)
            for f in rep.findings:
                print(f"  finding (iteration {f.iteration}): {f.kind} {f.where}")
            print(f"  inputs and tracebacks written to {a.crashes}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
