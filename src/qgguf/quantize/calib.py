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

import numpy as np

from ..errors import InputFileError, OptionError


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
                   progress: bool = False) -> list[list[int]]:
    """Sequences sampled from ``model`` (temperature 1), each starting with BOS."""
    import torch
    g = torch.Generator().manual_seed(seed)
    seqs = []
    it = range(nsamples)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="sampling calibration", unit="seq", leave=False)
    start = bos_id if bos_id is not None else 0
    with torch.no_grad():
        for _ in it:
            model.reset()
            toks = [start]
            pos = 0
            cur = [start]
            while len(toks) < seqlen:
                logits = model.forward(cur, start_pos=pos, logits_from=-1)[-1]
                pos += len(cur)
                p = torch.softmax(logits.float(), dim=-1)
                t = int(torch.multinomial(p, 1, generator=g))
                toks.append(t)
                cur = [t]
            seqs.append(toks)
    model.reset()
    return seqs


def calibration_sequences(calib, model, tokenizer, md: dict, nsamples: int, seqlen: int, seed: int,
                          progress: bool = False) -> tuple[list[list[int]], str]:
    """(token sequences, dataset description)."""
    if nsamples <= 0 or seqlen <= 1:
        raise OptionError("--nsamples must be > 0 and --seqlen > 1")
    bos = md.get("tokenizer.ggml.bos_token_id")
    if calib is None or str(calib) == "self":
        return self_sequences(model, nsamples, seqlen, seed, bos, progress), "self"
    texts = load_texts(calib)
    add_bos = md.get("tokenizer.ggml.add_bos_token", md.get("tokenizer.ggml.model") == "llama")
    return text_sequences(tokenizer, texts, nsamples, seqlen, seed, bool(add_bos), bos), str(calib)
