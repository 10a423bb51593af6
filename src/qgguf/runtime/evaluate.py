"""Perplexity and KL divergence, following llama.cpp's ``llama-perplexity`` (tools/perplexity/perplexity.cpp).

Protocol:

* tokenize the whole text once with the vocabulary's special-token rule (BOS first when the vocab adds BOS);
* ``n_chunk = n_tokens // n_ctx`` (or fewer with ``chunks``); chunk ``i`` is ``tokens[i*n_ctx:(i+1)*n_ctx]``,
  evaluated from an empty KV cache;
* when the vocab adds BOS, the first token of every chunk is replaced by BOS;
* only the second half is scored: the logits at positions ``first = n_ctx//2 .. n_ctx-2`` predict the
  tokens at ``first+1 .. n_ctx-1`` (``n_ctx - 1 - first`` tokens per chunk).

Statistics as llama.cpp prints them: ``PPL = exp(mean NLL)`` with ``±PPL*sqrt(var(NLL)/(N-1))``; with a base
model, mean ``KL(P_base || P_model)`` with its standard error, percentiles of the per-token KLD (llama.cpp's
interpolation), same-top rate with ``sqrt(p(1-p)/(N-1))``, the base's PPL and ``ln(PPL/PPL_base)``, and the
Δp statistics. KLD here is computed exactly in float64 (llama.cpp stores base log-probabilities as 16-bit
values and skips base probabilities below e^-16, which changes KLD in the 4th significant digit at most).

Base and model are evaluated chunk by chunk side by side; base logits are never stored.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InputFileError, OptionError

# (chunk tokens, first) -> logits array (n_ctx - first, n_vocab) for chunk positions first..n_ctx-1
ChunkLogits = Callable[[list, int], "np.ndarray"]

PERCENTILES = (("max", 1.0), ("p99.9", 0.999), ("p99", 0.99), ("p95", 0.95), ("p90", 0.90),
               ("median", None), ("p10", 0.10), ("p5", 0.05), ("p1", 0.01), ("p0.1", 0.001), ("min", 0.0))


def _mean_and_uncertainty(s: float, s2: float, n: int, *, min_count: int = 10) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: mean and the standard error of the mean."""
    if n < 1:
        return 0.0, 0.0
    f = s / n
    df = s2 / n - f * f
    df = math.sqrt(df / (n - 1)) if df > 0 and n > min_count else 0.0
    return f, df


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile: linear interpolation at ``fraction*(n-1)`` of the sorted values."""
    v = sorted_values
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (len(v) - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


def median(sorted_values: np.ndarray) -> float:
    v, n = sorted_values, len(sorted_values)
    return float(0.5 * (v[n // 2] + v[n // 2 - 1])) if n % 2 == 0 else float(v[n // 2])


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@dataclass
class EvalStats:
    """Running sums over scored tokens (llama.cpp's kl_divergence_result, plus per-token KLD/Δp lists)."""

    count: int = 0
    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_p_diff: float = 0.0
    sum_p_diff2: float = 0.0
    sum_p_diff4: float = 0.0
    n_same_top: int = 0
    has_base: bool = False
    kld_values: list = field(default_factory=list)
    p_diff_values: list = field(default_factory=list)

    def add(self, logits: np.ndarray, targets: np.ndarray, base_logits: np.ndarray | None = None) -> None:
        """``logits``: (n, n_vocab) predicting ``targets`` (n,); ``base_logits`` the same for the base model."""
        lp = _log_softmax64(logits)
        targets = np.asarray(targets, dtype=np.int64)
        idx = np.arange(len(targets))
        nll = -lp[idx, targets]
        self.count += len(targets)
        self.sum_nll += float(nll.sum())
        self.sum_nll2 += float((nll * nll).sum())
        if base_logits is None:
            return
        self.has_base = True
        lpb = _log_softmax64(base_logits)
        nllb = -lpb[idx, targets]
        self.sum_nll_base += float(nllb.sum())
        self.sum_nll_base2 += float((nllb * nllb).sum())
        self.sum_nll_nll_base += float((nll * nllb).sum())
        pb = np.exp(lpb)
        kld = (pb * (lpb - lp)).sum(axis=-1)
        self.sum_kld += float(kld.sum())
        self.sum_kld2 += float((kld * kld).sum())
        self.kld_values.append(kld.astype(np.float32))
        # argmax of the raw logits, first index on ties (as llama.cpp's strict '>' scan)
        self.n_same_top += int((np.argmax(logits, axis=-1) == np.argmax(base_logits, axis=-1)).sum())
        p_diff = np.exp(-nll) - np.exp(-nllb)
        self.sum_p_diff += float(p_diff.sum())
        self.sum_p_diff2 += float((p_diff ** 2).sum())
        self.sum_p_diff4 += float((p_diff ** 4).sum())
        self.p_diff_values.append(p_diff.astype(np.float32))

    # ---- results ----------------------------------------------------------------------------------
    def ppl(self) -> tuple[float, float]:
        """PPL and its uncertainty as the perplexity run prints them (``Final estimate``)."""
        n = self.count
        if n == 0:
            return float("nan"), float("nan")
        nll = self.sum_nll / n
        var = self.sum_nll2 / n - nll * nll
        ppl = math.exp(nll)
        err = ppl * math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0
        return ppl, err

    def result(self) -> dict:
        ppl, ppl_err = self.ppl()
        out: dict = {"ppl": ppl, "ppl_err": ppl_err, "scored": self.count}
        if not self.has_base:
            return out
        n = self.count
        lp, lp_err = _mean_and_uncertainty(self.sum_nll, self.sum_nll2, n)
        lb, lb_err = _mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, n)
        cov = 0.0
        if n >= 10:
            cov = (self.sum_nll_nll_base / n - (self.sum_nll / n) * (self.sum_nll_base / n)) / (n - 1)
        ratio_unc = math.sqrt(max(lp_err ** 2 + lb_err ** 2 - 2.0 * cov, 0.0))
        kld, kld_err = _mean_and_uncertainty(self.sum_kld, self.sum_kld2, n)
        kv = np.sort(np.concatenate(self.kld_values)) if self.kld_values else np.zeros(1, np.float32)
        pv = np.sort(np.concatenate(self.p_diff_values)) if self.p_diff_values else np.zeros(1, np.float32)
        same = self.n_same_top / n if n else float("nan")
        same_err = math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0
        dp, dp_err = _mean_and_uncertainty(self.sum_p_diff, self.sum_p_diff2, n)
        mse, mse_err = _mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, n)
        rms = math.sqrt(mse)
        ppl_base = math.exp(lb)
        out.update({
            "ppl_base": ppl_base, "ppl_base_err": ppl_base * lb_err,
            "ln_ppl_ratio": lp - lb, "ln_ppl_ratio_err": ratio_unc,
            "kld": kld, "kld_err": kld_err,
            "kld_p99": percentile(kv, 0.99),
            "kld_percentiles": {k: (median(kv) if f is None else percentile(kv, f)) for k, f in PERCENTILES},
            "same_top": same, "same_top_err": same_err,
            "dp_mean": dp, "dp_mean_err": dp_err,
            "dp_rms": rms, "dp_rms_err": 0.5 / rms * mse_err if rms > 0 else 0.0,
            "dp_percentiles": {k: (median(pv) if f is None else percentile(pv, f)) for k, f in PERCENTILES},
        })
        return out


def plan_chunks(n_tokens: int, ctx: int, chunks: int | None, source=None) -> int:
    """Number of chunks as llama-perplexity chooses it (with its 2*n_ctx minimum)."""
    if ctx < 4 or ctx % 2:
        raise OptionError(f"context size {ctx} must be an even number of at least 4")
    if n_tokens < 2 * ctx:
        raise OptionError(f"the text tokenizes to only {n_tokens} tokens; a context of {ctx} needs "
                          f"at least {2 * ctx}", source)
    n_max = n_tokens // ctx
    if chunks is not None:
        if chunks < 1:
            raise OptionError(f"--chunks must be at least 1 (got {chunks})")
        return min(int(chunks), n_max)
    return n_max


def run_protocol(tokens: Sequence[int], ctx: int, n_chunk: int, add_bos: bool, bos_id: int | None,
                 model_logits: ChunkLogits, base_logits: ChunkLogits | None = None,
                 progress: bool = True, desc: str = "eval") -> EvalStats:
    """Score ``n_chunk`` chunks of ``ctx`` tokens with the given logit functions (see module docstring)."""
    first = ctx // 2
    stats = EvalStats()
    it = range(n_chunk)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(it, desc=desc, unit="chunk", dynamic_ncols=True)
        it = bar
    for i in it:
        chunk = [int(t) for t in tokens[i * ctx:(i + 1) * ctx]]
        targets = np.asarray(chunk[first + 1:], dtype=np.int64)
        if add_bos:
            chunk[0] = int(bos_id)
        lg = np.asarray(model_logits(chunk, first), dtype=np.float32)[: ctx - 1 - first]
        bl = None
        if base_logits is not None:
            bl = np.asarray(base_logits(chunk, first), dtype=np.float32)[: ctx - 1 - first]
            if bl.shape != lg.shape:
                raise OptionError(f"the base model has {bl.shape[-1]} vocabulary entries, the model {lg.shape[-1]}")
        stats.add(lg, targets, bl)
        if bar is not None:
            ppl, _ = stats.ppl()
            post = {"ppl": f"{ppl:.4f}"}
            if bl is not None:
                post["kld"] = f"{stats.sum_kld / stats.count:.5f}"
            bar.set_postfix(post)
    if bar is not None:
        bar.close()
    return stats


def torch_chunk_logits(model) -> ChunkLogits:
    """Logit function for a :class:`~qgguf.runtime.model.LlamaModel` (empty cache per chunk)."""

    def fn(chunk: list, first: int) -> np.ndarray:
        model.reset()
        return model.forward(chunk, 0, logits_from=first).numpy()

    return fn


class BaseLogitCache:
    """The base model's logits of the scored part of every chunk, in a ``.npy`` file (float32, exact), with a
    ``.json`` key beside it: the base file (absolute path, size, modification time), a hash of the tokens,
    ``ctx``, the number of chunks and the vocabulary size. A cache whose key differs is made again; a new
    cache is written under a temporary name and renamed when every chunk is in it."""

    def __init__(self, path, base_path, tokens, ctx: int, n_chunk: int, n_vocab: int):
        import hashlib

        self.path = Path(path)
        bp = Path(base_path) if base_path is not None else None
        st = bp.stat() if bp is not None and bp.is_file() else None
        self.key = {"base": str(bp.resolve()) if bp is not None else None,
                    "base_size": st.st_size if st else None, "base_mtime_ns": st.st_mtime_ns if st else None,
                    "tokens_sha256": hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest(),
                    "ctx": int(ctx), "chunks": int(n_chunk), "n_vocab": int(n_vocab), "dtype": "float32"}
        self.shape = (int(n_chunk), int(ctx) - 1 - int(ctx) // 2, int(n_vocab))
        self._arr = None
        self._tmp = None
        self._i = 0

    def _key_path(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def valid(self) -> bool:
        import json

        try:
            key = json.loads(self._key_path().read_text())
        except (OSError, ValueError):
            return False
        if key != self.key or not self.path.is_file():
            return False
        try:
            arr = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError):
            return False
        if arr.shape != self.shape or arr.dtype != np.float32:
            return False
        self._arr = arr
        return True

    def logits_fn(self, compute):
        if self._arr is not None:
            arr = self._arr

            def read(chunk, first):
                i, self._i = self._i, self._i + 1
                return np.asarray(arr[i])

            return read
        from numpy.lib.format import open_memmap

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        out = open_memmap(self._tmp, mode="w+", dtype=np.float32, shape=self.shape)
        self._arr = out

        def write(chunk, first):
            i, self._i = self._i, self._i + 1
            lg = np.asarray(compute(chunk, first), dtype=np.float32)[: self.shape[1]]
            out[i] = lg
            return lg

        return write

    def finish(self) -> None:
        import json

        if self._tmp is None:
            return
        if self._i != self.shape[0]:   # interrupted: leave no cache behind
            self._tmp.unlink(missing_ok=True)
            return
        self._arr.flush()
        del self._arr
        os.replace(self._tmp, self.path)
        self._key_path().write_text(json.dumps(self.key))


def read_text(text_path: str | Path) -> str:
    p = Path(text_path)
    try:
        return p.read_text(encoding="utf-8", errors="strict")
    except FileNotFoundError:
        raise InputFileError("no such text file", p) from None
    except UnicodeDecodeError as e:
        raise InputFileError(f"not UTF-8 text ({e.reason} at byte {e.start})", p) from None
    except OSError as e:
        raise InputFileError(f"cannot read: {e.strerror}", p) from None


def load_tokenizer(model_path):
    from .tokenizer import Tokenizer

    return Tokenizer.from_gguf(model_path)


def evaluate(model_path: str | Path, text_path: str | Path, ctx: int = 512, chunks: int | None = None,
             base: str | Path | None = None, threads: int | None = None, progress: bool = True,
             base_cache: str | Path | None = None) -> dict:
    """Perplexity of ``model_path`` over ``text_path`` (and KLD against ``base``), llama-perplexity style.

    ``base_cache``: a file for the base model's logits (like llama-perplexity's ``--kl-divergence-base``):
    written on the first run, then read instead of running the base model again when it was made from the
    same base file, tokens, ``ctx`` and chunks (:class:`BaseLogitCache`).

    Returns a dict with ``ppl, ppl_err, chunks, ctx, tokens, scored`` and, with ``base``,
    ``kld, kld_err, kld_p99, kld_percentiles, same_top, same_top_err, ppl_base, ln_ppl_ratio, dp_*``
    (``kld``/``same_top``... are None without a base)."""
    from .model import LlamaModel

    if base_cache is not None and base is None:
        raise OptionError("a base-logit cache needs --base")
    model = LlamaModel.from_gguf(model_path, threads=threads)
    base_model = None
    if base is not None and base_cache is None:
        base_model = LlamaModel.from_gguf(base, threads=threads)
    loader = (lambda: LlamaModel.from_gguf(base, threads=threads)) if base_cache is not None else None
    return evaluate_loaded(model, load_tokenizer(model_path), text_path, ctx=ctx, chunks=chunks,
                           base_model=base_model, progress=progress, desc=Path(model_path).name,
                           base_cache=base_cache, base_loader=loader, base_path=base)


def evaluate_loaded(model, tok, text_path: str | Path, ctx: int = 512, chunks: int | None = None,
                    base_model=None, progress: bool = True, desc: str | None = None,
                    base_cache: str | Path | None = None, base_loader=None, base_path=None) -> dict:
    """:func:`evaluate` on models already loaded (``model``, its tokenizer ``tok``, optional ``base_model``, or a
    ``base_cache`` with ``base_loader()`` loading the base model when the cache has to be made)."""
    text = read_text(text_path)
    tokens = tok.encode(text, add_special=True, parse_special=False)
    n_chunk = plan_chunks(len(tokens), ctx, chunks, text_path)
    base_fn = None
    cache = None
    if base_cache is not None:
        cache = BaseLogitCache(base_cache, base_path, tokens, ctx, n_chunk, model.n_vocab)
        if not cache.valid():
            base_model = base_loader()
    if base_model is not None:
        if base_model.n_vocab != model.n_vocab:
            raise OptionError(f"vocabulary of {base_model.n_vocab} tokens differs from the model's "
                              f"{model.n_vocab}", getattr(base_model, "path", None))
        base_fn = torch_chunk_logits(base_model)
    if cache is not None:
        base_fn = cache.logits_fn(base_fn)
    try:
        stats = run_protocol(tokens, ctx, n_chunk, bool(tok.add_bos), tok.bos_id, torch_chunk_logits(model),
                             base_fn, progress=progress, desc=desc or "eval")
    finally:
        if cache is not None:
            cache.finish()
    res = {"ppl": None, "ppl_err": None, "kld": None, "kld_err": None, "kld_p99": None,
           "same_top": None, "same_top_err": None}
    res.update(stats.result())
    res.update({"chunks": n_chunk, "ctx": ctx, "tokens": len(tokens)})
    return res


def format_result(res: dict) -> str:
    """Human-readable summary in llama-perplexity's wording."""
    lines = [f"chunks {res['chunks']} x ctx {res['ctx']} ({res.get('scored', '?')} scored tokens of "
             f"{res['tokens']})",
             f"Final estimate: PPL = {res['ppl']:.4f} +/- {res['ppl_err']:.5f}"]
    if res.get("kld") is not None:
        pc = res["kld_percentiles"]
        lines += [
            f"Mean PPL(base)                : {res['ppl_base']:10.6f} ± {res['ppl_base_err']:10.6f}",
            f"Mean ln(PPL(Q)/PPL(base))     : {res['ln_ppl_ratio']:10.6f} ± {res['ln_ppl_ratio_err']:10.6f}",
            f"Mean    KLD: {res['kld']:10.6f} ± {res['kld_err']:10.6f}",
            f"Maximum KLD: {pc['max']:10.6f}",
            f"99.9%   KLD: {pc['p99.9']:10.6f}",
            f"99.0%   KLD: {pc['p99']:10.6f}",
            f"95.0%   KLD: {pc['p95']:10.6f}",
            f"Median  KLD: {pc['median']:10.6f}",
            f"Minimum KLD: {pc['min']:10.6f}",
            f"RMS Δp    : {100 * res['dp_rms']:6.3f} ± {100 * res['dp_rms_err']:5.3f} %",
            f"Same top p: {100 * res['same_top']:6.3f} ± {100 * res['same_top_err']:5.3f} %",
        ]
    return "\n".join(lines)


__all__ = ["evaluate", "BaseLogitCache", "EvalStats", "run_protocol", "plan_chunks", "percentile", "torch_chunk_logits",
           "format_result", "read_text"]
