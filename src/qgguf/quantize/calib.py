"""Calibration data: token sequences for the forward passes that collect statistics.

``--calib FILE``: plain text, or JSON lines with a ``text`` field (``.jsonl``, or any file whose first
line is a JSON object). Documents are shuffled with ``--seed``, tokenized and concatenated (each
document ends with a blank line), and cut into ``--nsamples`` windows of ``--seqlen`` tokens (each
starting with BOS when the tokenizer adds one). ``--calib self`` (the offline default): sequences
sampled from the model itself, starting from BOS, at temperature 1.
"""
from __future__ import annotations

import json
import random
from pathlib import Path


from ..errors import InputFileError, OptionError
from ..runtime.threads import torch_threads


def load_texts(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise InputFileError("no such calibration file", p)
    try:
        raw = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputFileError(f"cannot read: {e.strerror}", p) from None
    first = raw.lstrip()[:1]
    if p.suffix.lower() in (".jsonl", ".ndjson") or first == "{":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputFileError(f"line {i} is not JSON: {e.msg}", p) from None
            t = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(t, str):
                raise InputFileError(f"line {i} has no string field 'text'", p)
            if t.strip():
                texts.append(t)
    else:
        texts = [t for t in raw.split("\n\n") if t.strip()]
    if not texts:
        raise InputFileError("calibration file has no text", p)
    return texts


def text_sequences(tokenizer, texts: list[str], nsamples: int, seqlen: int, seed: int,
                   add_bos: bool = True, bos_id: int | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    body = seqlen - (1 if add_bos and bos_id is not None else 0)
    need = nsamples * body
    stream: list[int] = []
    for i in order:
        stream.extend(tokenizer.encode(texts[i] + "\n\n", add_special=False))
        if len(stream) >= need:
            break
    n = min(nsamples, len(stream) // body) if body > 0 else 0
    if n == 0:
        raise OptionError(f"the calibration text has only {len(stream)} tokens, fewer than --seqlen {seqlen}")
    seqs = []
    for k in range(n):
        chunk = stream[k * body:(k + 1) * body]
        seqs.append(([bos_id] if add_bos and bos_id is not None else []) + chunk)
    return seqs


def self_sequences(model, nsamples: int, seqlen: int, seed: int, bos_id: int | None,
                   progress: bool = False, batch: int = 64, threads: int = 1) -> list[list[int]]:
    """Sequences sampled from ``model`` (a :class:`qgguf.runtime.model.LlamaModel`; temperature 1), each
    starting with BOS. ``batch`` sequences are sampled together (one batched step per position, with a
    per-layer float32 KV cache); the result depends only on ``seed``, ``nsamples``, ``seqlen`` and ``batch``.
    Torch runs with ``threads`` threads here (default 1: a step is hundreds of small operations, which extra
    threads slow down - by 10x and more on a busy machine)."""
    import math

    import torch

    hp = model.hp
    ws = [model.block_weights(il) for il in range(hp.n_layer)]
    w_tok = model.tok_embd.dense_weight()
    w_out = model.output.dense_weight()
    cos_t, sin_t = model._rope_tables(seqlen)
    g = torch.Generator().manual_seed(seed)
    start = bos_id if bos_id is not None else 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=nsamples * (seqlen - 1), desc="sampling calibration", unit="tok", unit_scale=True,
                   leave=False)
    scale = 1.0 / math.sqrt(hp.head_dim_k)
    try:
        with torch_threads(max(1, int(threads))):
            return _sample(model, ws, w_tok, w_out, cos_t, sin_t, g, start, nsamples, seqlen, batch, bar, scale)
    finally:
        if bar is not None:
            bar.close()


def _sample(model, ws, w_tok, w_out, cos_t, sin_t, g, start, nsamples, seqlen, batch, bar, scale):
    import torch
    import torch.nn.functional as F

    from ..runtime.model import ffn_hidden, linear, rms_norm, rope_apply

    hp = model.hp
    H, Hkv, dk, dv = hp.n_head, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v
    eps = hp.norm_eps
    seqs: list[list[int]] = []
    with torch.no_grad():
        for b0 in range(0, nsamples, batch):
            B = min(batch, nsamples - b0)
            K = [torch.zeros(B, Hkv, seqlen, dk) for _ in range(hp.n_layer)]
            V = [torch.zeros(B, Hkv, seqlen, dv) for _ in range(hp.n_layer)]
            toks = torch.full((B, seqlen), start, dtype=torch.long)
            for pos in range(seqlen - 1):
                x = F.embedding(toks[:, pos:pos + 1], w_tok)                 # (B, 1, E)
                cos, sin = cos_t[pos:pos + 1], sin_t[pos:pos + 1]
                for il, w in enumerate(ws):
                    n = rms_norm(x, w["attn_norm"], eps)
                    q = rope_apply(linear(w, "attn_q", n).view(B, 1, H, dk), cos, sin, hp.n_rot)
                    k = rope_apply(linear(w, "attn_k", n).view(B, 1, Hkv, dk), cos, sin, hp.n_rot)
                    v = linear(w, "attn_v", n).view(B, 1, Hkv, dv)
                    K[il][:, :, pos] = k[:, 0]
                    V[il][:, :, pos] = v[:, 0]
                    a = F.scaled_dot_product_attention(q.transpose(1, 2), K[il][:, :, :pos + 1],
                                                       V[il][:, :, :pos + 1], scale=scale,
                                                       enable_gqa=H != Hkv)
                    x = x + linear(w, "attn_output", a.transpose(1, 2).reshape(B, 1, H * dv))
                    x = x + linear(w, "ffn_down", ffn_hidden(w, rms_norm(x, w["ffn_norm"], eps)))
                logits = F.linear(rms_norm(x[:, 0], model.output_norm, eps), w_out)
                p = torch.softmax(logits.float(), dim=-1)
                toks[:, pos + 1] = torch.multinomial(p, 1, generator=g)[:, 0]
                if bar is not None:
                    bar.update(B)
            seqs.extend(toks.tolist())
            del K, V
    return seqs


def dataset_texts(name: str, limit: int = 20000) -> list[str]:
    """Texts of a Hugging Face dataset ``NAME[:CONFIG][@SPLIT]`` (field ``text``; needs ``datasets`` and network)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise OptionError(f"--calib {name!r} is not a file; loading a Hugging Face dataset by name needs the "
                          "'datasets' package (pip install datasets) and network access; give a text or JSONL "
                          "file, or 'self'") from None
    from datasets import load_dataset
    spec, _, split = name.partition("@")
    dname, _, config = spec.partition(":")
    try:
        ds = load_dataset(dname, config or None, split=split or "train", streaming=True)
        texts = []
        for row in ds:
            t = row.get("text") if isinstance(row, dict) else None
            if not isinstance(t, str):
                raise OptionError(f"dataset {name!r} has no string field 'text'")
            if t.strip():
                texts.append(t)
            if len(texts) >= limit:
                break
    except OptionError:
        raise
    except Exception as e:  # network, unknown name, ...
        raise OptionError(f"cannot load the calibration dataset {name!r}: {e}") from None
    if not texts:
        raise OptionError(f"the calibration dataset {name!r} has no text")
    return texts


def _is_dataset_name(s: str) -> bool:
    """Not an existing path and shaped like ``name`` or ``org/name`` (optionally ``:config``, ``@split``)
    with no file suffix."""
    p = Path(s)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") > 1:
        return False
    return p.suffix.lower() not in (".txt", ".jsonl", ".json", ".ndjson", ".raw", ".text", ".md")


def calibration_sequences(calib, model, tokenizer, md: dict, nsamples: int, seqlen: int, seed: int,
                          progress: bool = False) -> tuple[list[list[int]], str]:
    """(token sequences, dataset description). ``calib``: None or ``"self"`` (sampled from ``model``), a
    text/JSONL file, or a Hugging Face dataset name (``NAME[:CONFIG][@SPLIT]``)."""
    if nsamples <= 0 or seqlen <= 1:
        raise OptionError("--nsamples must be > 0 and --seqlen > 1")
    bos = md.get("tokenizer.ggml.bos_token_id")
    if calib is None or str(calib) == "self":
        if model is None:
            raise OptionError("--calib self needs the model")
        return self_sequences(model, nsamples, seqlen, seed, bos, progress), "self"
    if _is_dataset_name(str(calib)):
        texts = dataset_texts(str(calib), limit=max(1000, 4 * nsamples))
    else:
        texts = load_texts(calib)
    add_bos = md.get("tokenizer.ggml.add_bos_token", md.get("tokenizer.ggml.model") == "llama")
    return text_sequences(tokenizer, texts, nsamples, seqlen, seed, bool(add_bos), bos), str(calib)
