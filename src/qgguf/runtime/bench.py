"""``qgguf bench MODEL.gguf``: prompt-processing and decode speed of the torch runner, like llama-bench.

* ``pp``: ``-p`` tokens in one batch from an empty cache (``LlamaModel.forward``: matmuls, torch's attention);
  tokens/s = n_prompt / seconds.
* ``tg``: ``-n`` tokens decoded one at a time from an empty cache, through :class:`LeanDecoder` (below);
  tokens/s = n_gen / seconds.

Each is repeated ``-r`` times; ``pp_tps``/``tg_tps`` are the best repetition (robust on a shared machine), the
means are reported too. Token ids are fixed pseudo-random ids (as llama-bench, the text does not matter).

:class:`LeanDecoder` is the single-token path with no per-token Python work beyond one call per weight: every
buffer is preallocated, native AQ weights are called through the C entry point with pointers computed once,
torch runs its (microsecond-sized) ops on one thread while the weight kernels use ``threads`` (on a loaded
machine torch's OpenMP barriers for tiny ops cost more than they save), nothing is ever dequantized per token.
It shares the model's KV cache, so it continues after a prompt run with ``LlamaModel.forward``.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import InputFileError, OptionError
from .threads import torch_threads


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; else the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r if sys.platform == "darwin" else r * 1024)


def _native_ffi():
    from ..native import _ffi, _lib
    return _ffi, _lib


def _native_of(lin):
    """The native codebook tensor (AQTensor/VQTensor) behind ``lin``, or None."""
    return getattr(lin, "native", None)


class _Mat:
    """One weight's y = W x into a fixed output buffer from a fixed input buffer. Native AQ/VQ weights are one
    C call with pointers computed once (:class:`qgguf.native.BoundMatvec`); dense weights use torch.mv (the
    same sums as the forward pass: a block's output feeds llama.cpp-style activation rounding, where a
    rounding-level difference can flip a step), on ``dense_threads`` torch threads, except with ``native_dense``
    (the output matrix: the one large dense product of a decode step, nothing rounds after it) a float32 weight
    runs on ``dense_threads`` threads of the native pool (:class:`qgguf.native.BoundDenseMatvec`)."""

    def __init__(self, lin, x: torch.Tensor, y: torch.Tensor, threads: int, dense_threads: int = 1,
                 native_dense: bool = False):
        self.lin, self.x, self.y = lin, x, y
        nat = _native_of(lin)
        if nat is not None:
            from ..native import BoundMatvec
            self.call = BoundMatvec([nat], x.numpy(), [y.numpy()], int(threads))
        elif hasattr(lin, "weight") and isinstance(lin.weight, torch.Tensor):
            w = lin.weight
            rin = getattr(lin, "round_input", None)     # llama.cpp's activation rounding, when the runner does it
            nt = max(1, int(dense_threads))
            from .. import native
            if native_dense and native.available() and w.dtype == torch.float32 and w.is_contiguous():
                xr = torch.empty_like(x) if rin is not None else x
                bound = native.BoundDenseMatvec(w.numpy(), xr.numpy(), y.numpy(), min(nt, 256))
                if rin is None:
                    self.call = bound
                else:
                    def call():
                        xr.copy_(rin(x.view(1, -1)).view(-1))
                        bound()
                    self.call = call
                return

            def mv():
                if rin is None:
                    torch.mv(w, x, out=y)
                else:
                    torch.mv(w, rin(x.view(1, -1)).view(-1), out=y)
            if nt == 1:
                self.call = mv
            else:
                def call():
                    prev = torch.get_num_threads()
                    torch.set_num_threads(nt)
                    try:
                        mv()
                    finally:
                        torch.set_num_threads(prev)
                self.call = call
        else:
            def call():
                y.copy_(lin(x.view(1, -1)).view(-1))
            self.call = call


class _Group:
    """Several weights that read the same input buffer (q/k/v; gate/up): one native call for all of them when
    every one is a native codebook tensor (:func:`qgguf.native.matvec_multi`: one parallel job, bit-identical
    to separate calls), else one :class:`_Mat` each."""

    def __init__(self, lins, x: torch.Tensor, ys, threads: int, fuse: bool = True):
        nats = [_native_of(lin) for lin in lins]
        self.fused = fuse and len(lins) > 1 and all(n is not None for n in nats)
        if self.fused:
            from ..native import BoundMatvec
            self.call = BoundMatvec(nats, x.numpy(), [y.numpy() for y in ys], int(threads))
        else:
            mats = [_Mat(lin, x, y, threads) for lin, y in zip(lins, ys)]

            def call():
                for m in mats:
                    m.call()
            self.call = call


class LeanDecoder:
    """Single-token decoding on a :class:`~qgguf.runtime.model.LlamaModel` (module docstring).

    ``step(token, pos)`` -> logits (a float32 tensor of n_vocab that the next step overwrites: copy it to keep
    it). ``pos`` must equal the number of cached positions (``model.n_past``). ``threads``: threads of the native
    weight kernels; ``fuse``: q/k/v and gate/up as one native call each (bit-identical to separate calls);
    ``dense_threads``: threads of the dense output matrix (the native pool's; torch's without the native module;
    default ``threads``); ``native_attention``: rope, cache store and attention in one native call
    (:func:`qgguf.native.decode_attention`; rope and cache bit-identical, the attention sums in another order
    than torch's), when the native module is built and rope covers whole heads; else torch ops."""

    def __init__(self, model, threads: int | None = None, fuse: bool = True, dense_threads: int | None = None,
                 native_attention: bool = True):
        self.m = model
        hp = model.hp
        self.hp = hp
        self.threads = int(threads or torch.get_num_threads())
        E, H, Hkv, dk, dv, ff = hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v, hp.n_ff
        z = torch.zeros
        self.x = z(E)
        self.n = z(E)
        self.qk = z((H + Hkv) * dk)                  # q and k side by side: one in-place rope for both
        self.q, self.k, self.v = self.qk[: H * dk], self.qk[H * dk:], z(Hkv * dv)
        self._rope_inplace = hp.n_rot == dk
        if self._rope_inplace:
            xr = self.qk.view(H + Hkv, dk // 2, 2)
            self._x0, self._x1 = xr[..., 0], xr[..., 1]
            self._t0, self._t1 = z(H + Hkv, dk // 2), z(H + Hkv, dk // 2)
            self._t2 = z(H + Hkv, dk // 2)
        self.a = z(H * dv)
        self._k16, self._v16 = z(Hkv, dk, dtype=torch.float16), z(Hkv, dv, dtype=torch.float16)
        self._q16, self._q32 = z(1, H, dk, dtype=torch.float16), z(1, H, dk)
        self.o = z(E)
        self.g, self.u, self.h = z(ff), z(ff), z(ff)
        self.d = z(E)
        self.logits = z(hp.n_vocab)
        T = self.threads
        self.layers = []
        for L in model.layers:
            self.layers.append(dict(
                L=L, qkv=_Group((L.wq, L.wk, L.wv), self.n, (self.q, self.k, self.v), T, fuse),
                o=_Mat(L.wo, self.a, self.o, T), gateup=_Group((L.w_gate, L.w_up), self.n, (self.g, self.u), T, fuse),
                down=_Mat(L.w_down, self.h, self.d, T)))
        self.out = _Mat(model.output, self.n, self.logits, T, T if dense_threads is None else dense_threads,
                        native_dense=True)
        self._attn = None
        from .. import native
        if native_attention and self._rope_inplace and native.available():
            ffi, lib = _native_ffi()
            self._attn_keep = [ffi.from_buffer(t.numpy()) for t in (self.qk, self.v, self.a)]
            self._attn = (lib.qg_decode_attn, ffi, *(ffi.cast("float *", b) for b in self._attn_keep))
        self.scale = 1.0 / math.sqrt(dk)

    def _norm(self, w: torch.Tensor) -> None:
        # the same expression as model.rms_norm (bit-equal results: activation rounding downstream is discontinuous)
        x = self.x
        torch.mul(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.hp.norm_eps), w, out=self.n)

    def _torch_attention(self, il: int, pos: int, cos: torch.Tensor, sin: torch.Tensor, f16: bool) -> None:
        """rope of q and k, the cache store and the attention into ``self.a`` with torch ops."""
        m, hp, cache = self.m, self.hp, self.m.cache
        H, Hkv, dk, dv = hp.n_head, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v
        G, end = H // Hkv, pos + 1
        if self._rope_inplace:
            # rope_apply's arithmetic (x0*c - x1*s, x0*s + x1*c), in place on q and k together
            c, sn = cos[0], sin[0]
            x0, x1, t0, t1, t2 = self._x0, self._x1, self._t0, self._t1, self._t2
            torch.mul(x0, c, out=t0)
            torch.mul(x1, sn, out=t2)
            t0.sub_(t2)
            torch.mul(x0, sn, out=t1)
            torch.mul(x1, c, out=t2)
            t1.add_(t2)
            x0.copy_(t0)
            x1.copy_(t1)
            q, k = self.q.view(1, H, dk), self.k.view(1, Hkv, dk)
        else:
            q = m._rope(self.q.view(1, H, dk), cos, sin)
            k = m._rope(self.k.view(1, Hkv, dk), cos, sin)
        Kc, Vc = cache.k[il], cache.v[il]
        if f16:        # the model's fp16 KV cache numerics (fp16 values held as float32), no temporaries
            Kc[:, pos].copy_(self._k16.copy_(k[0]))
            Vc[:, pos].copy_(self._v16.copy_(self.v.view(Hkv, dv)))
            q = self._q32.copy_(self._q16.copy_(q))
        else:
            Kc[:, pos] = k[0]
            Vc[:, pos] = self.v.view(Hkv, dv)
        K, V = Kc[:, :end], Vc[:, :end]                              # (Hkv, end, d)
        s = torch.matmul(q.view(Hkv, G, dk), K.transpose(1, 2))      # (Hkv, G, end)
        s.mul_(self.scale)
        p = torch.softmax(s, dim=-1)
        if f16:
            p = p.to(torch.float16).to(torch.float32)
        torch.matmul(p, V, out=self.a.view(Hkv, G, dv))

    @torch.inference_mode()
    def step(self, token: int, pos: int) -> torch.Tensor:
        m, hp = self.m, self.hp
        cache = m.cache
        if pos != cache.n_past:
            raise ValueError(f"LeanDecoder.step at position {pos}, but {cache.n_past} positions are cached")
        end = pos + 1
        if end > cache.capacity:
            cache._grow(end)
        cos_t, sin_t = m._rope_tables(end)
        cos, sin = cos_t[pos:end], sin_t[pos:end]
        H, Hkv, dk, dv = hp.n_head, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v
        f16 = bool(getattr(m, "kv_f16", False))
        self.x.copy_(m.tok_embd.embed(torch.tensor([int(token)])).view(-1))
        attn = self._attn
        if attn is not None:
            fn, ffi, pqk, pv, pa = attn
            if not (cos_t.is_contiguous() and sin_t.is_contiguous() and cos_t.dtype == torch.float32
                    and sin_t.dtype == torch.float32 and cos_t.shape[1] == dk // 2):
                attn = None
            else:
                half = dk // 2
                pcos = ffi.cast("float *", cos_t.data_ptr()) + pos * half
                psin = ffi.cast("float *", sin_t.data_ptr()) + pos * half
        for il, P in enumerate(self.layers):
            L = P["L"]
            self._norm(L.attn_norm)
            P["qkv"].call()
            if L.bq is not None:
                self.q.add_(L.bq)
            if L.bk is not None:
                self.k.add_(L.bk)
            if L.bv is not None:
                self.v.add_(L.bv)
            if attn is not None and cache.k[il].is_contiguous() and cache.v[il].is_contiguous():
                # rope of q and k, the cache store and the attention: one native call
                if fn(pqk, pv, pcos, psin, ffi.cast("float *", cache.k[il].data_ptr()),
                      ffi.cast("float *", cache.v[il].data_ptr()), pa, H, Hkv, dk, dv, pos, cache.capacity,
                      self.scale, 1 if f16 else 0, self.threads) != 0:
                    from ..errors import QggufError
                    raise QggufError(f"decode attention: {ffi.string(_native_ffi()[1].qg_last_error()).decode()}")
            else:
                self._torch_attention(il, pos, cos, sin, f16)
            P["o"].call()
            if L.bo is not None:
                self.o.add_(L.bo)
            self.x.add_(self.o)
            self._norm(L.ffn_norm)
            P["gateup"].call()
            if L.b_gate is not None:
                self.g.add_(L.b_gate)
            if L.b_up is not None:
                self.u.add_(L.b_up)
            torch.nn.functional.silu(self.g, inplace=True)
            torch.mul(self.g, self.u, out=self.h)
            P["down"].call()
            if L.b_down is not None:
                self.d.add_(L.b_down)
            self.x.add_(self.d)
        cache.n_past = end
        self._norm(m.output_norm)
        self.out.call()
        return self.logits


def profile_decode(dec: LeanDecoder, tokens, reps: int = 1) -> dict:
    """Decode ``tokens`` from an empty cache ``reps`` times with a timer around every weight call of ``dec``;
    the fastest run's ms per token: ``total``, per group (``qkv``, ``o``, ``gateup``, ``down``, ``output``),
    ``weights`` (their sum) and ``other`` (norms, attention, Python). The timers add ~1 us per call."""
    acc: dict[str, float] = {}
    saved = []

    def wrap(name, obj):
        f = obj.call
        saved.append((obj, f))

        def call():
            t0 = time.perf_counter()
            f()
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
        obj.call = call
    for P in dec.layers:
        for k in ("qkv", "o", "gateup", "down"):
            wrap(k, P[k])
    wrap("output", dec.out)
    best = None
    try:
        for _ in range(max(1, reps)):
            dec.m.reset()
            acc.clear()
            t0 = time.perf_counter()
            for i, tok in enumerate(tokens):
                dec.step(tok, i)
            tot = time.perf_counter() - t0
            if best is None or tot < best[0]:
                best = (tot, dict(acc))
    finally:
        for obj, f in saved:
            obj.call = f
    n = max(1, len(tokens))
    tot, a = best
    out = {k: v / n * 1e3 for k, v in a.items()}
    out["weights"] = sum(a.values()) / n * 1e3
    out["total"] = tot / n * 1e3
    out["other"] = out["total"] - out["weights"]
    return out


def bench(path, n_prompt: int = 128, n_gen: int = 64, threads: int | None = None, reps: int = 3,
          torch_threads_decode: int = 1, seed: int = 0, profile: bool = False) -> dict:
    """Measure the model at ``path``; returns the dict printed by ``qgguf bench --json`` (``profile``: also
    ``decode_profile_ms``, :func:`profile_decode` after the timed runs)."""
    from .. import native
    from .linear import load_llama, set_native_threads

    path = Path(path)
    if not path.is_file():
        raise InputFileError("no such model file", path)
    if n_prompt < 0 or n_gen < 0 or (n_prompt == 0 and n_gen == 0):
        raise OptionError("-p and -n must be >= 0, and not both 0")
    if reps < 1:
        raise OptionError("-r must be at least 1")
    threads = int(threads or min(os.cpu_count() or 1, 4))
    if threads < 1:
        raise OptionError("--threads must be at least 1")
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    model = load_llama(path, threads=threads)
    load_s = time.perf_counter() - t0
    rss_model = rss_bytes() - rss0
    hp = model.hp
    if n_prompt + n_gen > hp.n_ctx_train:
        raise OptionError(f"-p {n_prompt} + -n {n_gen} is more than the model's context ({hp.n_ctx_train})")
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, hp.n_vocab, size=max(1, n_prompt)).tolist()
    gen_ids = rng.integers(0, hp.n_vocab, size=max(1, n_gen)).tolist()
    set_native_threads(threads)
    pp, tg = [], []
    prof = None
    try:
        with torch.inference_mode():
            model.cache._grow(n_prompt + n_gen + 1)
            if n_prompt:
                with torch_threads(threads):
                    model.reset()
                    model.forward(prompt[: min(8, n_prompt)], 0, logits_from=-1)   # warm-up
                    for _ in range(reps):
                        model.reset()
                        t1 = time.perf_counter()
                        model.forward(prompt, 0, logits_from=-1)
                        pp.append(time.perf_counter() - t1)
            if n_gen:
                with torch_threads(max(1, int(torch_threads_decode))):
                    dec = LeanDecoder(model, threads)
                    model.reset()
                    for i in range(min(4, n_gen)):                                 # warm-up
                        dec.step(gen_ids[i], i)
                    for _ in range(reps):
                        model.reset()
                        t1 = time.perf_counter()
                        for i, tok in enumerate(gen_ids):
                            dec.step(tok, i)
                        tg.append(time.perf_counter() - t1)
                    prof = profile_decode(dec, gen_ids, reps) if profile else None
    finally:
        set_native_threads(None)
    n_params = sum(_lin_params(lin) for lin in _linears(model))
    res = {
        "model": str(path), "model_bytes": path.stat().st_size, "model_params": n_params,
        "n_vocab": hp.n_vocab, "n_embd": hp.n_embd, "n_layer": hp.n_layer,
        "threads": threads, "torch_threads_decode": int(torch_threads_decode), "n_prompt": n_prompt,
        "n_gen": n_gen, "reps": reps,
        "pp_tps": (n_prompt / min(pp)) if pp else None, "tg_tps": (n_gen / min(tg)) if tg else None,
        "pp_tps_mean": (n_prompt / float(np.mean(pp))) if pp else None,
        "tg_tps_mean": (n_gen / float(np.mean(tg))) if tg else None,
        "pp_s": pp, "tg_s": tg, "load_s": load_s, "rss_model_bytes": int(rss_model), "rss_bytes": rss_bytes(),
        "native_isa": native.isa() if native.available() else None,
        "kinds": _kinds(model), "load_avg": _loadavg(),
    }
    if prof is not None:
        res["decode_profile_ms"] = prof
    return res


def _linears(model):
    seen = set()
    for L in model.layers:
        for lin in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down):
            yield lin
    for lin in (model.tok_embd, model.output):
        if id(lin) not in seen:
            seen.add(id(lin))
            yield lin


def _lin_params(lin) -> int:
    return int(lin.in_features) * int(lin.out_features)


def _kinds(model) -> dict:
    out = {}
    for lin in _linears(model):
        k = getattr(getattr(lin, "qt", None), "name", None) or getattr(lin, "source_type", lin.kind)
        out[k] = out.get(k, 0) + 1
    return out


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def format_result(r: dict) -> str:
    mb = r["model_bytes"] / 2**20
    lines = [f"model: {r['model']} ({mb:.1f} MiB, {r['model_params'] / 1e6:.1f} M params in the linears; "
             f"{', '.join(f'{k} x{v}' for k, v in r['kinds'].items())})",
             f"threads {r['threads']}, native {r['native_isa']}, load {r['load_s']:.2f} s, "
             f"RSS of the loaded model {r['rss_model_bytes'] / 2**20:.0f} MiB, machine load {r['load_avg']}",
             f"{'test':<8} {'t/s (best)':>12} {'t/s (mean)':>12}"]
    if r["pp_tps"] is not None:
        lines.append(f"{'pp' + str(r['n_prompt']):<8} {r['pp_tps']:>12.2f} {r['pp_tps_mean']:>12.2f}")
    if r["tg_tps"] is not None:
        lines.append(f"{'tg' + str(r['n_gen']):<8} {r['tg_tps']:>12.2f} {r['tg_tps_mean']:>12.2f}")
    if r.get("decode_profile_ms"):
        p = r["decode_profile_ms"]
        lines.append(f"decode ms/token: {p['total']:.2f} = weights {p['weights']:.2f} ("
                     + ", ".join(f"{k} {p[k]:.2f}" for k in ("qkv", "o", "gateup", "down", "output") if k in p)
                     + f") + other {p['other']:.2f}")
    return "\n".join(lines)


__all__ = ["bench", "format_result", "LeanDecoder", "profile_decode", "rss_bytes"]
