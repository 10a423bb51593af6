"""CUDA kernels for qgguf's codebook tensor types (AQ and VQ; docs/FORMAT.md), where a GPU exists.

    from qgguf.native import cuda
    cuda.available()               # False without CuPy or a CUDA GPU; cuda.unavailable_reason() says why
    t = cuda.from_companions(qt, (R, C), companions)      # or CudaAQTensor(...) / CudaVQTensor(...)
    t.dequantize(torch.float16)    # [R, C] on the GPU, bit-identical to the numpy reference (fp32; fp16: rounded)
    t.matvec(x)                    # y = W x, float32 [R]: fused kernels, the weight stays compressed
    t.matmul(X)                    # Y = X W^T, float32 [N, R]: batched fused kernels for a few tokens, else fp16
                                   # dequantization + cuBLAS

The kernels (qg_cuda.cu) are compiled at run time by NVRTC through CuPy (``cupy.RawModule``), once per
configuration and process (CuPy keeps the binaries in its kernel cache). Nothing CUDA is needed at install
time. Data lives in torch CUDA tensors; kernels get their device pointers and run on torch's current stream,
so they mix with torch ops (and CUDA graph capture) without synchronisation.

AQ matvec: ``method="lut"`` (2^8-entry codebooks) builds, per block of the grid, the lookup table of dot products
``x_group . codebook_entry`` for its chunk of input groups in shared memory and gathers it over the codes of its
rows; ``method="direct"`` (the only one for 2^16 entries) gathers the codebook entries and takes their dot
products with x; ``"auto"`` (the default) takes lut for large matrices, direct for small ones (measured on an
H100, docs/BENCHMARKS.md). VQ matvec: a warp per vector row, lanes over positions (coalesced packed-index reads),
entries gathered from the codebooks (optionally staged in shared memory: STAGE_MAX_BYTES), ``x[perm[p]] *
colscale[p]`` and the column-bias term staged per block. When the inputs are split into several chunks, each
chunk writes partial sums and a second kernel adds them (deterministic; no atomics; FIN_MAX_CHUNKS lets the
matvec kernel's last block do it instead). A tensor's launches assume one stream at a time.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from ...errors import QggufError

__all__ = ["available", "unavailable_reason", "CudaUnavailableError", "CudaAQTensor", "CudaVQTensor",
           "from_companions", "FUSED_MAX_TOKENS", "plan_aq_lut", "plan_aq_direct", "plan_vq"]

SOURCE = Path(__file__).with_name("qg_cuda.cu")
# matmul: up to this many tokens the fused kernels (batched: one launch per 8 AQ or 4 VQ tokens), above fp16
# dequantization + cuBLAS; None: per type, from the H100 measurements: 8 for AQ with M <= 2 codebooks, else 4
FUSED_MAX_TOKENS: int | None = None
_BLOCK = 256
_LUT_TABLES = 32              # lookup tables (of 256 floats) per block: 32 KiB of shared memory
_TARGET_WAVES = 4             # aim for this many blocks per multiprocessor
# Tuning constants (tools/bench_cuda.py --set NAME=VALUE; defaults from the H100 measurements in BENCHMARKS.md,
# where each alternative was slower):
FIN_MAX_CHUNKS = 0            # up to this many input chunks, the matvec kernel's last block per row block adds them
                              # (one launch); above, a second kernel (reduce_parts) does. 0: always reduce_parts
STAGE_MAX_BYTES = 0           # VQ: shared memory per block for the chunk's codebooks (0: gather from L1/L2)
VQ_UNROLL = 1                 # VQ: positions per lane whose packed indices are loaded before the gathers (1, 2, 4)
AQ_PREFETCH = 1               # AQ direct matvec, M <= 2: the first 8 codes per thread before the barrier (0: after)
AQ_LUT_MIN_WEIGHTS = 1 << 23  # AQ "auto": the LUT kernel from this many weights (R*C) up, the direct one below
AQ_LUT_MIN_WEIGHTS_M1 = 1 << 25   # the same for one codebook (its direct kernel gathers half as much)


class CudaUnavailableError(QggufError):
    """CuPy or a CUDA GPU is missing (the message says which); use the CPU path."""


_lock = threading.Lock()
_reason_cache: list = []
_modules: dict = {}


def _probe() -> str | None:
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return f"torch cannot be imported ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import cupy  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a CuPy built for another CUDA
        return f"CuPy is not usable ({type(e).__name__}: {e}); install the cupy-cudaXXx wheel of your CUDA"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except Exception as e:  # noqa: BLE001
        return f"CuPy cannot reach the GPU ({type(e).__name__}: {e})"
    if not SOURCE.is_file():
        return f"the kernel source {SOURCE} is missing"
    return None


def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run here (None: they can)."""
    with _lock:
        if not _reason_cache:
            _reason_cache.append(_probe())
        return _reason_cache[0]


def available() -> bool:
    return unavailable_reason() is None


def _require() -> None:
    r = unavailable_reason()
    if r is not None:
        raise CudaUnavailableError(f"the CUDA kernels cannot run: {r}")


# ------------------------------------------------------------------------------------------------
# compilation and launches

def _kernels(key: tuple, names: tuple[str, ...]) -> dict:
    """``{name expression: cupy.RawKernel}`` of one module holding the template instances ``names`` (plus the
    extern "C" ``reduce_parts``), compiled once per process and device."""
    import cupy
    dev = cupy.cuda.runtime.getDevice()
    k = (dev, key)
    with _lock:
        mod = _modules.get(k)
        if mod is None:
            src = SOURCE.read_text()
            try:
                m = cupy.RawModule(code=src, options=("-std=c++17",), name_expressions=names)
                mod = {n: m.get_function(n) for n in names}
                mod["reduce_parts"] = m.get_function("reduce_parts")
                mod["reduce_parts_n"] = m.get_function("reduce_parts_n")
                rt = cupy.cuda.runtime
                optin = rt.deviceGetAttribute(getattr(rt, "cudaDevAttrMaxSharedMemoryPerBlockOptin", 97), dev)
                for n, f in mod.items():
                    if ", true," in n:                   # staged codebooks: allow more than the default 48 KiB
                        f.max_dynamic_shared_size_bytes = int(optin) - 1024
            except Exception as e:  # noqa: BLE001 - cupy's CompileException and driver errors
                raise CudaUnavailableError(f"compiling {SOURCE.name} for {key} failed: {e}") from None
            _modules[k] = mod
        return mod


_ext_streams: dict = {}


def _current_stream(device) -> int:
    """torch's current stream on ``device`` as a raw handle (0: the legacy default stream)."""
    import torch
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)      # cheaper than torch.cuda.current_stream()
    return int(raw(device.index)) if raw is not None else torch.cuda.current_stream(device).cuda_stream


def _launch(kern, grid, args, shmem: int = 0, stream: int | None = None) -> None:
    """Launch ``kern`` on torch's current stream (``stream``; the legacy default stream is also CuPy's null
    stream, other streams are wrapped as CuPy external streams)."""
    import cupy
    if stream is None:
        import torch
        stream = torch.cuda.current_stream().cuda_stream
    if stream == 0:
        kern(grid, (_BLOCK,), args, shared_mem=shmem)
        return
    es = _ext_streams.get(stream)
    if es is None:
        es = _ext_streams[stream] = cupy.cuda.ExternalStream(stream)
    with es:
        kern(grid, (_BLOCK,), args, shared_mem=shmem)


def _p(t) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


_NULL, _ZERO, _ONE = np.uint64(0), np.int32(0), np.int32(1)


def _i(v) -> np.int32:
    return np.int32(int(v))


_sms_cache: dict = {}


def _sms(device) -> int:
    n = _sms_cache.get(device)
    if n is None:
        import torch
        n = _sms_cache[device] = int(torch.cuda.get_device_properties(device).multi_processor_count)
    return n


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# ------------------------------------------------------------------------------------------------
# launch plans (pure functions: unit-tested without a GPU)

def plan_aq_lut(R: int, J: int, M: int, G: int, sms: int) -> dict:
    """Grid of ``aq_matvec_lut``: ``jc`` groups per chunk (``jc*M`` tables of 256 floats), ``rpb`` rows per block
    (a multiple of 128, the rows of 32 lanes x 4), ``grid = (n_chunks, n_row_blocks)``, shared memory bytes."""
    jc = max(1, _LUT_TABLES // M)
    n_j = _cdiv(J, jc)
    n_r = max(1, min(_cdiv(_TARGET_WAVES * sms, n_j), _cdiv(R, 128)))
    rpb = _cdiv(_cdiv(R, n_r), 128) * 128
    n_r = _cdiv(R, rpb)
    return {"jc": jc, "rpb": rpb, "grid": (n_j, n_r), "vec4": int(R % 4 == 0),
            "shmem": 4 * (jc * M * 256 + jc * G)}


def plan_aq_direct(R: int, J: int, G: int, sms: int, nt: int = 1) -> dict:
    """Grid of ``aq_matvec_direct`` (``nt`` = 1) or ``aq_matmul_direct`` (``nt`` tokens): one row per thread
    (``ceil(R/256)`` row blocks), ``jc`` groups per chunk (x's slices of ``nt`` tokens within 48 KiB)."""
    n_r = _cdiv(R, _BLOCK)
    jc = max(4, _cdiv(J, max(1, _cdiv(_TARGET_WAVES * sms, n_r))))
    jc = min(jc, max(4, 12288 // (nt * G)))
    n_j = _cdiv(J, jc)
    return {"jc": jc, "grid": (n_j, n_r), "shmem": 4 * nt * jc * G}


def plan_vq(nb: int, C: int, sms: int, *, v: int = 8, k: int = 0, kr: int = 0, n_out: int = 0, gs: int = 0,
            pc: int = 256, stage_max: int | None = None) -> dict:
    """Grid of ``vq_matvec``: ``pc`` positions per chunk, ``bpb`` vector rows per block (8 warps take them in
    turn), ``grid = (n_chunks, n_row_blocks)``, shared memory bytes, and ``stage``: the codebooks that the widest
    chunk uses (``k`` main and ``kr`` residual entries of ``v`` fp16 values per book; books change every ``gs``
    positions after ``n_out`` outlier positions) fit in ``stage_max`` bytes, so blocks copy theirs to shared
    memory."""
    stage_max = STAGE_MAX_BYTES if stage_max is None else stage_max
    n_p = _cdiv(C, pc)
    base = 4 * (2 * pc + 8)
    sbytes, stage = 0, False
    if k:
        gs = gs or max(1, C - n_out)
        lo = np.arange(n_p, dtype=np.int64) * pc
        hi = np.minimum(C, lo + pc) - 1

        def book(p):
            return np.where(p < n_out, 0, int(n_out > 0) + (p - n_out) // gs)
        nbk = int((book(hi) - book(lo)).max()) + 1
        nrb = 0
        if kr:
            res = hi >= n_out
            nrb = int(np.where(res, book(hi) - book(np.maximum(lo, n_out)) + 1, 0).max())
        sbytes = 2 * v * (nbk * k + nrb * kr)
        stage = base + sbytes <= stage_max
    bpb = max(8, _cdiv(nb, max(1, _cdiv(_TARGET_WAVES * sms, n_p))))
    n_b = _cdiv(nb, bpb)
    return {"pc": pc, "bpb": bpb, "grid": (n_p, n_b), "shmem": base + (sbytes if stage else 0), "stage": stage}


# ------------------------------------------------------------------------------------------------
# helpers

def _device(device):
    import torch
    d = torch.device(device if device is not None else "cuda")
    if d.type != "cuda":
        raise QggufError(f"the CUDA kernels need a cuda device, got {d}")
    return torch.device("cuda", d.index if d.index is not None else torch.cuda.current_device())


def _to_dev(a: np.ndarray, device):
    """A device copy of ``a`` (read-only arrays, e.g. a file's mapped companions, are copied on the host first)."""
    import torch
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a).to(device)


def _as_input(x, C: int, device, what: str = "x"):
    """``x`` (numpy or torch, any device) as a contiguous float32 CUDA tensor of last dimension ``C``."""
    import torch
    if isinstance(x, torch.Tensor) and x.is_cuda and x.dtype == torch.float32 and x.shape[-1] == C and \
            x.is_contiguous() and x.device == device:
        return x
    t = torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.shape[-1] != C:
        raise QggufError(f"{what} has {t.shape[-1]} values per row, the weight has {C} columns")
    return t.to(device=device, dtype=torch.float32).contiguous()


def _out(out, shape: tuple, dtype, device):
    """``out`` (a caller's buffer, checked) or a new empty tensor."""
    import torch
    if out is None:
        return torch.empty(*shape, device=device, dtype=dtype)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype or \
            out.device != device or not out.is_contiguous():
        raise QggufError(f"out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}")
    return out


def _check_int(name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or int(v) != v or not lo <= int(v) <= hi:
        raise QggufError(f"{name}={v!r} must be an integer in {lo}..{hi}")
    return int(v)


class _CudaTensor:
    """Shared parts of the CUDA codebook tensors: ``R``, ``C``, ``device``, ``matmul``, ``nbytes``."""

    R: int
    C: int
    device = None

    def _buffers(self) -> list:
        raise NotImplementedError

    def _counters(self, n: int):
        """``n`` zeroed words for the last-block reduction (kept zero by the kernels between launches)."""
        import torch
        c = self.__dict__.get("_ctr")
        if c is None or c.numel() < n:
            c = self._ctr = torch.zeros(max(n, 1), device=self.device, dtype=torch.int32)
        return c

    def _run_matvec(self, cfg: dict, x, out):
        """One matvec launch (and reduce_parts when needed) from a cached launch configuration: the kernel, its
        grid and shared memory, its arguments before and after ``x`` and after the (part, y, counters, fin)
        quadruple, and for the LUT kernel whether 4-row stores are possible."""
        import torch
        if x.dim() != 1:
            raise QggufError(f"matvec takes one vector of {self.C} values, got shape {tuple(x.shape)}")
        y = _out(out, (self.R,), torch.float32, self.device)
        grid = cfg["grid"]
        n = grid[0]
        py = np.uint64(y.data_ptr())
        reduce = False
        if n == 1:
            part = y
            fin = (py, py, _NULL, _ZERO)
        else:
            part = torch.empty(n, self.R, device=self.device, dtype=torch.float32)
            pp = np.uint64(part.data_ptr())
            if n <= FIN_MAX_CHUNKS:
                fin = (pp, py, _p(self._counters(grid[1])), _ONE)
            else:
                fin, reduce = (pp, py, _NULL, _ZERO), True
        tail = cfg["tail"]
        if cfg.get("vec4") is not None:
            tail = tail + ((_ONE if cfg["vec4"] and part.data_ptr() % 16 == 0 else _ZERO),)
        stream = _current_stream(self.device)
        _launch(cfg["kern"], grid, cfg["pre"] + (np.uint64(x.data_ptr()),) + cfg["post"] + fin + tail, cfg["shmem"],
                stream)
        if reduce:
            _launch(cfg["red"], (_cdiv(self.R, 32),), (pp, np.int32(n), cfg["red_n"], cfg["red_scales"], py),
                    0, stream)
        return y

    @property
    def nbytes(self) -> int:
        """Bytes held on the GPU (the compressed weight)."""
        return int(sum(b.numel() * b.element_size() for b in self._buffers() if b is not None))

    _NT_MAX = 8                       # tokens per launch of the batched fused kernel

    def _fused_max_default(self) -> int:
        return 4

    def matvec(self, x, **kw):  # pragma: no cover - interface
        raise NotImplementedError

    def _matmul_small(self, X, Y) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _launch_small(self, kern, grid, shmem, args_before_part, part_tail, Y, N, scales) -> None:
        """A batched fused launch writing ``Y`` (``N`` rows of ``R``) through partial sums when it has several
        chunks, and ``reduce_parts_n``."""
        import torch
        total = N * self.R
        part = Y if grid[0] == 1 else torch.empty(grid[0], total, device=self.device, dtype=torch.float32)
        stream = _current_stream(self.device)
        _launch(kern, grid, args_before_part + (np.uint64(part.data_ptr()),) + part_tail, shmem, stream)
        if grid[0] > 1:
            _launch(self._k()["reduce_parts_n"], (_cdiv(total, 32),),
                    (np.uint64(part.data_ptr()), np.int32(grid[0]), np.int32(total), np.int32(self.R), scales,
                     np.uint64(Y.data_ptr())), 0, stream)

    def dequantize(self, dtype=None):  # pragma: no cover - interface
        raise NotImplementedError

    def matmul(self, X, fused_max: int | None = None):
        """``Y = X W^T`` float32 ``[N, R]`` for ``X`` ``[N, C]``: for ``N <= fused_max`` (default
        :data:`FUSED_MAX_TOKENS`, else 8 or 4 by type) the fused kernels (one token: :meth:`matvec`; more: the
        batched kernels, each gathered codebook entry used for every token), otherwise the weight dequantized to
        fp16 and one cuBLAS matmul (fp16 inputs and result: activations beyond 65504 would overflow)."""
        import torch
        if fused_max is None:
            fused_max = FUSED_MAX_TOKENS if FUSED_MAX_TOKENS is not None else self._fused_max_default()
        fused_max = int(fused_max)
        X = _as_input(X, self.C, self.device, "X")
        X2 = X.reshape(-1, self.C)
        N = X2.shape[0]
        if N == 1 and fused_max >= 1:
            Y = self.matvec(X2[0]).reshape(1, self.R)
        elif N <= fused_max:
            Y = torch.empty(N, self.R, device=self.device, dtype=torch.float32)
            for n0 in range(0, N, self._NT_MAX):
                n1 = min(N, n0 + self._NT_MAX)
                self._matmul_small(X2[n0:n1], Y[n0:n1])
        else:
            W = self.dequantize(torch.float16)
            Y = torch.nn.functional.linear(X2.to(torch.float16), W).to(torch.float32)
        return Y.reshape(*X.shape[:-1], self.R)


# ------------------------------------------------------------------------------------------------
# AQ

class CudaAQTensor(_CudaTensor):
    """An AQ weight (``aq-MxB-gG``) kept compressed on the GPU. ``codes`` ``[C/g, M, R]`` uint8 (B=8) or uint16
    (B=16, or their int8/int16 containers), ``codebooks`` ``[M, 2^B, g]`` (float16; other floats are rounded to
    it), ``scales`` ``[R]`` float32 or float16 (kept as float32: exact)."""

    def __init__(self, codes, codebooks, scales, *, M, B, g, R, C, device=None):
        _require()
        M = _check_int("M", M, 1, 8)
        if B not in (8, 16):
            raise QggufError(f"AQ code bits B={B!r} must be 8 or 16")
        if g not in (4, 8, 16, 32):
            raise QggufError(f"AQ group size g={g!r} must be 4, 8, 16 or 32")
        R = _check_int("R", R, 1, (1 << 31) - 1)
        C = _check_int("C", C, 1, (1 << 31) - 1)
        if C % g:
            raise QggufError(f"C={C} is not a multiple of the group size {g}")
        self.M, self.B, self.g, self.K, self.R, self.C, self.J = M, B, g, 1 << B, R, C, C // g
        self.device = _device(device)
        codes = np.ascontiguousarray(codes)
        want = np.dtype(np.uint8) if B == 8 else np.dtype("<u2")
        if codes.dtype.kind not in "iu" or codes.dtype.itemsize != want.itemsize:
            raise QggufError(f"AQ codes must be {want} (B={B}), got {codes.dtype}")
        if codes.size != self.J * M * R:
            raise QggufError(f"AQ codes have {codes.size} entries, expected C/g*M*R = {self.J * M * R}")
        cb = np.asarray(codebooks)
        if cb.size != M * self.K * g:
            raise QggufError(f"AQ codebooks have {cb.size} values, expected M*2^B*g = {M * self.K * g}")
        sc = np.asarray(scales).reshape(-1)
        if sc.size != R:
            raise QggufError(f"AQ scales have {sc.size} values, expected R = {R}")
        cb16 = np.ascontiguousarray(cb, dtype=np.float16).reshape(M, self.K, g)
        sc32 = np.ascontiguousarray(sc, dtype=np.float32)
        if not (np.isfinite(cb16).all() and np.isfinite(sc32).all()):
            raise QggufError("AQ codebooks or scales are not finite")
        self.codes = _to_dev(codes.view(want).reshape(-1).view(np.uint8), self.device)   # raw little-endian bytes
        self.codebooks = _to_dev(cb16, self.device)
        self.scales = _to_dev(sc32, self.device)
        self._cfg: dict = {}

    @classmethod
    def from_fields(cls, qt, fields, device=None) -> "CudaAQTensor":
        codes = np.asarray(fields["codes"])
        J, M, R = codes.shape
        return cls(codes.astype(qt.codes_dtype, copy=False), fields["codebooks"], fields["scales"], M=qt.M,
                   B=qt.B, g=qt.g, R=R, C=J * qt.g, device=device)

    def _buffers(self) -> list:
        return [self.codes, self.codebooks, self.scales]

    def clone(self) -> "CudaAQTensor":
        """A copy with its own device buffers (benchmarks rotate copies to keep them out of the L2 cache)."""
        c = object.__new__(CudaAQTensor)
        c.__dict__.update(self.__dict__)
        c.__dict__.pop("_ctr", None)
        c._cfg = {}                                  # launch configurations hold the buffers' pointers
        c.codes, c.codebooks, c.scales = self.codes.clone(), self.codebooks.clone(), self.scales.clone()
        return c

    def _k(self) -> dict:
        M, G = self.M, self.g
        code = "u8" if self.B == 8 else "u16"
        names = [f"aq_dequant<{M}, {G}, {code}, float>", f"aq_dequant<{M}, {G}, {code}, hbits>"]
        names += [f"aq_matvec_direct<{M}, {G}, {code}, {pre}>" for pre in ("false", "true")]
        names += [f"aq_matmul_direct<{M}, {G}, {code}, {nt}>" for nt in (2, 4, 8)]
        names = tuple(names + ([f"aq_matvec_lut<{M}, {G}>"] if self.B == 8 else []))
        return _kernels(("aq", M, self.B, G), names)

    def _fused_max_default(self) -> int:
        return 8 if self.M <= 2 else 4

    def _matmul_small(self, X, Y) -> None:
        """``Y = X W^T`` for 2..8 tokens in one batched fused launch (plus reduce_parts_n)."""
        N = X.shape[0]
        nt = 2 if N <= 2 else 4 if N <= 4 else 8
        key = ("mm", nt)
        cfg = self._cfg.get(key)
        if cfg is None:
            code = "u8" if self.B == 8 else "u16"
            pl = plan_aq_direct(self.R, self.J, self.g, _sms(self.device), nt=nt)
            cfg = self._cfg[key] = (self._k()[f"aq_matmul_direct<{self.M}, {self.g}, {code}, {nt}>"], pl)
        kern, pl = cfg
        self._launch_small(kern, pl["grid"], pl["shmem"],
                           (_p(self.codes), _p(self.codebooks), _i(self.K), _p(X), _i(N), _p(self.scales)),
                           (_i(self.R), _i(self.J), _i(pl["jc"])), Y, N, _p(self.scales))

    def dequantize(self, dtype=None, out=None):
        """The weight ``[R, C]`` as float32 or float16 (``dtype``, default float16) on the GPU (into ``out`` if
        given); float32 is bit-identical to :meth:`qgguf.gguf_types.codebook.AQType.dequantize_fields`, float16
        its rounding."""
        import torch
        dtype = torch.float16 if dtype is None else dtype
        if dtype not in (torch.float16, torch.float32):
            raise QggufError(f"dequantize to float16 or float32, not {dtype}")
        out = _out(out, (self.R, self.C), dtype, self.device)
        code = "u8" if self.B == 8 else "u16"
        k = self._k()[f"aq_dequant<{self.M}, {self.g}, {code}, {'float' if dtype == torch.float32 else 'hbits'}>"]
        _launch(k, (_cdiv(self.R, 32), _cdiv(self.J, 32)),
                (_p(self.codes), _p(self.codebooks), _p(self.scales), _p(out), _i(self.R), _i(self.J), _i(self.K)))
        return out

    def matvec(self, x, method: str | None = None, out=None):
        """``y = W x`` float32 ``[R]`` (into ``out`` if given) for ``x`` ``[C]`` (any float type or device).
        ``method``: ``"lut"``, ``"direct"`` or ``"auto"`` (B=8; default from QGGUF_CUDA_AQ_METHOD, else auto: lut
        from :data:`AQ_LUT_MIN_WEIGHTS` weights up, :data:`AQ_LUT_MIN_WEIGHTS_M1` for M=1), always ``"direct"``
        for B=16."""
        x = _as_input(x, self.C, self.device)
        method = method or os.environ.get("QGGUF_CUDA_AQ_METHOD", "auto")
        if method not in ("auto", "lut", "direct"):
            raise QggufError(f"AQ matvec method {method!r} is not auto, lut or direct")
        if method == "auto":
            method = "lut" if self.R * self.C >= (AQ_LUT_MIN_WEIGHTS_M1 if self.M == 1 else AQ_LUT_MIN_WEIGHTS) \
                else "direct"
        if self.B != 8:
            method = "direct"
        cfg = self._cfg.get(method)
        if cfg is None:
            ks = self._k()
            sms = _sms(self.device)
            code = "u8" if self.B == 8 else "u16"
            pre = "true" if AQ_PREFETCH else "false"
            if method == "lut":
                pl = plan_aq_lut(self.R, self.J, self.M, self.g, sms)
                cfg = {"kern": ks[f"aq_matvec_lut<{self.M}, {self.g}>"],
                       "pre": (_p(self.codes), _p(self.codebooks)),
                       "tail": (_i(self.R), _i(self.J), _i(pl["jc"]), _i(pl["rpb"])), "vec4": pl["vec4"]}
            else:
                pl = plan_aq_direct(self.R, self.J, self.g, sms)
                cfg = {"kern": ks[f"aq_matvec_direct<{self.M}, {self.g}, {code}, {pre}>"],
                       "pre": (_p(self.codes), _p(self.codebooks), _i(self.K)),
                       "tail": (_i(self.R), _i(self.J), _i(pl["jc"]))}
            cfg.update(grid=pl["grid"], shmem=pl["shmem"], post=(_p(self.scales),), red=ks["reduce_parts"],
                       red_n=_i(self.R), red_scales=_p(self.scales))
            self._cfg[method] = cfg
        return self._run_matvec(cfg, x, out)


# ------------------------------------------------------------------------------------------------
# VQ

class CudaVQTensor(_CudaTensor):
    """A VQ weight kept compressed on the GPU (the arguments of :class:`qgguf.native.VQTensor`): ``idx`` / ``ridx``
    the packed uint8 index streams (with their 3 padding bytes), ``books`` ``[G, k, v]``, ``rbooks`` ``[G, kr, v]``
    (``kr > 0``), ``obook`` ``[k, v]`` (``n_out > 0``), ``perm`` ``[C]`` (a permutation), ``colscale`` /
    ``colbias`` ``[C]``; codebooks and norms are float16 (other floats are rounded to it)."""

    def __init__(self, idx, books, perm, colscale, colbias, *, v, k, R, C, ridx=None, rbooks=None, kr=0,
                 obook=None, n_out=0, groups=1, device=None):
        _require()
        from .. import vq_params
        P = vq_params(v=v, k=k, kr=kr, R=R, C=C, n_out=n_out, groups=groups,
                      max_rows=(1 << 31) - 1, max_cols=(1 << 31) - 1)     # 32-bit indexing in the kernels
        v, k, kr, R, C, n_out, G = P.v, P.k, P.kr, P.R, P.C, P.n_out, P.groups
        self.v, self.k, self.kr, self.R, self.C, self.n_out, self.groups = v, k, kr, R, C, n_out, G
        self.nb, self.nc, self.gs, self.kbits, self.rbits = P.nb, P.nc, P.gs, P.kbits, P.rbits
        self.device = _device(device)

        def stream(name, a, n, bits):
            a = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
            need = (n * bits + 7) // 8 + 3
            if a.size != need:
                raise QggufError(f"VQ {name} must have {need} bytes ({n} indices of {bits} bits + 3 padding), "
                                 f"got {a.size}")
            words = np.zeros(_cdiv(a.size, 4) + 2, np.uint32)      # + 2 zero words: the 64-bit reads stay inside
            words.view(np.uint8)[:a.size] = a
            return _to_dev(words.view(np.int32), self.device)

        def f16(name, a, shape):
            a = np.asarray(a)
            if a.size != int(np.prod(shape)):
                raise QggufError(f"VQ {name} has {a.size} values, expected {int(np.prod(shape))} {tuple(shape)}")
            a16 = np.ascontiguousarray(a, dtype=np.float16).reshape(shape)
            if not np.isfinite(a16).all():
                raise QggufError(f"VQ {name} is not finite")
            return a16

        self.idx = stream("idx", idx, self.nb * C, self.kbits)
        self.ridx = stream("ridx", ridx, self.nb * self.nc, self.rbits) if kr else None
        bk = f16("books", books, (G, k, v))
        if n_out:
            if obook is None:
                raise QggufError("VQ obook is missing (n_out > 0)")
            bk = np.concatenate([f16("obook", obook, (1, k, v)), bk])
        self.books = _to_dev(bk, self.device)
        if kr:
            if rbooks is None:
                raise QggufError("VQ rbooks is missing (kr > 0)")
            self.rbooks = _to_dev(f16("rbooks", rbooks, (G, kr, v)), self.device)
        else:
            self.rbooks = None
        perm = np.asarray(perm).reshape(-1)
        if perm.size != C or perm.dtype.kind not in "iu" or not np.array_equal(np.sort(perm), np.arange(C)):
            raise QggufError(f"VQ perm must be a permutation of 0..{C - 1}")
        inv = np.empty(C, np.int32)
        inv[perm.astype(np.int64)] = np.arange(C, dtype=np.int32)
        self.perm = _to_dev(perm.astype(np.int32), self.device)
        self.inv = _to_dev(inv, self.device)
        self.colscale = _to_dev(f16("colscale", colscale, (C,)), self.device)
        self.colbias = _to_dev(f16("colbias", colbias, (C,)), self.device)
        self._cfg: dict = {}

    @classmethod
    def from_companions(cls, qt, shape, comp, device=None) -> "CudaVQTensor":
        from ...gguf_types import vq as V
        R, C = int(shape[0]), int(shape[1])
        L = qt.layout((R, C))
        return cls(comp[V.VQ_IDX], comp[V.VQ_BOOKS], comp[V.VQ_PERM], comp[V.VQ_COLSCALE], comp[V.VQ_COLBIAS],
                   v=qt.v, k=qt.k, R=R, C=C, ridx=comp[V.VQ_RIDX] if qt.kr else None,
                   rbooks=comp[V.VQ_RBOOKS] if qt.kr else None, kr=qt.kr,
                   obook=comp[V.VQ_OBOOK] if L["n_out"] else None, n_out=L["n_out"], groups=qt.groups,
                   device=device)

    def _buffers(self) -> list:
        return [self.idx, self.ridx, self.books, self.rbooks, self.perm, self.inv, self.colscale, self.colbias]

    def clone(self) -> "CudaVQTensor":
        c = object.__new__(CudaVQTensor)
        c.__dict__.update(self.__dict__)
        c.__dict__.pop("_ctr", None)
        c._cfg = {}                                  # launch configurations hold the buffers' pointers
        for n in ("idx", "ridx", "books", "rbooks", "perm", "inv", "colscale", "colbias"):
            b = getattr(self, n)
            setattr(c, n, None if b is None else b.clone())
        return c

    def _k(self) -> dict:
        V = self.v
        names = [f"vq_dequant<{V}, float>", f"vq_dequant<{V}, hbits>"]
        names += [f"vq_matvec<{V}, {st}, {u}>" for st in ("false", "true") for u in (1, 2, 4)]
        names += [f"vq_matmul<{V}, {nt}>" for nt in (2, 4)]
        return _kernels(("vq", V), tuple(names))

    def _ptrs(self) -> tuple:
        return (_p(self.idx), _i(self.kbits), _p(self.ridx if self.kr else self.idx), _i(self.rbits),
                _p(self.books), _p(self.rbooks if self.kr else self.books))

    _NT_MAX = 4

    def _matmul_small(self, X, Y) -> None:
        """``Y = X W^T`` for 2..4 tokens in one batched fused launch (plus reduce_parts_n)."""
        N = X.shape[0]
        nt = 2 if N <= 2 else 4
        key = ("mm", nt)
        cfg = self._cfg.get(key)
        if cfg is None:
            pl = plan_vq(self.nb, self.C, _sms(self.device))
            pl["shmem"] = 4 * (nt * pl["pc"] + pl["pc"] + 8 * nt)
            cfg = self._cfg[key] = (self._k()[f"vq_matmul<{self.v}, {nt}>"], pl)
        kern, pl = cfg
        self._launch_small(kern, pl["grid"], pl["shmem"],
                           self._ptrs() + (_p(self.perm), _p(self.colscale), _p(self.colbias), _p(X), _i(N)),
                           (_i(self.nb), _i(self.C), _i(self.n_out), _i(self.gs), _i(self.k), _i(self.kr),
                            _i(pl["pc"]), _i(pl["bpb"])), Y, N, _NULL)

    def dequantize(self, dtype=None, out=None):
        """The weight ``[R, C]`` as float32 or float16 (default float16) on the GPU (into ``out`` if given);
        float32 is bit-identical to :meth:`qgguf.gguf_types.vq.VQType.dequantize_fields`, float16 its rounding."""
        import torch
        dtype = torch.float16 if dtype is None else dtype
        if dtype not in (torch.float16, torch.float32):
            raise QggufError(f"dequantize to float16 or float32, not {dtype}")
        out = _out(out, (self.R, self.C), dtype, self.device)
        k = self._k()[f"vq_dequant<{self.v}, {'float' if dtype == torch.float32 else 'hbits'}>"]
        _launch(k, (_cdiv(self.C, _BLOCK), min(self.nb, 65535)),
                self._ptrs() + (_p(self.inv), _p(self.colscale), _p(self.colbias), _p(out), _i(self.nb), _i(self.C),
                                _i(self.n_out), _i(self.gs), _i(self.k), _i(self.kr)))
        return out

    def matvec(self, x, out=None):
        """``y = W x`` float32 ``[R]`` (into ``out`` if given) for ``x`` ``[C]`` (any float type or device)."""
        x = _as_input(x, self.C, self.device)
        cfg = self._cfg.get("mv")
        if cfg is None:
            ks = self._k()
            pl = plan_vq(self.nb, self.C, _sms(self.device), v=self.v, k=self.k, kr=self.kr, n_out=self.n_out,
                         gs=self.gs)
            u = VQ_UNROLL if VQ_UNROLL in (1, 2, 4) else 1
            cfg = self._cfg["mv"] = {
                "kern": ks[f"vq_matvec<{self.v}, {'true' if pl['stage'] else 'false'}, {u}>"], "grid": pl["grid"],
                "shmem": pl["shmem"], "pre": self._ptrs() + (_p(self.perm), _p(self.colscale), _p(self.colbias)),
                "post": (), "tail": (_i(self.nb), _i(self.C), _i(self.n_out), _i(self.gs), _i(self.k), _i(self.kr),
                                     _i(pl["pc"]), _i(pl["bpb"])),
                "red": ks["reduce_parts"], "red_n": _i(self.R), "red_scales": _NULL}
        return self._run_matvec(cfg, x, out)


def from_companions(qt, shape, comp, device=None):
    """The CUDA tensor of a codebook weight: ``qt`` its :class:`~qgguf.gguf_types.codebook.CodebookType`,
    ``shape`` its numpy shape ``(R, C)``, ``comp`` its companions (``{suffix: array}``, as the loader reads them)."""
    from ...gguf_types.codebook import AQ_CODEBOOKS, AQ_CODES, AQ_SCALES
    R, C = int(shape[0]), int(shape[1])
    if qt.family == "aq":
        return CudaAQTensor(np.asarray(comp[AQ_CODES]), comp[AQ_CODEBOOKS], comp[AQ_SCALES], M=qt.M, B=qt.B,
                            g=qt.g, R=R, C=C, device=device)
    if qt.family == "vq":
        return CudaVQTensor.from_companions(qt, (R, C), comp, device=device)
    raise QggufError(f"no CUDA kernels for codebook family {qt.family!r}")

