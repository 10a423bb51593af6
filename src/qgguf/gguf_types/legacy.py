"""The 32-weight block types of ggml: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and IQ4_NL.

Every block holds 32 consecutive weights of a row. ``quantize`` reproduces llama.cpp's bytes exactly:
without ``importance`` its reference rounding (``quantize_row_X_ref``; for IQ4_NL what ``quantize_iq4_nl``
does with no weights), with ``importance`` its importance-weighted search (``quantize_row_X_impl``; Q8_0
ignores importance, as in llama.cpp). All arithmetic is done in float32, in ggml's order.

Fields (see :func:`pack` / :func:`unpack`), named after ggml's block struct members, with one code per weight:
shapes are ``d``/``m``: (rows, nblocks) float16, ``q``: (rows, nblocks, 32).

========  ==============================  =========================  =====
type      fields                          value of weight j          bytes
========  ==============================  =========================  =====
Q8_0      d, q int8 (-128..127)           d * q                      34
Q4_0      d, q uint8 (0..15)              d * (q - 8)                18
Q4_1      d, m, q uint8 (0..15)           d * q + m                  20
Q5_0      d, q uint8 (0..31)              d * (q - 16)               22
Q5_1      d, m, q uint8 (0..31)           d * q + m                  24
IQ4_NL    d, q uint8 (0..15)              d * KVALUES_IQ4NL[q]       18
========  ==============================  =========================  =====

:data:`VALUES` maps each type name to its ``fields -> float32 (rows, nblocks, 32)`` function (the grid values
calibrated methods need); :func:`quantize_fields` gives the codes and scales llama.cpp would choose.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numba
import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import QggufError
from .base import Fields, QuantType
from .search import make_qkx3_quants, make_qx_quants

QK = 32
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                         dtype=np.int8)
_KV_F32 = KVALUES_IQ4NL.astype(np.float32)

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_GROUP_MAX_EPS = np.float32(1e-15)

_jit = numba.njit(cache=True, nogil=True, error_model="numpy")
_jit_inline = numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")


# ------------------------------------------------------------------------------------------------
# scalar helpers (float32 arithmetic throughout; every int is converted with np.float32 explicitly,
# because numba would otherwise promote int * float32 to float64)
# ------------------------------------------------------------------------------------------------
@_jit_inline
def _to_int8(v):
    """C's (int8_t) of a float32 as gcc does it on x86-64: cvttss2si (truncate; NaN or out of int32 range
    gives INT_MIN) and keep the low byte."""
    if not (v > -2147483648.0 and v < 2147483648.0):
        return 0
    t = np.int64(v)
    return ((t + 128) & 255) - 128


@_jit_inline
def _roundf(v):
    # C roundf: halves away from zero (exact: v - trunc(v) has no rounding error)
    t = np.float32(np.trunc(v))
    r = v - t
    if r >= np.float32(0.5):
        t = t + _F1
    elif r <= np.float32(-0.5):
        t = t - _F1
    return t


# _IQ4NL_UPPER[k + 127] = the index of the first table value greater than k, for integer k in
# -127..112: since the table holds integers, for x in (-127, 113) it is the first value above x
_IQ4NL_UPPER = np.searchsorted(KVALUES_IQ4NL.astype(np.int64), np.arange(-127, 113), side="right").astype(np.int64)


@_jit_inline
def _best_index_iq4nl(x, kv):
    """ggml's best_index_int8 for the IQ4_NL table (the version in llama-cpp-python 0.3.36: bisection, then
    ``x - val[mu-1] < val[mu] - x ? mu-1 : mu`` in float32); the bisection is replaced by a table lookup
    that finds the same ``mu``."""
    # Branch-free: x <= -127 gives mu = 1 and index 0, x >= 113 gives mu = 15 and index 15, as the C does.
    if not (x == x):  # NaN: the bisection ends at mu = 15, and the comparison is false
        return 15
    xc = x
    if xc < np.float32(-127.0):
        xc = np.float32(-127.0)
    if xc > np.float32(112.0):
        xc = np.float32(112.0)
    mu = _IQ4NL_UPPER[np.int64(np.floor(xc)) + 127]
    return mu - np.int64(x - kv[mu - 1] < kv[mu] - x)


@_jit_inline
def _row_sigma2(x, r, n):
    s = _F0
    for j in range(n):
        s += x[r, j] * x[r, j]
    return s / np.float32(n)


# ------------------------------------------------------------------------------------------------
# reference (no importance) kernels: x (rows, n) float32 -> d (rows, nb) float32 [, m], q (rows, nb, 32)
# ------------------------------------------------------------------------------------------------
@_jit
def _q8_0_ref(x, d, q):
    rows, nb = d.shape
    for r in range(rows):
        for b in range(nb):
            o = b * QK
            amax = _F0
            for j in range(QK):
                a = abs(x[r, o + j])
                amax = amax if amax > a else a  # C's MAX(amax, fabsf(v))
            dd = amax / np.float32(127.0)
            idd = _F1 / dd if dd != _F0 else _F0
            d[r, b] = dd
            for j in range(QK):
                q[r, b, j] = _to_int8(_roundf(x[r, o + j] * idd))


@_jit
def _q4_0_ref(x, d, q, nmax):
    # Q4_0 (nmax 8, codes 0..15) and Q5_0 (nmax 16, codes 0..31)
    rows, nb = d.shape
    top = 2 * nmax - 1
    half = np.float32(nmax) + np.float32(0.5)
    for r in range(rows):
        for b in range(nb):
            o = b * QK
            amax = _F0
            mx = _F0
            for j in range(QK):
                v = x[r, o + j]
                if amax < abs(v):
                    amax = abs(v)
                    mx = v
            dd = mx / np.float32(-nmax)
            idd = _F1 / dd if dd != _F0 else _F0
            d[r, b] = dd
            for j in range(QK):
                xi = _to_int8(x[r, o + j] * idd + half)
                q[r, b, j] = min(top, xi) & 0xFF


@_jit
def _q4_1_ref(x, d, m, q, nmax):
    # Q4_1 (nmax 15) and Q5_1 (nmax 31)
    rows, nb = d.shape
    for r in range(rows):
        for b in range(nb):
            o = b * QK
            mn = np.float32(3.4028234663852886e38)
            mx = np.float32(-3.4028234663852886e38)
            for j in range(QK):
                v = x[r, o + j]
                if v < mn:
                    mn = v
                if v > mx:
                    mx = v
            dd = (mx - mn) / np.float32(nmax)
            idd = _F1 / dd if dd != _F0 else _F0
            d[r, b] = dd
            m[r, b] = mn
            for j in range(QK):
                v = (x[r, o + j] - mn) * idd + np.float32(0.5)
                if nmax == 15:
                    xi = min(15, _to_int8(v)) & 0xFF
                else:
                    # (uint8_t)(x0 + 0.5f), no clamp: only the low 5 bits reach the block
                    xi = _to_int8(v) & 0x1F
                q[r, b, j] = xi


@_jit_inline
def _iq4nl_sums(xb, w, idd, kv):
    sumqx = _F0
    sumq2 = _F0
    for j in range(QK):
        xv = xb[j]
        qv = kv[_best_index_iq4nl(idd * xv, kv)]
        wq = w[j] * qv
        sumqx += wq * xv
        sumq2 += wq * qv
    return sumqx, sumq2


@_jit
def _iq4_nl(x, imp, use_imp, d, q):
    # quantize_iq4_nl (ntry = 7): weights x^2 without importance, imp * sqrt(sigma2 + x^2) with it
    rows, nb = d.shape
    kv = np.empty(16, dtype=np.float32)
    for i in range(16):
        kv[i] = np.float32(KVALUES_IQ4NL[i])
    w = np.empty(QK, dtype=np.float32)
    xb = np.empty(QK, dtype=np.float32)
    ntry = 7
    for r in range(rows):
        for b in range(nb):
            o = b * QK
            sigma2 = _F0
            for j in range(QK):
                xv = x[r, o + j]
                xb[j] = xv
                sigma2 += xv * xv
            sigma2 *= np.float32(2.0 / QK)
            for j in range(QK):
                xv = xb[j]
                if use_imp:
                    w[j] = imp[o + j] * np.sqrt(sigma2 + xv * xv)
                else:
                    w[j] = xv * xv
            amax = _F0
            mx = _F0
            for j in range(QK):
                ax = abs(xb[j])
                if ax > amax:
                    amax = ax
                    mx = xb[j]
            scale = _F0
            if not (amax < _GROUP_MAX_EPS):
                dd = -mx / kv[0]
                sumqx, sumq2 = _iq4nl_sums(xb, w, _F1 / dd, kv)
                dd = sumqx / sumq2 if sumq2 > _F0 else _F0
                best = dd * sumqx
                for itry in range(-ntry, ntry + 1):
                    idd = np.float32(itry + KVALUES_IQ4NL[0]) / mx
                    sumqx, sumq2 = _iq4nl_sums(xb, w, idd, kv)
                    if sumq2 > _F0 and sumqx * sumqx > best * sumq2:
                        dd = sumqx / sumq2
                        best = dd * sumqx
                scale = dd
            d[r, b] = scale
            idd = _F1 / scale if scale != _F0 else _F0
            for j in range(QK):
                q[r, b, j] = _best_index_iq4nl(idd * xb[j], kv)


# ------------------------------------------------------------------------------------------------
# importance-weighted kernels (quantize_row_X_impl)
# ------------------------------------------------------------------------------------------------
@_jit
def _q4_0_imp(x, imp, d, q, nmax):
    rows, nb = d.shape
    n = x.shape[1]
    w = np.empty(QK, dtype=np.float32)
    xb = np.empty(QK, dtype=np.float32)
    L = np.empty(QK, dtype=np.int8)
    for r in range(rows):
        sigma2 = _row_sigma2(x, r, n)
        for b in range(nb):
            o = b * QK
            for j in range(QK):
                xv = x[r, o + j]
                xb[j] = xv
                w[j] = imp[o + j] * np.sqrt(sigma2 + xv * xv)
            d[r, b] = make_qx_quants(QK, nmax, xb, L, 1, w)
            for j in range(QK):
                q[r, b, j] = L[j]


@_jit
def _q4_1_imp(x, imp, d, m, q, nmax):
    rows, nb = d.shape
    n = x.shape[1]
    w = np.empty(QK, dtype=np.float32)
    xb = np.empty(QK, dtype=np.float32)
    L = np.empty(QK, dtype=np.uint8)
    Laux = np.empty(QK, dtype=np.uint8)
    for r in range(rows):
        sigma2 = _row_sigma2(x, r, n)
        for b in range(nb):
            o = b * QK
            for j in range(QK):
                xv = x[r, o + j]
                xb[j] = xv
                w[j] = imp[o + j] * np.sqrt(sigma2 + xv * xv)
            scale, the_min = make_qkx3_quants(QK, nmax, xb, w, L, Laux,
                                              np.float32(-0.9), np.float32(0.05), 36, False)
            d[r, b] = scale
            m[r, b] = -the_min
            for j in range(QK):
                q[r, b, j] = L[j]


# ------------------------------------------------------------------------------------------------
# pack / unpack / values
# ------------------------------------------------------------------------------------------------
_LAYOUT = {  # name: (has m, code dtype, code lo, code hi, has qh, type_size)
    "Q8_0": (False, np.int8, -128, 127, False, 34),
    "Q4_0": (False, np.uint8, 0, 15, False, 18),
    "Q4_1": (True, np.uint8, 0, 15, False, 20),
    "Q5_0": (False, np.uint8, 0, 31, True, 22),
    "Q5_1": (True, np.uint8, 0, 31, True, 24),
    "IQ4_NL": (False, np.uint8, 0, 15, False, 18),
}


def _f16_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float16).view(np.uint8).reshape(*a.shape, 2)


def _check_fields(name: str, fields: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    has_m, cdt, lo, hi, _, _ = _LAYOUT[name]
    need = ("d", "m", "q") if has_m else ("d", "q")
    missing = [k for k in need if k not in fields]
    if missing:
        raise QggufError(f"{name} fields need {', '.join(need)}; missing {', '.join(missing)}")
    q = np.asarray(fields["q"])
    if q.ndim != 3 or q.shape[-1] != QK:
        raise QggufError(f"{name} codes 'q' must have shape (rows, nblocks, {QK}), got {q.shape}")
    if q.size and (q.dtype.kind not in "iu" or q.min() < lo or q.max() > hi):
        raise QggufError(f"{name} codes 'q' must be integers in {lo}..{hi}")
    q = q.astype(cdt, copy=False)
    d = np.asarray(fields["d"])
    if d.shape != q.shape[:2]:
        raise QggufError(f"{name} scales 'd' must have shape {q.shape[:2]}, got {d.shape}")
    m = None
    if has_m:
        m = np.asarray(fields["m"])
        if m.shape != q.shape[:2]:
            raise QggufError(f"{name} mins 'm' must have shape {q.shape[:2]}, got {m.shape}")
    return d, m, q


def _pack(name: str, fields: Mapping[str, np.ndarray]) -> np.ndarray:
    d, m, q = _check_fields(name, fields)
    has_m, _, _, _, has_qh, ts = _LAYOUT[name]
    rows, nb = q.shape[:2]
    out = np.empty((rows, nb, ts), dtype=np.uint8)
    out[..., 0:2] = _f16_bytes(d)
    o = 2
    if has_m:
        out[..., 2:4] = _f16_bytes(m)
        o = 4
    if name == "Q8_0":
        out[..., o:] = q.view(np.uint8)
        return out.reshape(rows, nb * ts)
    if has_qh:
        out[..., o:o + 4] = np.packbits((q >> 4) & 1, axis=-1, bitorder="little")
        o += 4
    out[..., o:] = (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)
    return out.reshape(rows, nb * ts)


def _unpack(name: str, data: np.ndarray) -> Fields:
    has_m, _, _, _, has_qh, ts = _LAYOUT[name]
    rows = data.shape[0]
    if data.shape[1] % ts:
        raise QggufError(f"{name} data of {data.shape[1]} bytes per row is not whole blocks of {ts}")
    blk = data.reshape(rows, -1, ts)
    f: Fields = {"d": np.ascontiguousarray(blk[..., 0:2]).view(np.float16)[..., 0]}
    o = 2
    if has_m:
        f["m"] = np.ascontiguousarray(blk[..., 2:4]).view(np.float16)[..., 0]
        o = 4
    if name == "Q8_0":
        f["q"] = np.ascontiguousarray(blk[..., o:]).view(np.int8)
        return f
    qh = None
    if has_qh:
        qh = np.unpackbits(blk[..., o:o + 4], axis=-1, bitorder="little")
        o += 4
    qs = blk[..., o:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    if qh is not None:
        q |= qh << 4
    f["q"] = q
    return f


def _values_q8_0(f: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.asarray(f["q"]).astype(np.float32) * np.asarray(f["d"], dtype=np.float32)[..., None]


def _values_offset(offset: int) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    def values(f: Mapping[str, np.ndarray]) -> np.ndarray:
        q = np.asarray(f["q"]).astype(np.float32) - np.float32(offset)
        return q * np.asarray(f["d"], dtype=np.float32)[..., None]
    return values


def _values_min(f: Mapping[str, np.ndarray]) -> np.ndarray:
    q = np.asarray(f["q"]).astype(np.float32)
    return q * np.asarray(f["d"], dtype=np.float32)[..., None] + np.asarray(f["m"], dtype=np.float32)[..., None]


def _values_iq4_nl(f: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.asarray(f["d"], dtype=np.float32)[..., None] * _KV_F32[np.asarray(f["q"])]


VALUES: dict[str, Callable[[Mapping[str, np.ndarray]], np.ndarray]] = {
    "Q8_0": _values_q8_0,
    "Q4_0": _values_offset(8),
    "Q4_1": _values_min,
    "Q5_0": _values_offset(16),
    "Q5_1": _values_min,
    "IQ4_NL": _values_iq4_nl,
}


# ------------------------------------------------------------------------------------------------
# quantize
# ------------------------------------------------------------------------------------------------
def _choose(name: str, x: np.ndarray, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """x: (rows, n) float32 C-contiguous -> float32 d, float32 m (or None), codes (rows, nb, 32)."""
    rows, n = x.shape
    nb = n // QK
    d = np.empty((rows, nb), dtype=np.float32)
    has_m, cdt = _LAYOUT[name][:2]
    m = np.empty((rows, nb), dtype=np.float32) if has_m else None
    q = np.empty((rows, nb, QK), dtype=cdt)
    if rows == 0 or nb == 0:
        return d, m, q
    if name == "Q8_0":
        _q8_0_ref(x, d, q)
    elif name == "IQ4_NL":
        imp = importance if importance is not None else np.zeros(1, dtype=np.float32)
        _iq4_nl(x, imp, importance is not None, d, q)
    elif name in ("Q4_0", "Q5_0"):
        nmax = 8 if name == "Q4_0" else 16
        if importance is None:
            _q4_0_ref(x, d, q, nmax)
        else:
            _q4_0_imp(x, importance, d, q, nmax)
    else:
        nmax = 15 if name == "Q4_1" else 31
        if importance is None:
            _q4_1_ref(x, d, m, q, nmax)
        else:
            _q4_1_imp(x, importance, d, m, q, nmax)
    return d, m, q


def quantize_fields(name: str, x: np.ndarray, importance: np.ndarray | None = None) -> Fields:
    """The codes and scales llama.cpp chooses for float rows ``x`` (rows, n), as :func:`pack` takes them."""
    name = name.upper()
    qt = _TYPES_BY_NAME[name]
    x = np.ascontiguousarray(x, dtype=np.float32)
    qt.check_row_length(x.shape[-1])
    x = x.reshape(-1, x.shape[-1])
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if importance.shape[0] != x.shape[1]:
            raise QggufError(f"importance has {importance.shape[0]} values for rows of {x.shape[1]}")
    d, m, q = _choose(name, x, importance)
    f: Fields = {"d": d.astype(np.float16)}
    if m is not None:
        f["m"] = m.astype(np.float16)
    f["q"] = q
    return f


def _make(name: str, gt: T, description: str) -> QuantType:
    ts = _LAYOUT[name][5]

    def quantize(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        if name == "Q8_0":
            importance = None  # llama.cpp's quantize_q8_0 ignores it
        d, m, q = _choose(name, x, importance)
        f = {"d": d, "q": q} if m is None else {"d": d, "m": m, "q": q}
        return _pack(name, f)

    values = VALUES[name]

    def dequantize(data: np.ndarray) -> np.ndarray:
        rows = data.shape[0]
        return values(_unpack(name, data)).reshape(rows, -1)

    return QuantType(
        name=name, ggml_type=int(gt), block_size=QK, type_size=ts,
        _quantize=quantize, _dequantize=dequantize,
        _pack=lambda f: _pack(name, f), _unpack=lambda data: _unpack(name, data), _values=values,
        description=description,
    )


Q8_0 = _make("Q8_0", T.Q8_0, "8-bit, blocks of 32 with an f16 scale: d * q, q in -128..127 (8.5 bpw)")
Q4_0 = _make("Q4_0", T.Q4_0, "4-bit, blocks of 32 with an f16 scale: d * (q - 8), q in 0..15 (4.5 bpw)")
Q4_1 = _make("Q4_1", T.Q4_1, "4-bit, blocks of 32 with f16 scale and min: d * q + m, q in 0..15 (5.0 bpw)")
Q5_0 = _make("Q5_0", T.Q5_0, "5-bit, blocks of 32 with an f16 scale: d * (q - 16), q in 0..31 (5.5 bpw)")
Q5_1 = _make("Q5_1", T.Q5_1, "5-bit, blocks of 32 with f16 scale and min: d * q + m, q in 0..31 (6.0 bpw)")
IQ4_NL = _make("IQ4_NL", T.IQ4_NL,
               "4-bit non-linear, blocks of 32 with an f16 scale: d * KVALUES_IQ4NL[q], q in 0..15 (4.5 bpw)")

TYPES = [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL]
_TYPES_BY_NAME = {qt.name: qt for qt in TYPES}


def pack(name: str, fields: Mapping[str, np.ndarray]) -> np.ndarray:
    """Fields of type ``name`` -> uint8 (rows, row_bytes). ``d``/``m`` are rounded to float16 (RNE)."""
    return _pack(name.upper(), fields)


def unpack(name: str, data: np.ndarray) -> Fields:
    """uint8 (rows, row_bytes) of type ``name`` -> fields (``d``/``m`` float16, ``q`` codes)."""
    data = np.ascontiguousarray(data).view(np.uint8)
    return _unpack(name.upper(), data.reshape(data.shape[0], -1))
