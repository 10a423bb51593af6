"""The k-quants Q2_K, Q3_K, Q4_K, Q5_K and Q6_K: super-blocks of ``QK_K = 256`` weights.

``quantize(x)`` gives the same bytes as llama.cpp's ``quantize_row_X_K_ref``; ``quantize(x, importance)``
the same bytes as ``quantize_X_K(..., quant_weights=importance)`` (the ``quantize_row_X_K_impl``
functions). The searches are numba ports (see :mod:`.search`) run per super-block, rows split over
threads.

Fields (``unpack``/``pack``): arrays of shape ``(rows, nb, ...)`` with ``nb = n // 256`` super-blocks per
row, named after ggml's block structs, one code per weight (``q``, shape ``(rows, nb, 256)``, in weight
order). Per-weight values (float32, computed in ggml's order of operations) are given by
:func:`values` / ``VALUES[name]``; ``dequantize = values(unpack(data))``.

* **Q2_K** (84 bytes, 2.625 bpw): ``d``, ``dmin``: float16 (rows, nb); ``scales``, ``mins``: uint8
  (rows, nb, 16) in 0..15 (one per 16 weights); ``q``: uint8 0..3.
  ``value[k] = (d*scales[k//16])*q[k] - dmin*mins[k//16]``.
* **Q3_K** (110 bytes, 3.4375 bpw): ``d``: float16; ``scales``: uint8 (rows, nb, 16) in 0..63, the
  6-bit field as stored (signed scale ``scales-32``); ``q``: uint8 0..7 (signed code ``q-4``).
  ``value[k] = (d*(scales[k//16]-32))*(q[k]-4)``.
* **Q4_K** (144 bytes, 4.5 bpw): ``d``, ``dmin``: float16; ``scales``, ``mins``: uint8 (rows, nb, 8) in
  0..63 (one per 32 weights); ``q``: uint8 0..15. ``value[k] = (d*scales[k//32])*q[k] - dmin*mins[k//32]``.
* **Q5_K** (176 bytes, 5.5 bpw): as Q4_K with ``q`` in 0..31.
* **Q6_K** (210 bytes, 6.5625 bpw): ``d``: float16; ``scales``: int8 (rows, nb, 16) (one per 16 weights);
  ``q``: uint8 0..63 (signed code ``q-32``). ``value[k] = (d*scales[k//16])*(q[k]-32)``.

``pack`` checks shapes and ranges and raises :class:`~qgguf.errors.QggufError`. (The only bytes that do
not round-trip through fields are ones llama.cpp itself never writes for finite inputs: sub-block scale
codes that wrapped around in C's uint8 conversions.)
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numba
import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import BadWeightsError, QggufError
from .base import Fields, QuantType
from .search import (EMPTY_F32, GROUP_MAX_EPS, fp16_bits_to_fp32, fp32_to_fp16_bits, make_q3_quants,
                     make_qkx2_quants, make_qkx3_quants, make_qp_quants, make_qx_quants, nearest_int)

QK_K = 256

_jit = numba.njit(cache=True, nogil=True, error_model="numpy")
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)


# ==============================================================================================
# numba kernels: float rows -> block bytes, exactly as ggml-quants.c
# ==============================================================================================
@_jit
def _put_f16(out, off, v):
    h = fp32_to_fp16_bits(v)
    out[off] = h & 0xFF
    out[off + 1] = (h >> 8) & 0xFF
    return fp16_bits_to_fp32(h)


@_jit
def _get_f16(buf, off):
    return fp16_bits_to_fp32(np.int64(buf[off]) | (np.int64(buf[off + 1]) << 8))


@_jit
def _pack_2bit(L, out, off):
    # qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6, j in {0, 128}
    for j in range(0, QK_K, 128):
        for l in range(32):
            out[off + j // 4 + l] = ((L[j + l] & 3) | ((L[j + l + 32] & 3) << 2)
                                     | ((L[j + l + 64] & 3) << 4) | ((L[j + l + 96] & 3) << 6))


@_jit
def _scale_min_k4(j, sb):
    if j < 4:
        return sb[j] & 63, sb[j + 4] & 63
    return ((sb[j + 4] & 0xF) | ((sb[j - 4] >> 6) << 4)), ((sb[j + 4] >> 4) | ((sb[j] >> 6) << 4))


@_jit
def _q2_k_rows(x, qw, out):
    rows, n = x.shape
    nb = n // QK_K
    use_qw = qw.shape[0] > 0
    L = np.zeros(QK_K, np.uint8)
    Laux = np.zeros(16, np.uint8)
    weights = np.zeros(16, np.float32)
    scales = np.zeros(16, np.float32)
    mins = np.zeros(16, np.float32)
    sw = np.zeros(16, np.float32)
    Ls = np.zeros(16, np.uint8)
    Lm = np.zeros(16, np.uint8)
    sb = np.zeros(16, np.int64)
    q4scale = np.float32(15.0)
    for r in range(rows):
        for i in range(nb):
            xb = x[r, i * QK_K:(i + 1) * QK_K]
            o = i * 84
            if not use_qw:                                   # quantize_row_q2_K_ref
                max_scale = _F0
                max_min = _F0
                for j in range(16):
                    for l in range(16):
                        weights[l] = np.float32(abs(xb[16 * j + l]))
                    sc, mn = make_qkx2_quants(16, 3, xb[16 * j:16 * j + 16], weights, L[16 * j:16 * j + 16],
                                              Laux, np.float32(-0.5), np.float32(0.1), 15, True)
                    scales[j] = sc
                    mins[j] = mn
                    if sc > max_scale:
                        max_scale = sc
                    if mn > max_min:
                        max_min = mn
                if max_scale > _F0:
                    iscale = q4scale / max_scale
                    for j in range(16):
                        sb[j] = nearest_int(iscale * scales[j]) & 0xFF
                    dm = _put_f16(out[r], o + 80, max_scale / q4scale)
                else:
                    for j in range(16):
                        sb[j] = 0
                    dm = _put_f16(out[r], o + 80, _F0)
                if max_min > _F0:
                    iscale = q4scale / max_min
                    for j in range(16):
                        sb[j] = (sb[j] | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
                    mm = _put_f16(out[r], o + 82, max_min / q4scale)
                else:
                    mm = _put_f16(out[r], o + 82, _F0)
            else:                                            # quantize_row_q2_K_impl
                sumx2 = _F0
                for j in range(QK_K):
                    sumx2 += xb[j] * xb[j]
                sigma2 = sumx2 / np.float32(QK_K)
                for j in range(16):
                    s = _F0
                    for l in range(16):
                        xv = xb[16 * j + l]
                        weights[l] = qw[QK_K * i + 16 * j + l] * np.float32(np.sqrt(sigma2 + xv * xv))
                    for l in range(16):
                        s += weights[l]
                    sw[j] = s
                    sc, mn = make_qkx3_quants(16, 3, xb[16 * j:16 * j + 16], weights, L[16 * j:16 * j + 16],
                                              Laux, np.float32(-0.9), np.float32(0.05), 36, False)
                    scales[j] = sc
                    mins[j] = mn
                dm = make_qp_quants(16, 15, scales, Ls, sw)
                mm = make_qp_quants(16, 15, mins, Lm, sw)
                dm = _put_f16(out[r], o + 80, dm)
                mm = _put_f16(out[r], o + 82, mm)
                for j in range(16):
                    sb[j] = (np.int64(Ls[j]) | (np.int64(Lm[j]) << 4)) & 0xFF
            for j in range(16):
                out[r, o + j] = sb[j]
            for j in range(16):
                d = dm * np.float32(sb[j] & 0xF)
                if d == _F0:
                    continue
                m = mm * np.float32(sb[j] >> 4)
                for ii in range(16):
                    l = nearest_int((xb[16 * j + ii] + m) / d)
                    L[16 * j + ii] = max(0, min(3, l))
            _pack_2bit(L, out[r], o + 16)


@_jit
def _q3_k_rows(x, qw, out):
    rows, n = x.shape
    nb = n // QK_K
    use_qw = qw.shape[0] > 0
    L = np.zeros(QK_K, np.int8)
    scales = np.zeros(16, np.float32)
    weight = np.zeros(16, np.float32)
    sw = np.zeros(16, np.float32)
    Ls = np.zeros(16, np.int8)
    sb = np.zeros(12, np.int64)
    for r in range(rows):
        for i in range(nb):
            xb = x[r, i * QK_K:(i + 1) * QK_K]
            o = i * 110
            for j in range(12):
                sb[j] = 0
            if not use_qw:                                   # quantize_row_q3_K_ref
                max_scale = _F0
                amax = _F0
                for j in range(16):
                    sc = make_q3_quants(16, 4, xb[16 * j:16 * j + 16], L[16 * j:16 * j + 16], True)
                    scales[j] = sc
                    a = np.float32(abs(sc))
                    if a > amax:
                        amax = a
                        max_scale = sc
                if max_scale != _F0:
                    iscale = np.float32(-32.0) / max_scale
                    for j in range(16):
                        l = ((nearest_int(iscale * scales[j]) + 128) & 0xFF) - 128   # int8_t l
                        l = max(-32, min(31, l)) + 32
                        if j < 8:
                            sb[j] = l & 0xF
                        else:
                            sb[j - 8] |= (l & 0xF) << 4
                        l >>= 4
                        sb[j % 4 + 8] |= l << (2 * (j // 4))
                    dall = _put_f16(out[r], o + 108, _F1 / iscale)
                else:
                    dall = _put_f16(out[r], o + 108, _F0)
            else:                                            # quantize_row_q3_K_impl
                sumx2 = _F0
                for j in range(QK_K):
                    sumx2 += xb[j] * xb[j]
                sigma2 = np.float32(2.0) * sumx2 / np.float32(QK_K)
                for j in range(16):
                    for l in range(16):
                        xv = xb[16 * j + l]
                        weight[l] = qw[QK_K * i + 16 * j + l] * np.float32(np.sqrt(sigma2 + xv * xv))
                    s = _F0
                    for l in range(16):
                        s += weight[l]
                    sw[j] = s
                    scales[j] = make_qx_quants(16, 4, xb[16 * j:16 * j + 16], L[16 * j:16 * j + 16], 1, weight)
                d_block = make_qx_quants(16, 32, scales, Ls, 1, sw)
                for j in range(16):
                    l = np.int64(Ls[j])
                    if j < 8:
                        sb[j] = l & 0xF
                    else:
                        sb[j - 8] |= (l & 0xF) << 4
                    l >>= 4
                    sb[j % 4 + 8] |= l << (2 * (j // 4))
                dall = _put_f16(out[r], o + 108, d_block)
            for j in range(12):
                sb[j] &= 0xFF
                out[r, o + 96 + j] = sb[j]
            for j in range(16):
                lo = (sb[j] & 0xF) if j < 8 else (sb[j - 8] >> 4)
                sc = (lo | (((sb[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
                d = dall * np.float32(sc)
                if d == _F0:
                    continue
                for ii in range(16):
                    l = nearest_int(xb[16 * j + ii] / d)
                    L[16 * j + ii] = max(-4, min(3, l)) + 4
            for j in range(32):
                out[r, o + j] = 0
            for j in range(QK_K):
                lj = np.int64(L[j])
                if lj > 3:
                    out[r, o + j % 32] |= 1 << (j // 32)
                    L[j] = lj - 4
            _pack_2bit(L, out[r], o + 32)


@_jit
def _q45_k_rows(x, qw, out, nmax, bs):
    # Q4_K (nmax 15, 144-byte blocks) and Q5_K (nmax 31, 176-byte blocks).
    rows, n = x.shape
    nb = n // QK_K
    use_qw = qw.shape[0] > 0
    L = np.zeros(QK_K, np.uint8)
    Laux = np.zeros(32, np.uint8)
    weights = np.zeros(32, np.float32)
    scales = np.zeros(8, np.float32)
    mins = np.zeros(8, np.float32)
    sw = np.zeros(8, np.float32)
    Ls = np.zeros(8, np.uint8)
    Lm = np.zeros(8, np.uint8)
    sb = np.zeros(12, np.int64)
    f63 = np.float32(63.0)
    for r in range(rows):
        for i in range(nb):
            xb = x[r, i * QK_K:(i + 1) * QK_K]
            o = i * bs
            for j in range(12):
                sb[j] = 0
            if not use_qw:                                   # quantize_row_q{4,5}_K_ref
                max_scale = _F0
                max_min = _F0
                for j in range(8):
                    sum_x2 = _F0
                    for l in range(32):
                        sum_x2 += xb[32 * j + l] * xb[32 * j + l]
                    av_x = np.float32(np.sqrt(sum_x2 / np.float32(32.0)))
                    for l in range(32):
                        weights[l] = av_x + np.float32(abs(xb[32 * j + l]))
                    if nmax == 15:
                        sc, mn = make_qkx2_quants(32, 15, xb[32 * j:32 * j + 32], weights, L[32 * j:32 * j + 32],
                                                  Laux, np.float32(-1.0), np.float32(0.1), 20, False)
                    else:
                        sc, mn = make_qkx2_quants(32, 31, xb[32 * j:32 * j + 32], weights, L[32 * j:32 * j + 32],
                                                  Laux, np.float32(-0.5), np.float32(0.1), 15, False)
                    scales[j] = sc
                    mins[j] = mn
                    if sc > max_scale:
                        max_scale = sc
                    if mn > max_min:
                        max_min = mn
                inv_scale = f63 / max_scale if max_scale > _F0 else _F0
                inv_min = f63 / max_min if max_min > _F0 else _F0
                for j in range(8):
                    Ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
                    Lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
                d_block = max_scale / f63
                m_block = max_min / f63
            else:                                            # quantize_row_q{4,5}_K_impl
                sum_x2 = _F0
                for l in range(QK_K):
                    sum_x2 += xb[l] * xb[l]
                sigma2 = np.float32(2.0) * sum_x2 / np.float32(QK_K)
                for j in range(8):
                    for l in range(32):
                        xv = xb[32 * j + l]
                        weights[l] = qw[QK_K * i + 32 * j + l] * np.float32(np.sqrt(sigma2 + xv * xv))
                    s = _F0
                    for l in range(32):
                        s += weights[l]
                    sw[j] = s
                    sc, mn = make_qkx3_quants(32, nmax, xb[32 * j:32 * j + 32], weights, L[32 * j:32 * j + 32],
                                              Laux, np.float32(-0.9), np.float32(0.05), 36, False)
                    scales[j] = sc
                    mins[j] = mn
                d_block = make_qp_quants(8, 63, scales, Ls, sw)
                m_block = make_qp_quants(8, 63, mins, Lm, sw)
                if nmax == 31:
                    for j in range(8):
                        Ls[j] = min(63, Ls[j])
                        Lm[j] = min(63, Lm[j])
            for j in range(8):
                ls = np.int64(Ls[j])
                lm = np.int64(Lm[j])
                if j < 4:
                    sb[j] = ls
                    sb[j + 4] = lm
                else:
                    sb[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                    sb[j - 4] |= (ls >> 4) << 6
                    sb[j] |= (lm >> 4) << 6
            for j in range(12):
                sb[j] &= 0xFF
                out[r, o + 4 + j] = sb[j]
            d16 = _put_f16(out[r], o, d_block)
            m16 = _put_f16(out[r], o + 2, m_block)
            for j in range(8):
                sc, m = _scale_min_k4(j, sb)
                d = d16 * np.float32(sc)
                if d == _F0:
                    continue
                dm = m16 * np.float32(m)
                for ii in range(32):
                    l = nearest_int((xb[32 * j + ii] + dm) / d)
                    L[32 * j + ii] = max(0, min(nmax, l))
            if nmax == 15:
                for j in range(0, QK_K, 64):
                    for l in range(32):
                        out[r, o + 16 + j // 2 + l] = (L[j + l] & 0xF) | ((L[j + l + 32] & 0xF) << 4)
            else:
                for j in range(32):
                    out[r, o + 16 + j] = 0
                for k in range(QK_K):
                    if L[k] > 15:
                        out[r, o + 16 + k % 32] |= 1 << (k // 32)
                for j in range(0, QK_K, 64):
                    for l in range(32):
                        out[r, o + 48 + j // 2 + l] = (L[j + l] & 0xF) | ((L[j + l + 32] & 0xF) << 4)


@_jit
def _q6_k_rows(x, qw, out):
    rows, n = x.shape
    nb = n // QK_K
    use_qw = qw.shape[0] > 0
    L = np.zeros(QK_K, np.int8)
    scales = np.zeros(16, np.float32)
    sc8 = np.zeros(16, np.int64)
    for r in range(rows):
        for i in range(nb):
            xb = x[r, i * QK_K:(i + 1) * QK_K]
            o = i * 210
            max_scale = _F0
            max_abs_scale = _F0
            for ib in range(16):
                if use_qw:
                    s = make_qx_quants(16, 32, xb[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16], 1,
                                       qw[QK_K * i + 16 * ib:QK_K * i + 16 * ib + 16])
                else:
                    s = make_qx_quants(16, 32, xb[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16], 1, EMPTY_F32)
                scales[ib] = s
                a = np.float32(abs(s))
                if a > max_abs_scale:
                    max_abs_scale = a
                    max_scale = s
            if max_abs_scale < GROUP_MAX_EPS:
                for j in range(210):
                    out[r, o + j] = 0
                continue
            iscale = np.float32(-128.0) / max_scale
            d16 = _put_f16(out[r], o + 208, _F1 / iscale)
            for ib in range(16):
                v = ((min(127, nearest_int(iscale * scales[ib])) + 128) & 0xFF) - 128
                sc8[ib] = v
                out[r, o + 192 + ib] = v & 0xFF
            for j in range(16):
                d = d16 * np.float32(sc8[j])
                if d == _F0:
                    continue
                for ii in range(16):
                    l = nearest_int(xb[16 * j + ii] / d)
                    L[16 * j + ii] = max(-32, min(31, l)) + 32
            for c in range(2):
                j = 128 * c
                for l in range(32):
                    l0 = np.int64(L[j + l]) & 0xFF
                    l1 = np.int64(L[j + l + 32]) & 0xFF
                    l2 = np.int64(L[j + l + 64]) & 0xFF
                    l3 = np.int64(L[j + l + 96]) & 0xFF
                    out[r, o + 64 * c + l] = (l0 & 0xF) | ((l2 & 0xF) << 4)
                    out[r, o + 64 * c + l + 32] = (l1 & 0xF) | ((l3 & 0xF) << 4)
                    out[r, o + 128 + 32 * c + l] = ((l0 >> 4) | ((l1 >> 4) << 2) | ((l2 >> 4) << 4)
                                                    | ((l3 >> 4) << 6)) & 0xFF


# ==============================================================================================
# pack / unpack / values (numpy)
# ==============================================================================================
_SH2 = np.array([0, 2, 4, 6], dtype=np.uint8)
_SH1 = np.arange(8, dtype=np.uint8)


def _blocks(data: np.ndarray, bs: int) -> np.ndarray:
    rows, nbytes = data.shape
    if nbytes % bs:
        raise QggufError(f"data of {nbytes} bytes per row is not whole {bs}-byte blocks")
    return data.reshape(rows, nbytes // bs, bs)


def _f16(blocks: np.ndarray, off: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., off:off + 2]).view(np.float16)[..., 0]


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:        # (rows, nb, 64) -> (rows, nb, 256) in 0..3
    r, nb = qs.shape[:2]
    q = (qs.reshape(r, nb, 2, 1, 32) >> _SH2[:, None]) & 3
    return q.reshape(r, nb, QK_K)


def _pack_2bit_np(q: np.ndarray) -> np.ndarray:        # (rows, nb, 256) 0..3 -> (rows, nb, 64)
    r, nb = q.shape[:2]
    q = q.reshape(r, nb, 2, 4, 32).astype(np.uint8)
    return (q[:, :, :, 0] | (q[:, :, :, 1] << 2) | (q[:, :, :, 2] << 4) | (q[:, :, :, 3] << 6)).reshape(r, nb, 64)


def _unpack_hbits(h: np.ndarray) -> np.ndarray:        # (rows, nb, 32) -> (rows, nb, 256): bit k//32 of h[k%32]
    r, nb = h.shape[:2]
    return ((h.reshape(r, nb, 1, 32) >> _SH1[:, None]) & 1).reshape(r, nb, QK_K)


def _pack_hbits(bits: np.ndarray) -> np.ndarray:       # (rows, nb, 256) 0/1 -> (rows, nb, 32)
    r, nb = bits.shape[:2]
    b = bits.reshape(r, nb, 8, 32).astype(np.uint8) << _SH1[:, None]
    return np.bitwise_or.reduce(b, axis=2)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:     # (rows, nb, 128) -> (rows, nb, 256): Q4_K order
    r, nb = qs.shape[:2]
    qs = qs.reshape(r, nb, 4, 1, 32)
    return np.concatenate([qs & 0xF, qs >> 4], axis=3).reshape(r, nb, QK_K)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:        # (rows, nb, 256) 0..15 -> (rows, nb, 128)
    r, nb = q.shape[:2]
    q = q.reshape(r, nb, 4, 2, 32).astype(np.uint8)
    return (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(r, nb, 128)


def _unpack_k4_scales(sb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:   # (rows, nb, 12) -> 2 x (rows, nb, 8)
    lo, mid, hi = sb[..., 0:4], sb[..., 4:8], sb[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, mn


def _pack_k4_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    sc = sc.astype(np.uint8)
    mn = mn.astype(np.uint8)
    lo = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    mid = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
    hi = (sc[..., 4:8] & 0xF) | ((mn[..., 4:8] & 0xF) << 4)
    return np.concatenate([lo, mid, hi], axis=-1)


def _unpack_q3_scales(sb: np.ndarray) -> np.ndarray:   # (rows, nb, 12) -> (rows, nb, 16) 0..63
    low = np.concatenate([sb[..., 0:8] & 0xF, sb[..., 0:8] >> 4], axis=-1)
    j = np.arange(16)
    high = (sb[..., 8 + j % 4] >> (2 * (j // 4)).astype(np.uint8)) & 3
    return low | (high << 4)


def _pack_q3_scales(sc: np.ndarray) -> np.ndarray:
    sc = sc.astype(np.uint8)
    out = np.empty(sc.shape[:-1] + (12,), np.uint8)
    out[..., 0:8] = (sc[..., 0:8] & 0xF) | ((sc[..., 8:16] & 0xF) << 4)
    h = sc >> 4
    out[..., 8:12] = h[..., 0:4] | (h[..., 4:8] << 2) | (h[..., 8:12] << 4) | (h[..., 12:16] << 6)
    return out


# --- field checks -----------------------------------------------------------------------------
def _field(fields: Fields, name: str, qname: str, shape: tuple[int, ...] | None, lo: int | None = None,
           hi: int | None = None, dtype=None) -> np.ndarray:
    if name not in fields:
        raise QggufError(f"{qname} pack(): missing field {name!r} (need {', '.join(_FIELD_NAMES[qname])})")
    a = np.asarray(fields[name])
    if shape is not None and a.shape != shape:
        raise QggufError(f"{qname} pack(): field {name!r} has shape {a.shape}, expected {shape}")
    if lo is not None and a.size:
        if not np.issubdtype(a.dtype, np.integer):
            raise QggufError(f"{qname} pack(): field {name!r} must be integers, got {a.dtype}")
        amin, amax = int(a.min()), int(a.max())
        if amin < lo or amax > hi:
            raise QggufError(f"{qname} pack(): field {name!r} has values {amin}..{amax}, outside {lo}..{hi}")
    if dtype is not None:
        a = a.astype(dtype)
    return a


def _lead(fields: Fields, qname: str) -> tuple[int, int]:
    q = fields.get("q")
    if q is None:
        raise QggufError(f"{qname} pack(): missing field 'q' (need {', '.join(_FIELD_NAMES[qname])})")
    q = np.asarray(q)
    if q.ndim != 3 or q.shape[2] != QK_K:
        raise QggufError(f"{qname} pack(): field 'q' must have shape (rows, nb, {QK_K}), got {q.shape}")
    return q.shape[0], q.shape[1]


def _f16_field(fields: Fields, name: str, qname: str, shape) -> np.ndarray:
    a = _field(fields, name, qname, shape)
    return np.ascontiguousarray(a.astype(np.float16)).view(np.uint8).reshape(shape + (2,))


_FIELD_NAMES = {
    "Q2_K": ("d", "dmin", "scales", "mins", "q"),
    "Q3_K": ("d", "scales", "q"),
    "Q4_K": ("d", "dmin", "scales", "mins", "q"),
    "Q5_K": ("d", "dmin", "scales", "mins", "q"),
    "Q6_K": ("d", "scales", "q"),
}


# --- Q2_K ---------------------------------------------------------------------------------------
def _unpack_q2_k(data: np.ndarray) -> Fields:
    b = _blocks(data, 84)
    sb = b[..., 0:16]
    return {"d": _f16(b, 80), "dmin": _f16(b, 82), "scales": sb & 0xF, "mins": sb >> 4,
            "q": _unpack_2bit(b[..., 16:80])}


def _pack_q2_k(f: Fields) -> np.ndarray:
    r, nb = _lead(f, "Q2_K")
    out = np.empty((r, nb, 84), np.uint8)
    out[..., 0:16] = (_field(f, "scales", "Q2_K", (r, nb, 16), 0, 15, np.uint8)
                      | (_field(f, "mins", "Q2_K", (r, nb, 16), 0, 15, np.uint8) << 4))
    out[..., 16:80] = _pack_2bit_np(_field(f, "q", "Q2_K", (r, nb, QK_K), 0, 3, np.uint8))
    out[..., 80:82] = _f16_field(f, "d", "Q2_K", (r, nb))
    out[..., 82:84] = _f16_field(f, "dmin", "Q2_K", (r, nb))
    return out.reshape(r, nb * 84)


def q2_k_values(f: Fields) -> np.ndarray:
    """Q2_K fields -> float32 (rows, nb*256): ``(d*scales)*q - dmin*mins`` per 16 weights."""
    q = np.asarray(f["q"])
    r, nb = q.shape[:2]
    d = np.asarray(f["d"]).astype(np.float32)[..., None]
    dm = np.asarray(f["dmin"]).astype(np.float32)[..., None]
    dl = d * np.asarray(f["scales"]).astype(np.float32)
    ml = dm * np.asarray(f["mins"]).astype(np.float32)
    v = dl[..., None] * q.reshape(r, nb, 16, 16).astype(np.float32) - ml[..., None]
    return v.reshape(r, nb * QK_K)


# --- Q3_K ---------------------------------------------------------------------------------------
def _unpack_q3_k(data: np.ndarray) -> Fields:
    b = _blocks(data, 110)
    q = _unpack_2bit(b[..., 32:96]) | (_unpack_hbits(b[..., 0:32]) << 2)
    return {"d": _f16(b, 108), "scales": _unpack_q3_scales(b[..., 96:108]), "q": q}


def _pack_q3_k(f: Fields) -> np.ndarray:
    r, nb = _lead(f, "Q3_K")
    q = _field(f, "q", "Q3_K", (r, nb, QK_K), 0, 7, np.uint8)
    out = np.empty((r, nb, 110), np.uint8)
    out[..., 0:32] = _pack_hbits(q >> 2)
    out[..., 32:96] = _pack_2bit_np(q & 3)
    out[..., 96:108] = _pack_q3_scales(_field(f, "scales", "Q3_K", (r, nb, 16), 0, 63, np.uint8))
    out[..., 108:110] = _f16_field(f, "d", "Q3_K", (r, nb))
    return out.reshape(r, nb * 110)


def q3_k_values(f: Fields) -> np.ndarray:
    """Q3_K fields -> float32: ``(d*(scales-32))*(q-4)`` per 16 weights."""
    q = np.asarray(f["q"])
    r, nb = q.shape[:2]
    d = np.asarray(f["d"]).astype(np.float32)[..., None]
    dl = d * (np.asarray(f["scales"]).astype(np.int32) - 32).astype(np.float32)
    v = dl[..., None] * (q.reshape(r, nb, 16, 16).astype(np.int32) - 4).astype(np.float32)
    return v.reshape(r, nb * QK_K)


# --- Q4_K / Q5_K ----------------------------------------------------------------------------------
def _unpack_q4_k(data: np.ndarray) -> Fields:
    b = _blocks(data, 144)
    sc, mn = _unpack_k4_scales(b[..., 4:16])
    return {"d": _f16(b, 0), "dmin": _f16(b, 2), "scales": sc, "mins": mn, "q": _unpack_nibbles(b[..., 16:144])}


def _pack_q4_k(f: Fields) -> np.ndarray:
    r, nb = _lead(f, "Q4_K")
    out = np.empty((r, nb, 144), np.uint8)
    out[..., 0:2] = _f16_field(f, "d", "Q4_K", (r, nb))
    out[..., 2:4] = _f16_field(f, "dmin", "Q4_K", (r, nb))
    out[..., 4:16] = _pack_k4_scales(_field(f, "scales", "Q4_K", (r, nb, 8), 0, 63),
                                     _field(f, "mins", "Q4_K", (r, nb, 8), 0, 63))
    out[..., 16:144] = _pack_nibbles(_field(f, "q", "Q4_K", (r, nb, QK_K), 0, 15, np.uint8))
    return out.reshape(r, nb * 144)


def _unpack_q5_k(data: np.ndarray) -> Fields:
    b = _blocks(data, 176)
    sc, mn = _unpack_k4_scales(b[..., 4:16])
    q = _unpack_nibbles(b[..., 48:176]) | (_unpack_hbits(b[..., 16:48]) << 4)
    return {"d": _f16(b, 0), "dmin": _f16(b, 2), "scales": sc, "mins": mn, "q": q}


def _pack_q5_k(f: Fields) -> np.ndarray:
    r, nb = _lead(f, "Q5_K")
    q = _field(f, "q", "Q5_K", (r, nb, QK_K), 0, 31, np.uint8)
    out = np.empty((r, nb, 176), np.uint8)
    out[..., 0:2] = _f16_field(f, "d", "Q5_K", (r, nb))
    out[..., 2:4] = _f16_field(f, "dmin", "Q5_K", (r, nb))
    out[..., 4:16] = _pack_k4_scales(_field(f, "scales", "Q5_K", (r, nb, 8), 0, 63),
                                     _field(f, "mins", "Q5_K", (r, nb, 8), 0, 63))
    out[..., 16:48] = _pack_hbits(q >> 4)
    out[..., 48:176] = _pack_nibbles(q & 0xF)
    return out.reshape(r, nb * 176)


def q4_k_values(f: Fields) -> np.ndarray:
    """Q4_K/Q5_K fields -> float32: ``(d*scales)*q - dmin*mins`` per 32 weights."""
    q = np.asarray(f["q"])
    r, nb = q.shape[:2]
    d = np.asarray(f["d"]).astype(np.float32)[..., None]
    dm = np.asarray(f["dmin"]).astype(np.float32)[..., None]
    dl = d * np.asarray(f["scales"]).astype(np.float32)
    ml = dm * np.asarray(f["mins"]).astype(np.float32)
    v = dl[..., None] * q.reshape(r, nb, 8, 32).astype(np.float32) - ml[..., None]
    return v.reshape(r, nb * QK_K)


q5_k_values = q4_k_values


# --- Q6_K ---------------------------------------------------------------------------------------
def _unpack_q6_k(data: np.ndarray) -> Fields:
    b = _blocks(data, 210)
    r, nb = b.shape[:2]
    ql = b[..., 0:128].reshape(r, nb, 2, 2, 32)
    low = np.stack([ql[:, :, :, 0] & 0xF, ql[:, :, :, 1] & 0xF, ql[:, :, :, 0] >> 4, ql[:, :, :, 1] >> 4], axis=3)
    qh = b[..., 128:192].reshape(r, nb, 2, 1, 32)
    high = (qh >> _SH2[:, None]) & 3
    q = (low | (high << 4)).reshape(r, nb, QK_K)
    return {"d": _f16(b, 208), "scales": np.ascontiguousarray(b[..., 192:208]).view(np.int8), "q": q}


def _pack_q6_k(f: Fields) -> np.ndarray:
    r, nb = _lead(f, "Q6_K")
    q = _field(f, "q", "Q6_K", (r, nb, QK_K), 0, 63, np.uint8).reshape(r, nb, 2, 4, 32)
    out = np.empty((r, nb, 210), np.uint8)
    lo = q & 0xF
    hi = q >> 4
    ql = out[..., 0:128].reshape(r, nb, 2, 2, 32)
    ql[:, :, :, 0] = lo[:, :, :, 0] | (lo[:, :, :, 2] << 4)
    ql[:, :, :, 1] = lo[:, :, :, 1] | (lo[:, :, :, 3] << 4)
    out[..., 0:128] = ql.reshape(r, nb, 128)
    out[..., 128:192] = (hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4)
                         | (hi[:, :, :, 3] << 6)).reshape(r, nb, 64)
    out[..., 192:208] = _field(f, "scales", "Q6_K", (r, nb, 16), -128, 127, np.int8).view(np.uint8)
    out[..., 208:210] = _f16_field(f, "d", "Q6_K", (r, nb))
    return out.reshape(r, nb * 210)


def q6_k_values(f: Fields) -> np.ndarray:
    """Q6_K fields -> float32: ``(d*scales)*(q-32)`` per 16 weights."""
    q = np.asarray(f["q"])
    r, nb = q.shape[:2]
    d = np.asarray(f["d"]).astype(np.float32)[..., None]
    dl = d * np.asarray(f["scales"]).astype(np.float32)
    v = dl[..., None] * (q.reshape(r, nb, 16, 16).astype(np.int32) - 32).astype(np.float32)
    return v.reshape(r, nb * QK_K)


VALUES: dict[str, Callable[[Fields], np.ndarray]] = {
    "Q2_K": q2_k_values, "Q3_K": q3_k_values, "Q4_K": q4_k_values, "Q5_K": q5_k_values, "Q6_K": q6_k_values,
}


def values(name: str, fields: Fields) -> np.ndarray:
    """Per-weight float32 values (rows, nb*256) of k-quant ``name``'s fields (as ``unpack`` gives them)."""
    try:
        fn = VALUES[name.upper()]
    except KeyError:
        raise QggufError(f"{name!r} is not a k-quant type ({', '.join(VALUES)})") from None
    return fn(fields)


# ==============================================================================================
# quantize drivers
# ==============================================================================================
def _threads() -> int:
    env = os.environ.get("QGGUF_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _run(kernel, x: np.ndarray, importance: np.ndarray | None, bs: int, *extra) -> np.ndarray:
    rows, n = x.shape
    if not np.isfinite(x).all():
        raise BadWeightsError("weights contain NaN or infinite values")
    qw = EMPTY_F32
    if importance is not None:
        qw = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if not np.isfinite(qw).all():
            raise BadWeightsError("importance contains NaN or infinite values")
    out = np.empty((rows, n // QK_K * bs), dtype=np.uint8)
    if rows == 0 or n == 0:
        return out
    nthreads = min(_threads(), max(1, rows * n // (64 * QK_K)), rows)
    if nthreads <= 1:
        kernel(x, qw, out, *extra)
        return out
    bounds = np.linspace(0, rows, nthreads + 1).astype(int)
    with ThreadPoolExecutor(nthreads) as ex:
        futs = [ex.submit(kernel, x[a:b], qw, out[a:b], *extra) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        for f in futs:
            f.result()
    return out


def _quant_q2_k(x, imp):
    return _run(_q2_k_rows, x, imp, 84)


def _quant_q3_k(x, imp):
    return _run(_q3_k_rows, x, imp, 110)


def _quant_q4_k(x, imp):
    return _run(_q45_k_rows, x, imp, 144, 15, 144)


def _quant_q5_k(x, imp):
    return _run(_q45_k_rows, x, imp, 176, 31, 176)


def _quant_q6_k(x, imp):
    return _run(_q6_k_rows, x, imp, 210)


def _dequant(unpack, vals):
    def f(data: np.ndarray) -> np.ndarray:
        return vals(unpack(data))
    return f


def _make(name: str, gt: T, bs: int, quant, unpack, pack, vals, desc: str) -> QuantType:
    return QuantType(name=name, ggml_type=int(gt), block_size=QK_K, type_size=bs, _quantize=quant,
                     _dequantize=_dequant(unpack, vals), _pack=pack, _unpack=unpack, _values=vals, description=desc)


Q2_K = _make("Q2_K", T.Q2_K, 84, _quant_q2_k, _unpack_q2_k, _pack_q2_k, q2_k_values,
             "Q2_K, 2.625 bpw: 2-bit codes, 4-bit scales and mins per 16 weights")
Q3_K = _make("Q3_K", T.Q3_K, 110, _quant_q3_k, _unpack_q3_k, _pack_q3_k, q3_k_values,
             "Q3_K, 3.4375 bpw: 3-bit symmetric codes, 6-bit scales per 16 weights")
Q4_K = _make("Q4_K", T.Q4_K, 144, _quant_q4_k, _unpack_q4_k, _pack_q4_k, q4_k_values,
             "Q4_K, 4.5 bpw: 4-bit codes, 6-bit scales and mins per 32 weights")
Q5_K = _make("Q5_K", T.Q5_K, 176, _quant_q5_k, _unpack_q5_k, _pack_q5_k, q5_k_values,
             "Q5_K, 5.5 bpw: 5-bit codes, 6-bit scales and mins per 32 weights")
Q6_K = _make("Q6_K", T.Q6_K, 210, _quant_q6_k, _unpack_q6_k, _pack_q6_k, q6_k_values,
             "Q6_K, 6.5625 bpw: 6-bit symmetric codes, 8-bit scales per 16 weights")

TYPES = [Q2_K, Q3_K, Q4_K, Q5_K, Q6_K]

__all__ = ["QK_K", "TYPES", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "VALUES", "values",
           "q2_k_values", "q3_k_values", "q4_k_values", "q5_k_values", "q6_k_values"]
