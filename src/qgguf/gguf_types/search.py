"""Scale-search primitives of llama.cpp's ``ggml-quants.c``, as numba functions that give the same bits.

These are the building blocks of the reference (``quantize_row_*_ref``) and importance-weighted
(``quantize_row_*_impl``) quantizers of the legacy and k-quant types. Each one is written so that every
float operation happens in float32, in the order the C code does it (ggml-base is compiled without
``-ffast-math`` and without FMA contraction, and numba/LLVM does not contract or reorder float
arithmetic unless asked), so the chosen codes and scales are bit-identical to llama.cpp's.

All functions are ``numba.njit`` and meant to be called from other numba code (they can be called from
Python too, which is handy in tests). Arrays are 1-D and contiguous; ``x`` and weights are float32.
Where C passes an optional ``NULL`` weight pointer, pass an **empty** float32 array (``EMPTY_F32``).

Functions (C name -> signature here):

``nearest_int(fval: f32) -> int``
    llama.cpp's magic-number rounding: ``fval + 12582912.f`` reinterpreted as int; round half to even
    for ``|fval| <= 4194303``; out-of-range values give the same garbage as C.
``make_qx_quants(n, nmax, x, L: int8[n], rmse_type, qw: f32[n] or empty) -> f32 scale``
    Symmetric codes ``L`` in ``[0, 2*nmax)`` (value ``scale * (L - nmax)``). ``rmse_type`` 0: plain
    rounding; 1: weights ``x^2``; 2: 1; 3: ``|x|``; other: ``sqrt|x|`` (ignored when ``qw`` is given);
    negative: one pass, return the mean of the two scales (``return_early``).
``make_q3_quants(n, nmax, x, L: int8[n], do_rmse) -> f32 scale``
    Symmetric codes with an iterative per-element refinement (weights ``x^2``).
``make_qkx2_quants(n, nmax, x, weights: f32[n], L: u8[n], Laux: u8[n], rmin, rdelta, nstep, use_mad)``
    ``-> (f32 scale, f32 the_min)``: asymmetric codes ``L`` in ``[0, nmax]``, value ``scale*L - the_min``.
``make_qkx3_quants(n, nmax, x, weights: f32[n] or empty, L, Laux, rmin, rdelta, nstep, use_mad)``
    ``-> (f32 scale, f32 the_min)``: as qkx2; empty weights mean ``x^2``.
``make_qp_quants(n, nmax, x, L: u8[n], quant_weights: f32[n]) -> f32 scale``
    Positive values (sub-block scales/mins) to codes ``L`` in ``[0, nmax]``, value ``scale * L``.

Also: ``fp32_to_fp16_bits`` / ``fp16_bits_to_fp32`` / ``fp16_round`` (ggml's ``GGML_FP32_TO_FP16``:
round to nearest even), and the bit casts ``f32_as_u32`` / ``u32_as_f32``.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

GROUP_MAX_EPS = np.float32(1e-15)
EMPTY_F32 = np.empty(0, dtype=np.float32)

_jit = numba.njit(cache=True, nogil=True, error_model="numpy")

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)


# ----------------------------------------------------------------------------------------------
# bit casts and fp16
# ----------------------------------------------------------------------------------------------
@intrinsic
def f32_as_u32(typingctx, x):
    """Reinterpret a float32 as uint32 (C's memcpy of a float into an int)."""
    if not (isinstance(x, types.Float) and x.bitwidth == 32):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def u32_as_f32(typingctx, x):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(x, types.Integer):
        return None
    width = x.bitwidth

    def codegen(context, builder, signature, args):
        v = args[0]
        if width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


@_jit
def nearest_int(fval):
    """llama.cpp's ``nearest_int``: (bits of fval + 1.5*2^23) & 0x7fffff, minus 2^22."""
    val = np.float32(fval) + np.float32(12582912.0)
    i = np.int64(f32_as_u32(val))
    return (i & 0x007FFFFF) - 0x00400000


@_jit
def fp32_to_fp16_bits(f):
    """float32 -> IEEE half bits (uint16 value as int), round to nearest even, like GGML_FP32_TO_FP16."""
    b = np.int64(f32_as_u32(np.float32(f)))
    sign = (b >> 16) & 0x8000
    a = b & 0x7FFFFFFF
    if a > 0x7F800000:                     # NaN
        return sign | 0x7E00
    if a >= 0x477FF000:                    # >= 65520 rounds to infinity
        return sign | 0x7C00
    if a < 0x38800000:                     # below 2^-14: half subnormal (exact scaling, then RNE)
        r = np.rint(u32_as_f32(a) * np.float32(16777216.0))
        return sign | np.int64(r)
    mant = a & 0x7FFFFF
    h = ((((a >> 23) - 127 + 15) << 10) | (mant >> 13))
    rem = mant & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
        h += 1
    return sign | h


@_jit
def fp16_bits_to_fp32(h):
    """IEEE half bits -> float32 (exact), like GGML_FP16_TO_FP32."""
    h = np.int64(h) & 0xFFFF
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = np.float32(m) * np.float32(5.9604644775390625e-08)   # m * 2^-24, exact
        return -v if sign else v
    if e == 31:
        return u32_as_f32(sign | 0x7F800000 | (m << 13))
    return u32_as_f32(sign | ((e - 15 + 127) << 23) | (m << 13))


@_jit
def fp16_round(f):
    """float32 -> nearest half value, as float32 (GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(f)))."""
    return fp16_bits_to_fp32(fp32_to_fp16_bits(f))


# ----------------------------------------------------------------------------------------------
# make_qx_quants
# ----------------------------------------------------------------------------------------------
@_jit
def _qx_weight(x, qw, use_qw, rmse_type, i):
    if use_qw:
        return qw[i]
    xi = x[i]
    if rmse_type == 1:
        return xi * xi
    if rmse_type == 2:
        return _F1
    if rmse_type == 3:
        return np.float32(abs(xi))
    return np.float32(np.sqrt(np.float32(abs(xi))))


@_jit
def make_qx_quants(n, nmax, x, L, rmse_type, qw):
    """See module docstring. ``L``: int8 output; ``qw``: float32 weights or empty (C's NULL)."""
    use_qw = qw.shape[0] > 0
    mx = _F0
    amax = _F0
    for i in range(n):
        ax = np.float32(abs(x[i]))
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    fnmax = np.float32(nmax)
    iscale = np.float32(-fnmax) / mx
    if rmse_type == 0:
        for i in range(n):
            l = nearest_int(iscale * x[i])
            L[i] = nmax + max(-nmax, min(nmax - 1, l))
        return _F1 / iscale
    return_early = False
    if rmse_type < 0:
        rmse_type = -rmse_type
        return_early = True
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = _qx_weight(x, qw, use_qw, rmse_type, i)
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != _F0 else _F0
    if return_early:
        if suml2 > _F0:
            return np.float32(0.5) * (scale + _F1 / iscale)
        return _F1 / iscale
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = -(fnmax + np.float32(0.1) * np.float32(is_)) / mx
        sumlx = _F0
        suml2 = _F0
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            w = _qx_weight(x, qw, use_qw, rmse_type, i)
            fl = np.float32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > _F0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


# ----------------------------------------------------------------------------------------------
# make_q3_quants
# ----------------------------------------------------------------------------------------------
@_jit
def make_q3_quants(n, nmax, x, L, do_rmse):
    """See module docstring. ``L``: int8 output, ``nmax + l`` with ``l`` in ``[-nmax, nmax-1]``."""
    mx = _F0
    amax = _F0
    for i in range(n):
        ax = np.float32(abs(x[i]))
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    iscale = np.float32(-np.float32(nmax)) / mx
    if do_rmse:
        sumlx = _F0
        suml2 = _F0
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            L[i] = l
            w = x[i] * x[i]
            fl = np.float32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        for itry in range(5):
            n_changed = 0
            for i in range(n):
                w = x[i] * x[i]
                fL = np.float32(L[i])
                slx = sumlx - w * x[i] * fL
                if slx > _F0:
                    sl2 = suml2 - w * fL * fL
                    new_l = nearest_int(x[i] * sl2 / slx)
                    new_l = max(-nmax, min(nmax - 1, new_l))
                    if new_l != L[i]:
                        fn = np.float32(new_l)
                        slx += w * x[i] * fn
                        sl2 += w * fn * fn
                        if sl2 > _F0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[i] += nmax
        return sumlx / suml2 if suml2 > _F0 else _F0
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
    return _F1 / iscale


# ----------------------------------------------------------------------------------------------
# make_qkx2_quants / make_qkx3_quants
# ----------------------------------------------------------------------------------------------
@_jit
def _qkx_search(n, nmax, x, weights, use_w, L, Laux, rmin, rdelta, nstep, use_mad, zero_if_le):
    # Shared body of make_qkx2_quants (use_w=True, zero_if_le=False: `max == min`) and
    # make_qkx3_quants (weights may be x^2, zero_if_le=True: `max <= min`).
    x0 = x[0]
    mn = x0
    mx = x0
    sum_w = weights[0] if use_w else x0 * x0
    sum_x = sum_w * x0
    for i in range(1, n):
        xi = x[i]
        if xi < mn:
            mn = xi
        if xi > mx:
            mx = xi
        w = weights[i] if use_w else xi * xi
        sum_w += w
        sum_x += w * xi
    if mn > _F0:
        mn = _F0
    if (mx <= mn) if zero_if_le else (mx == mn):
        for i in range(n):
            L[i] = 0
        return _F0, -mn
    fnmax = np.float32(nmax)
    iscale = fnmax / (mx - mn)
    scale = _F1 / iscale
    best_error = _F0
    for i in range(n):
        l = nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, l))
        diff = scale * np.float32(L[i]) + mn - x[i]
        diff = np.float32(abs(diff)) if use_mad else diff * diff
        w = weights[i] if use_w else x[i] * x[i]
        best_error += w * diff
    if nstep < 1:
        return scale, -mn
    for is_ in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(is_) + fnmax) / (mx - mn)
        sum_l = _F0
        sum_l2 = _F0
        sum_xl = _F0
        for i in range(n):
            l = nearest_int(iscale * (x[i] - mn))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i] if use_w else x[i] * x[i]
            fl = np.float32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > _F0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > _F0:
                this_min = _F0
                this_scale = sum_xl / sum_l2
            cur_error = _F0
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                diff = np.float32(abs(diff)) if use_mad else diff * diff
                w = weights[i] if use_w else x[i] * x[i]
                cur_error += w * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@_jit
def make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """See module docstring. Returns ``(scale, the_min)``; ``L``, ``Laux``: uint8 scratch/output."""
    return _qkx_search(n, nmax, x, weights, True, L, Laux, np.float32(rmin), np.float32(rdelta),
                       nstep, use_mad, False)


@_jit
def make_qkx3_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """See module docstring. Returns ``(scale, the_min)``; empty ``weights`` mean ``x^2``."""
    return _qkx_search(n, nmax, x, weights, weights.shape[0] > 0, L, Laux, np.float32(rmin),
                       np.float32(rdelta), nstep, use_mad, True)


# ----------------------------------------------------------------------------------------------
# make_qp_quants
# ----------------------------------------------------------------------------------------------
@_jit
def make_qp_quants(n, nmax, x, L, quant_weights):
    """See module docstring. ``L``: uint8 output (C stores ints into uint8_t: negatives wrap)."""
    mx = _F0
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    fnmax = np.float32(nmax)
    iscale = fnmax / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = _F1 / iscale
    best_mse = _F0
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        w = quant_weights[i]
        best_mse += w * diff * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (np.float32(0.1) * np.float32(is_) + fnmax) / mx
        scale_is = _F1 / iscale_is
        mse = _F0
        for i in range(n):
            l = nearest_int(iscale_is * x[i])
            l = min(nmax, l)
            diff = x[i] - scale_is * np.float32(l)
            w = quant_weights[i]
            mse += w * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = min(nmax, l)
        L[i] = l & 0xFF
        w = quant_weights[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for itry in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            fL = np.float32(L[i])
            slx = sumlx - w * x[i] * fL
            sl2 = suml2 - w * fL * fL
            if slx > _F0 and sl2 > _F0:
                new_l = nearest_int(x[i] * sl2 / slx)
                new_l = min(nmax, new_l)
                if new_l != np.int64(L[i]):
                    fn = np.float32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > _F0 else _F0


__all__ = [
    "GROUP_MAX_EPS", "EMPTY_F32", "f32_as_u32", "u32_as_f32", "nearest_int", "fp32_to_fp16_bits",
    "fp16_bits_to_fp32", "fp16_round", "make_qx_quants", "make_q3_quants", "make_qkx2_quants",
    "make_qkx3_quants", "make_qp_quants",
]
