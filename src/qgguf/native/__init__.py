"""qgguf's native kernels for its codebook tensor types (a small C library built by cffi).

    from qgguf import native
    native.available()        # False when the C module could not be built or loaded
    native.isa()              # 'avx512' | 'avx2' | 'neon' | 'scalar': the path in use
    t = native.AQTensor(codes, codebooks, scales, M=2, B=8, g=8, R=R, C=C)
    t.dequantize()            # float32 [R, C]
    t.matvec(x, threads=2)    # float32 [R]  (y = W x)
    t.matmul(X, threads=2)    # float32 [N, R] (Y = X W^T)

The path is chosen at run time by CPU feature detection; the environment variable
QGGUF_NATIVE_ISA=scalar|avx2|avx512|neon (or :func:`set_isa`) overrides it for tests and
benchmarks.  Kernels release the GIL.  Bad arguments raise :class:`qgguf.errors.QggufError`.
QGGUF_NATIVE_MODULE_DIR=DIR loads the C module built into DIR instead (``make sanitize`` builds an
AddressSanitizer + UBSan one into build/sanitize; :func:`module_file` says which file is loaded).

AQ layout (additive multi-codebook quantization, AQLM-style; R output rows, C input columns):
  W[r, j*g:(j+1)*g] = scales[r] * sum_m codebooks[m][codes[j, m, r]]
  codes      uint8 (B=8) or uint16 (B=16), shape [C/g, M, R] (R fastest)
  codebooks  float16 or float32, shape [M, 2^B, g]
  scales     float32 or float16, shape [R]

Matvec: for B=8, one float32 lookup table per input group and codebook
(LUT[j][m][k] = dot(codebooks[m][k], x_j)) and gathers over the codes of many rows; for B=16,
dequantize-and-dot.  Matmul: up to :func:`matmul_lut_max` tokens it runs the matvec kernel per
token (always, on the AVX-512 path for B=8); above, each thread dequantizes tiles of rows and
runs a blocked float dot on them.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import QggufError

__all__ = ["available", "build_error", "isa", "isas", "set_isa", "use_isa", "matmul_lut_max", "table_bits",
           "AQTensor", "NativeUnavailableError"]

_ISA_IDS = {"scalar": 0, "avx2": 1, "avx512": 2, "neon": 3}
_TYPE_AQ = 0
_MAX_ELEMS = 1 << 62


class NativeUnavailableError(QggufError):
    """The native module is not built or cannot be loaded."""


def _load_module_from(folder: str):
    """The module built into ``folder`` (QGGUF_NATIVE_MODULE_DIR: the sanitizer build of ``make sanitize``)."""
    import importlib.machinery
    import importlib.util
    found = sorted(Path(folder).glob("**/_qgguf_native*.so")) + sorted(Path(folder).glob("**/_qgguf_native*.pyd"))
    if not found:
        raise ImportError(f"QGGUF_NATIVE_MODULE_DIR={folder}: no _qgguf_native module there")
    name = __name__ + "._qgguf_native"
    spec = importlib.util.spec_from_file_location(name, found[0],
                                                  loader=importlib.machinery.ExtensionFileLoader(name, str(found[0])))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_MODULE_FILE: str | None = None
try:
    if os.environ.get("QGGUF_NATIVE_MODULE_DIR"):
        _mod = _load_module_from(os.environ["QGGUF_NATIVE_MODULE_DIR"])
    else:
        from . import _qgguf_native as _mod  # type: ignore[attr-defined]
    _ffi, _lib, _MODULE_FILE = _mod.ffi, _mod.lib, _mod.__file__
    _IMPORT_ERROR: str | None = None
except Exception as _e:  # noqa: BLE001 - ImportError, OSError (bad .so), ...
    _ffi = _lib = None
    _IMPORT_ERROR = f"{type(_e).__name__}: {_e}"


def build_error() -> str | None:
    """Why the native module is unavailable (the compiler's message if the build failed), or None."""
    if _lib is not None:
        return None
    p = Path(__file__).with_name("_build_error.txt")
    if p.exists():
        return p.read_text(errors="replace").strip()
    return (f"the native module qgguf.native._qgguf_native is not built ({_IMPORT_ERROR}); "
            "reinstall qgguf with a working C compiler (pip install -e . or pip install .), or "
            "run python src/qgguf/native/_build.py in a source checkout")


def module_file() -> str | None:
    """Path of the loaded C module (QGGUF_NATIVE_MODULE_DIR picks another build, e.g. the sanitizer one)."""
    return _MODULE_FILE


def available() -> bool:
    """True when the native kernels are built and loadable."""
    return _lib is not None


def _require():
    if _lib is None:
        raise NativeUnavailableError(f"native kernels unavailable: {build_error()}")
    if _ENV_ISA_ERROR:
        raise QggufError(_ENV_ISA_ERROR)
    return _lib


def isas() -> list[str]:
    """ISA paths this CPU (and this build) can run, best last."""
    lib = _require()
    return [n for n, i in _ISA_IDS.items() if lib.qg_isa_available(i)]


def isa() -> str:
    """The ISA path in use: 'avx512', 'avx2', 'neon' or 'scalar'."""
    lib = _require()
    return _ffi.string(lib.qg_isa_name(lib.qg_get_isa())).decode()


def set_isa(name: str) -> None:
    """Select the ISA path (process-wide); raises QggufError if it is unknown or unavailable."""
    if _lib is None:
        _require()
    if name not in _ISA_IDS:
        raise QggufError(f"unknown ISA {name!r} (choose from {', '.join(_ISA_IDS)})")
    if _lib.qg_set_isa(_ISA_IDS[name]) != 0:
        raise QggufError(f"ISA {name!r} is not available on this CPU (available: {', '.join(isas())})")


@contextlib.contextmanager
def use_isa(name: str):
    """Context manager: run kernels on ISA path ``name``, then restore the previous one."""
    prev = isa()
    set_isa(name)
    try:
        yield
    finally:
        set_isa(prev)


def matmul_lut_max() -> int | None:
    """Largest N for which matmul runs the matvec kernel per token, as set by the environment
    variable QGGUF_NATIVE_LUT_MAX; None: automatic (no limit on the AVX-512 path for B=8, where
    the lookup-table kernel beats a float GEMM even at N=128; 4 elsewhere)."""
    v = int(_require().qg_matmul_lut_max())
    return None if v < 0 else v


def table_bits(n: int = 1, B: int = 8) -> int:
    """Precision of the lookup tables the current path builds for a product of ``n`` tokens with an AQ tensor of
    ``B``-bit codes: 8 (AVX-512, B=8, one token: decoding), 16 (AVX-512, B=8, several tokens), 32 (float tables:
    AVX2, NEON, scalar) or 0 (B=16: no tables, dequantize-and-dot).  QGGUF_NATIVE_TABLE_BITS=16 (or 8) in the
    environment makes the AVX-512 path use 16-bit (8-bit) tables for every n; other values are ignored.
    Relative error of y: ~7e-3 with 8-bit tables, ~5e-5 with 16-bit, ~1e-6 with float ones."""
    return int(_require().qg_aq_table_bits(int(B), max(1, int(n))))   # the C core's own choice (traits_n)


_ENV_ISA_ERROR: str | None = None
if _lib is not None and os.environ.get("QGGUF_NATIVE_ISA"):
    try:
        set_isa(os.environ["QGGUF_NATIVE_ISA"].strip().lower())
    except QggufError as _e:
        _ENV_ISA_ERROR = f"QGGUF_NATIVE_ISA: {_e}"


# ---------------------------------------------------------------- argument checks
def _int(name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise QggufError(f"{name} must be an integer, got {type(v).__name__}")
    v = int(v)
    if not lo <= v <= hi:
        raise QggufError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def _array(name: str, a) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise QggufError(f"{name} must be a numpy array, got {type(a).__name__}")
    return a


def _threads(threads) -> int:
    return _int("threads", threads, 1, 256)


def _float_input(name: str, a, shape: tuple) -> np.ndarray:
    a = _array(name, a)
    if a.dtype.kind != "f":
        raise QggufError(f"{name} must be a float array, got dtype {a.dtype}")
    if a.shape != shape:
        raise QggufError(f"{name} must have shape {shape}, got {a.shape}")
    return np.require(a, np.float32, ["C", "A"])   # a copy unless already C-contiguous, aligned float32


def _out(name: str, out, shape: tuple, inputs: tuple = ()) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    out = _array(name, out)
    if out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous \
            or not out.flags.writeable or not out.flags.aligned:
        raise QggufError(f"{name} must be a writable, aligned, C-contiguous float32 array of shape {shape}")
    for a in inputs:
        if np.may_share_memory(out, a):
            raise QggufError(f"{name} must not overlap the input")
    return out


def _tile_codes(codes: np.ndarray) -> np.ndarray:
    """codes [J, M, R] uint8 -> block-major [Rp/64][J*M][64], Rp = R rounded up to 64, padding codes 0
    (see qg_native.h, codes_tiled)."""
    J, M, R = codes.shape
    Rp = (R + 63) // 64 * 64
    out = np.zeros((Rp // 64, J * M, 64), np.uint8)
    flat, nf = codes.reshape(J * M, R), R // 64
    if nf:
        out[:nf] = flat[:, :nf * 64].reshape(J * M, nf, 64).transpose(1, 0, 2)
    if R > nf * 64:
        out[nf, :, :R - nf * 64] = flat[:, nf * 64:]
    return out.reshape(-1)


def _fptr(a: np.ndarray):
    return _ffi.cast("float *", _ffi.from_buffer(a, require_writable=False))


#: the AQ group sizes the kernels take (the format allows 32 too: such weights stay on the torch path)
AQ_GROUP_SIZES = (4, 8, 16)


class AQTensor:
    """An AQ (additive multi-codebook) weight of R output rows and C input columns.

    ``codes`` is kept by reference (it must already be C-contiguous, uint8 for B=8 or uint16 for
    B=16, shape [C/g, M, R] or flat); codebooks and scales are converted to float32 copies.
    ``tiled``: also keep a copy of the codes re-laid out for sequential streaming by the AVX-512
    matvec (B=8 only; the same size as the codes; about 1.6x faster when the weights stream from
    memory); None (default): when this CPU has the AVX-512 path."""

    def __init__(self, codes, codebooks, scales, M, B, g, R, C, tiled: bool | None = None):
        lib = _require()
        M = _int("M", M, 1, 64)
        B = _int("B", B, 8, 16)
        if B not in (8, 16):
            raise QggufError(f"B (bits per code) must be 8 or 16, got {B}")
        g = _int("g", g, 1, 64)
        if g not in AQ_GROUP_SIZES:
            raise QggufError(f"group size g must be 4, 8 or 16, got {g}")
        R = _int("R", R, 1, 1 << 40)
        C = _int("C", C, 1, 1 << 40)
        if C % g:
            raise QggufError(f"group size g={g} does not divide C={C}")
        if R * C >= _MAX_ELEMS or (C // g) * M * R >= _MAX_ELEMS:
            raise QggufError(f"tensor too large: R={R}, C={C}")
        K = 1 << B
        codes = _array("codes", codes)
        want = np.uint8 if B == 8 else np.uint16
        if codes.dtype != want:
            raise QggufError(f"codes must be {np.dtype(want).name} for B={B}, got {codes.dtype}")
        cshape = (C // g, M, R)
        if codes.shape != cshape and codes.shape != (int(np.prod(cshape)),):
            raise QggufError(f"codes must have shape {cshape} (or be flat), got {codes.shape}")
        if not codes.flags.c_contiguous:
            raise QggufError("codes must be C-contiguous")
        if not codes.flags.aligned:
            raise QggufError(f"codes must be aligned to {codes.dtype.itemsize} bytes (a misaligned buffer view)")
        codebooks = _array("codebooks", codebooks)
        if codebooks.dtype.newbyteorder("=") not in (np.float16, np.float32):   # copied: any byte order
            raise QggufError(f"codebooks must be float16 or float32, got {codebooks.dtype}")
        if codebooks.shape != (M, K, g):
            raise QggufError(f"codebooks must have shape {(M, K, g)}, got {codebooks.shape}")
        scales = _array("scales", scales)
        if scales.dtype.newbyteorder("=") not in (np.float16, np.float32):
            raise QggufError(f"scales must be float32 or float16, got {scales.dtype}")
        if scales.shape != (R,):
            raise QggufError(f"scales must have shape {(R,)}, got {scales.shape}")
        cb32 = np.array(codebooks, dtype=np.float32, order="C")   # own aligned copies, checked once
        s32 = np.array(scales, dtype=np.float32, order="C")
        if not np.isfinite(cb32).all():
            raise QggufError("codebooks contain NaN or infinite values")
        if not np.isfinite(s32).all():
            raise QggufError("scales contain NaN or infinite values")
        self.M, self.B, self.g, self.R, self.C = M, B, g, R, C
        self.shape = (R, C)
        self._codes = codes
        self._cb32 = cb32
        self._cbT = np.ascontiguousarray(cb32.transpose(0, 2, 1)) if B == 8 else None
        if tiled is None:
            tiled = B == 8 and bool(lib.qg_isa_available(_ISA_IDS["avx512"]))
        self._tiled = _tile_codes(codes.reshape(cshape)) \
            if tiled and B == 8 else None
        self._scales = s32
        t = _ffi.new("qg_tensor *")
        t.type = _TYPE_AQ
        t.M, t.B, t.g, t.R, t.C = M, B, g, R, C
        self._keep = [_ffi.from_buffer(codes), _ffi.from_buffer(cb32), _ffi.from_buffer(s32)]
        t.codes = _ffi.cast("const void *", self._keep[0])
        t.codebooks = _ffi.cast("const float *", self._keep[1])
        t.scales = _ffi.cast("const float *", self._keep[2])
        if self._cbT is not None:
            self._keep.append(_ffi.from_buffer(self._cbT))
            t.cbT = _ffi.cast("const float *", self._keep[-1])
        if self._tiled is not None:
            self._keep.append(_ffi.from_buffer(self._tiled))
            t.codes_tiled = _ffi.cast("const void *", self._keep[-1])
        self._t = t
        self._lib = lib

    def __repr__(self) -> str:
        return f"AQTensor({self.M}x{self.B}-g{self.g}, R={self.R}, C={self.C})"

    @property
    def nbytes(self) -> int:
        """Bytes the kernels read (codes, float32 codebooks, scales)."""
        n = self._codes.nbytes + self._cb32.nbytes + self._scales.nbytes
        n += self._tiled.nbytes if self._tiled is not None else 0
        return n + (self._cbT.nbytes if self._cbT is not None else 0)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise QggufError(f"{what}: {_ffi.string(self._lib.qg_last_error()).decode()}")

    def dequantize(self, r0: int = 0, r1: int | None = None, threads: int = 1, out=None) -> np.ndarray:
        """Rows [r0, r1) of W as float32 [(r1-r0), C] (exactly scales[r] * sum_m codebook entries)."""
        _require()
        r1 = self.R if r1 is None else r1
        r0 = _int("r0", r0, 0, self.R)
        r1 = _int("r1", r1, r0, self.R)
        n = _threads(threads)
        out = _out("out", out, (r1 - r0, self.C))
        if r1 > r0:
            self._check(self._lib.qg_dequantize_rows(self._t, r0, r1, _fptr(out), n), "dequantize")
        return out

    def matvec(self, x, threads: int = 1, out=None) -> np.ndarray:
        """y = W x for x float [C]; returns float32 [R]."""
        _require()
        x = _float_input("x", x, (self.C,))
        n = _threads(threads)
        y = _out("out", out, (self.R,), (x,))
        self._check(self._lib.qg_matvec(self._t, _fptr(x), _fptr(y), n), "matvec")
        return y

    def matmul(self, X, threads: int = 1, out=None) -> np.ndarray:
        """Y = X W^T for X float [N, C]; returns float32 [N, R]."""
        _require()
        X = _array("X", X)
        if X.ndim != 2:
            raise QggufError(f"X must be 2-D [N, C], got shape {X.shape}")
        X = _float_input("X", X, (X.shape[0], self.C))
        n = _threads(threads)
        Y = _out("out", out, (X.shape[0], self.R), (X,))
        if X.shape[0]:
            self._check(self._lib.qg_matmul(self._t, _fptr(X), X.shape[0], _fptr(Y), n), "matmul")
        return Y


# ---------------------------------------------------------------- several tensors, one input
_MULTI_MAX = 16


def _multi_args(tensors, x, outs, threads):
    """Checked (tensors, x float32, outs, threads) of :func:`matvec_multi` / :class:`BoundMatvec`."""
    _require()
    if isinstance(tensors, (AQTensor, VQTensor)):
        tensors = [tensors]
    if not isinstance(tensors, (list, tuple)) or not 1 <= len(tensors) <= _MULTI_MAX:
        raise QggufError(f"tensors must be a list of 1 to {_MULTI_MAX} AQTensor/VQTensor")
    for i, t in enumerate(tensors):
        if not isinstance(t, (AQTensor, VQTensor)):
            raise QggufError(f"tensors[{i}] must be an AQTensor or VQTensor, got {type(t).__name__}")
    C = tensors[0].C
    for i, t in enumerate(tensors):
        if t.C != C:
            raise QggufError(f"tensors[{i}] has C={t.C}, tensors[0] has C={C}: one input needs one C")
    x = _float_input("x", x, (C,))
    n = _threads(threads)
    if outs is None:
        outs = [np.empty(t.R, np.float32) for t in tensors]
    else:
        if not isinstance(outs, (list, tuple)) or len(outs) != len(tensors):
            raise QggufError(f"outs must be a list of {len(tensors)} arrays (one per tensor)")
        outs = [_out(f"outs[{i}]", o, (t.R,), (x,)) for i, (o, t) in enumerate(zip(outs, tensors))]
        for i in range(len(outs)):
            for j in range(i):
                if np.may_share_memory(outs[i], outs[j]):
                    raise QggufError(f"outs[{i}] overlaps outs[{j}]")
    return list(tensors), x, outs, n


def matvec_multi(tensors, x, threads: int = 1, outs=None) -> list[np.ndarray]:
    """``[W x for W in tensors]`` for AQ/VQ tensors of the same C, in one native call (one parallel job: the
    input tables of all tensors, then the rows of all tensors). Results are bit-identical to
    ``t.matvec(x, threads)`` per tensor. ``outs``: optional float32 output arrays (one per tensor)."""
    tensors, x, outs, n = _multi_args(tensors, x, outs, threads)
    BoundMatvec(tensors, x, outs, n)()
    return outs


class BoundMatvec:
    """``outs[i] = tensors[i] @ x`` on fixed arrays, with the pointers computed (and the arguments checked) once:
    each call is one native call (the decoder's per-token path). ``x`` and ``outs`` must be float32 arrays that
    stay alive and in place (their contents may change between calls): x C-contiguous float32 of shape (C,),
    each out a writable float32 array of shape (R_i,) not overlapping x or another out."""

    def __init__(self, tensors, x, outs, threads: int = 1):
        x = _array("x", x)
        if x.dtype != np.float32 or not x.flags.c_contiguous or not x.flags.aligned:
            raise QggufError("x must be an aligned, C-contiguous float32 array (it is read in place at each call)")
        if outs is None:
            raise QggufError("outs must be given (the arrays each call writes)")
        tensors, _, outs, n = _multi_args(tensors, x, outs, threads)
        self.tensors, self.x, self.outs, self.threads = tensors, x, outs, n
        self._lib = tensors[0]._lib
        self._keep = [_ffi.from_buffer(x, require_writable=False)] + [_ffi.from_buffer(o) for o in outs]
        self._ts = _ffi.new("const qg_tensor *[]", [t._t for t in tensors])
        self._ys = _ffi.new("float *[]", [_ffi.cast("float *", k) for k in self._keep[1:]])
        self._x = _ffi.cast("const float *", self._keep[0])
        self._n = len(tensors)
        if self._n == 1:
            t0, px, py, fn = tensors[0]._t, self._x, self._ys[0], self._lib.qg_matvec
            self._call = lambda: fn(t0, px, py, n)
        else:
            ts, ys, k, fn = self._ts, self._ys, self._n, self._lib.qg_matvec_multi
            self._call = lambda: fn(ts, k, self._x, ys, n)

    def __call__(self) -> None:
        if self._call() != 0:
            raise QggufError(f"matvec: {_ffi.string(self._lib.qg_last_error()).decode()}")


__all__ += ["matvec_multi", "BoundMatvec"]


class BoundDenseMatvec:
    """``out = W @ x`` for a dense float32 W (R x C) on fixed arrays, over the native thread pool with the current
    ISA's float micro-kernel (the decoder's dense output matrix; torch.mv runs it on one thread). Pointers are
    computed and the arguments checked once; W, x and out must stay alive and in place. Sums in another order
    than numpy/torch (rounding-level differences)."""

    def __init__(self, W, x, out, threads: int = 1):
        self._lib = _require()
        W, x, out = _array("W", W), _array("x", x), _array("out", out)
        for name, a in (("W", W), ("x", x), ("out", out)):
            if a.dtype != np.float32 or not a.flags.c_contiguous or not a.flags.aligned:
                raise QggufError(f"{name} must be an aligned, C-contiguous float32 array")
        if W.ndim != 2 or x.shape != (W.shape[1],) or out.shape != (W.shape[0],):
            raise QggufError(f"shapes do not match: W {W.shape}, x {x.shape}, out {out.shape}")
        if not out.flags.writeable:
            raise QggufError("out must be writable")
        if np.may_share_memory(out, x) or np.may_share_memory(out, W):
            raise QggufError("out must not overlap W or x")
        n = _threads(threads)
        self.W, self.x, self.out = W, x, out
        keep = [_ffi.from_buffer(W, require_writable=False), _ffi.from_buffer(x, require_writable=False),
                _ffi.from_buffer(out)]
        self._keep = keep
        pw, px, py = (_ffi.cast("const float *", keep[0]), _ffi.cast("const float *", keep[1]),
                      _ffi.cast("float *", keep[2]))
        R, C, fn = W.shape[0], W.shape[1], self._lib.qg_dense_matvec
        self._call = lambda: fn(pw, R, C, px, py, n)

    def __call__(self) -> None:
        if self._call() != 0:
            raise QggufError(f"dense matvec: {_ffi.string(self._lib.qg_last_error()).decode()}")


__all__ += ["BoundDenseMatvec"]


def decode_attention(qk, v, cos, sin, K, V, pos: int, n_head: int, scale: float, round16: bool = True,
                     threads: int = 1, out=None) -> np.ndarray:
    """One decoding token's attention, as the runner's single-token path computes it (qg_decode_attn):
    rope (adjacent pairs over whole heads) of q and k in place in ``qk`` = [q (n_head*dk) | k (n_kv*dk)],
    ``K[:, pos] = k``, ``V[:, pos] = v`` (fp16-rounded when ``round16``), then per query head h
    ``softmax(scale * q_h . K[h//G, :pos+1]) . V[h//G, :pos+1]`` (q and the probabilities fp16-rounded when
    ``round16``). ``K`` (n_kv, cap, dk) and ``V`` (n_kv, cap, dv) are float32 caches written in place; ``cos``/``sin``
    hold the position's dk/2 angles. Returns ``out`` float32 (n_head*dv)."""
    _require()
    H = _int("n_head", n_head, 1, 4096)
    for name, arr in (("qk", qk), ("v", v), ("cos", cos), ("sin", sin), ("K", K), ("V", V)):
        arr = _array(name, arr)
        if arr.dtype != np.float32 or not arr.flags.c_contiguous or not arr.flags.aligned:
            raise QggufError(f"{name} must be an aligned, C-contiguous float32 array")
    for name, arr in (("qk", qk), ("K", K), ("V", V)):
        if not arr.flags.writeable:
            raise QggufError(f"{name} must be writable (it is updated in place)")
    if K.ndim != 3 or V.ndim != 3 or K.shape[:2] != V.shape[:2]:
        raise QggufError(f"K and V must be (n_kv, cap, d) with the same n_kv and cap, got {K.shape} and {V.shape}")
    Hkv, cap, dk = K.shape
    dv = V.shape[2]
    if H % Hkv:
        raise QggufError(f"n_head={H} is not a multiple of the cache's {Hkv} kv heads")
    if dk % 2:
        raise QggufError(f"head size {dk} must be even (rope pairs)")
    if qk.shape != ((H + Hkv) * dk,) or v.shape != (Hkv * dv,):
        raise QggufError(f"qk must have shape ({(H + Hkv) * dk},) and v ({Hkv * dv},), got {qk.shape} and {v.shape}")
    if cos.shape != (dk // 2,) or sin.shape != (dk // 2,):
        raise QggufError(f"cos and sin must have shape ({dk // 2},)")
    pos = _int("pos", pos, 0, cap - 1)
    n = _threads(threads)
    a = _out("out", out, (H * dv,), (qk, v, K, V))
    rc = _lib.qg_decode_attn(_fptr(qk), _fptr(v), _fptr(cos), _fptr(sin), _fptr(K), _fptr(V), _fptr(a), H, Hkv,
                             dk, dv, pos, cap, float(scale), 1 if round16 else 0, n)
    if rc != 0:
        raise QggufError(f"decode_attention: {_ffi.string(_lib.qg_last_error()).decode()}")
    return a


__all__ += ["decode_attention"]


# ---------------------------------------------------------------- VQ
_TYPE_VQ = 1


@dataclass(frozen=True)
class VQParams:
    """The checked parameters of a VQ tensor and what follows from them (shared by :class:`VQTensor` and the
    CUDA path's ``CudaVQTensor``, which passes its narrower bounds)."""
    v: int
    k: int
    kr: int
    R: int
    C: int
    n_out: int
    groups: int

    @property
    def nc(self) -> int:            # columns of the main codebook groups (the outlier columns come first)
        return self.C - self.n_out

    @property
    def gs(self) -> int:            # columns per codebook group
        return -(-self.nc // self.groups)

    @property
    def nb(self) -> int:            # vector rows
        return self.R // self.v

    @property
    def kbits(self) -> int:
        return self.k.bit_length() - 1

    @property
    def rbits(self) -> int:
        return self.kr.bit_length() - 1 if self.kr else 0


def vq_params(*, v, k, kr, R, C, n_out, groups, max_rows: int = 1 << 40, max_cols: int = 1 << 31) -> VQParams:
    """Check a VQ tensor's parameters (docs/FORMAT.md "VQ tensors"): a clear :class:`QggufError` for each bad one."""
    v = _int("v", v, 2, 16)
    if v not in (2, 4, 8, 16):
        raise QggufError(f"vector length v must be 2, 4, 8 or 16, got {v}")
    k = _int("k", k, 4, 65536)
    kr = _int("kr", kr, 0, 65536)
    if k & (k - 1) or (kr and kr & (kr - 1)) or kr == 1:
        raise QggufError(f"k={k} and kr={kr} must be powers of two (kr=0: no residual)")
    R = _int("R", R, 1, max_rows)
    C = _int("C", C, 1, max_cols)
    if R % v:
        raise QggufError(f"R={R} is not a multiple of v={v}")
    if R * C >= _MAX_ELEMS:
        raise QggufError(f"tensor too large: R={R}, C={C}")
    n_out = _int("n_out", n_out, 0, C - 1)
    G = _int("groups", groups, 1, max(1, C - n_out))
    return VQParams(v, k, kr, R, C, n_out, G)


class VQTensor:
    """A VQ (VPTQ-style vector-quantized) weight of R output rows and C input columns, kept packed
    (qgguf.gguf_types.vq, docs/FORMAT.md "VQ tensors"): the kernels decode the bit-packed index streams
    on the fly. ``idx``/``ridx``: the packed uint8 streams (with their 3 padding bytes), kept by reference;
    ``books`` [G, k, v], ``rbooks`` [G, kr, v] (or None), ``obook`` [k, v] (or None when n_out = 0), float16
    or float32, converted to float32 copies; ``perm`` integer [C] (a permutation); ``colscale``/``colbias``
    float [C]."""

    def __init__(self, idx, books, perm, colscale, colbias, *, v, k, R, C, ridx=None, rbooks=None, kr=0,
                 obook=None, n_out=0, groups=1):
        lib = _require()
        P = vq_params(v=v, k=k, kr=kr, R=R, C=C, n_out=n_out, groups=groups)
        v, k, kr, R, C, n_out, G = P.v, P.k, P.kr, P.R, P.C, P.n_out, P.groups
        nc, gs, nb, kbits, rbits = P.nc, P.gs, P.nb, P.kbits, P.rbits

        def stream(name, a, n, bits):
            a = _array(name, a)
            if a.dtype != np.uint8 or a.ndim != 1 or not a.flags.c_contiguous:
                raise QggufError(f"{name} must be a flat C-contiguous uint8 array (the packed stream)")
            need = (n * bits + 7) // 8 + 3
            if a.size != need:
                raise QggufError(f"{name} must have {need} bytes ({n} indices of {bits} bits + 3 padding), "
                                 f"got {a.size}")
            return a

        def floats(name, a, shape):
            a = _array(name, a)
            if a.dtype not in (np.float16, np.float32):
                raise QggufError(f"{name} must be float16 or float32, got {a.dtype}")
            if a.shape != shape:
                raise QggufError(f"{name} must have shape {shape}, got {a.shape}")
            a32 = np.ascontiguousarray(a, dtype=np.float32)
            if not np.isfinite(a32).all():
                raise QggufError(f"{name} contains NaN or infinite values")
            return a32

        idx = stream("idx", idx, nb * C, kbits)
        if kr:
            if ridx is None or rbooks is None:
                raise QggufError("kr > 0 needs ridx and rbooks")
            ridx = stream("ridx", ridx, nb * nc, rbits)
            rb32 = floats("rbooks", rbooks, (G, kr, v))
        else:
            if ridx is not None or rbooks is not None:
                raise QggufError("ridx/rbooks given but kr=0")
            rb32 = None
        b32 = floats("books", books, (G, k, v))
        if n_out:
            if obook is None:
                raise QggufError("n_out > 0 needs obook")
            ob32 = floats("obook", obook, (k, v))
        else:
            ob32 = None
        perm = _array("perm", perm)
        if perm.dtype.kind not in "iu" or perm.shape != (C,):
            raise QggufError(f"perm must be an integer array of shape ({C},)")
        p32 = np.ascontiguousarray(perm, dtype=np.int32)
        seen = np.zeros(C, bool)
        if perm.size and (int(perm.min()) < 0 or int(perm.max()) >= C):
            raise QggufError(f"perm must be a permutation of 0..{C - 1}")
        seen[p32] = True
        if not seen.all():
            raise QggufError(f"perm must be a permutation of 0..{C - 1}")
        s32 = floats("colscale", colscale, (C,))
        bi32 = floats("colbias", colbias, (C,))
        self.v, self.k, self.kr, self.R, self.C, self.n_out, self.groups = v, k, kr, R, C, n_out, G
        self.shape = (R, C)
        self._arrays = [a for a in (idx, ridx, b32, rb32, ob32, p32, s32, bi32) if a is not None]
        keep = {}

        def ptr(a, ctype):
            keep[id(a)] = _ffi.from_buffer(a)
            return _ffi.cast(ctype, keep[id(a)])

        side = _ffi.new("qg_vq_side *")
        side.rbooks = ptr(rb32, "const float *") if rb32 is not None else _ffi.NULL
        side.obook = ptr(ob32, "const float *") if ob32 is not None else _ffi.NULL
        side.perm = ptr(p32, "const int32_t *")
        side.colbias = ptr(bi32, "const float *")
        t = _ffi.new("qg_tensor *")
        t.type = _TYPE_VQ
        t.M, t.B, t.R, t.C = v, kbits, R, C
        t.g = next(u for u in (64, 32, 16, 8, 4, 2, 1) if C % u == 0)
        t.codes = ptr(idx, "const void *")
        t.codebooks = ptr(b32, "const float *")
        t.scales = ptr(s32, "const float *")
        t.aux0 = ptr(ridx, "const void *") if ridx is not None else _ffi.NULL
        t.aux1 = side
        for i, val in enumerate((k, rbits, kr, n_out, G, gs)):
            t.iparam[i] = val
        self._keep = (keep, side)
        self._t = t
        self._lib = lib

    def __repr__(self) -> str:
        return (f"VQTensor(v={self.v}, k={self.k}, kr={self.kr}, n_out={self.n_out}, groups={self.groups}, "
                f"R={self.R}, C={self.C})")

    @property
    def nbytes(self) -> int:
        """Bytes the kernels read (packed indices, float32 codebooks, permutation, norms)."""
        return int(sum(a.nbytes for a in self._arrays))

    _check = AQTensor._check
    dequantize = AQTensor.dequantize
    matvec = AQTensor.matvec
    matmul = AQTensor.matmul


__all__ += ["VQTensor"]
