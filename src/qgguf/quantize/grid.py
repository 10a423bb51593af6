"""Per-type quantization grids for error-feedback methods (GPTQ, QuantEase, ...).

Every standard quantized type of the registry (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, Q4_K,
Q5_K, Q6_K) stores, for each weight, an integer code ``k`` and a per-block (or per-sub-block) affine map.
Once the scales of a block are fixed, the value of every weight of the block is

    value = A * LEVELS[k] + B          (float32, in exactly the order ggml dequantizes)

where ``A`` is the weight's effective scale (``d`` for the legacy types, ``d*scales[s]`` for the k-quants,
``d*(scales[s]-32)`` for Q3_K), ``B`` its offset (``m`` for Q4_1/Q5_1, ``-(dmin*mins[s])`` for
Q2_K/Q4_K/Q5_K, 0 otherwise) and ``LEVELS`` the type's code table (``k - 8`` for Q4_0, ``k`` for Q4_K,
``KVALUES_IQ4NL[k]`` for IQ4_NL, ...). The values computed here are bit-identical to
``qtype.dequantize(qtype.pack(fields))`` (``x - y == x + (-y)`` and products commute in IEEE arithmetic).

An error-feedback method walks over the input columns of a weight matrix ``W`` (rows x ncols). It needs:

* :func:`choose_scales(qtype, w_block_cols, importance)`: for the current (error-updated) weights of one
  block-column group (all rows x ``block_size`` consecutive columns), choose the scales/mins exactly as the
  type stores them. This runs the type's own llama.cpp search (``qtype.quantize`` with the importance
  vector: ``quantize_row_X_impl`` for the k-quants, with sub-block scales/mins quantized to their 4/6/8-bit
  codes against the fp16 super-scales, bit-exact with llama.cpp) on the block and keeps the scales it
  stored. Returns a :class:`ScaleState`.
  (One difference to llama.cpp: the legacy importance searches use the variance of the whole row,
  here of the block's 32 values, since only the block is known at that point.)
* :func:`project(column_values, state, j)`: round one column (column ``j`` of the block) onto that fixed
  grid, to the *nearest* grid value (exact: the candidates next to the rounding estimate are compared),
  returning the field codes and the float32 dequantized values.
* :class:`LayerGrid`: all codes and scales of one matrix, filled block by block and column by column, with
  :meth:`LayerGrid.fields` / :meth:`LayerGrid.pack` (the type's ``fields`` and bytes) and
  :meth:`LayerGrid.values` (equal to ``qtype.dequantize(pack())``).

Internally codes are stored as a non-negative index ``k`` into ``LEVELS``; the field code ``q`` is ``k``
for all types but Q8_0, whose int8 field is ``k - 128``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np

from ..errors import QggufError
from ..gguf_types.legacy import KVALUES_IQ4NL

_jit = numba.njit(cache=True, nogil=True, error_model="numpy")
_jit_inline = numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")


# ------------------------------------------------------------------------------------------------
# type table
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridSpec:
    name: str
    block_size: int            # weights per block (32) or super-block (256): scales are chosen per block
    sub: int                   # weights per scale (sub-block): 32, 16
    nlevels: int               # codes k = 0 .. nlevels-1
    levels: np.ndarray = field(repr=False)   # float32 (nlevels,): LEVELS[k]
    uniform: bool              # LEVELS[k] = k - center
    center: int                # code offset of the uniform table
    field_offset: int          # field q = k + field_offset
    scale_fields: tuple[str, ...]     # the non-code fields, in ``fields()`` order
    has_offset: bool           # B != 0


def _uni(n: int, center: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) - center).astype(np.float32)


SPECS: dict[str, GridSpec] = {
    "Q8_0": GridSpec("Q8_0", 32, 32, 256, _uni(256, 128), True, 128, -128, ("d",), False),
    "Q4_0": GridSpec("Q4_0", 32, 32, 16, _uni(16, 8), True, 8, 0, ("d",), False),
    "Q4_1": GridSpec("Q4_1", 32, 32, 16, _uni(16, 0), True, 0, 0, ("d", "m"), True),
    "Q5_0": GridSpec("Q5_0", 32, 32, 32, _uni(32, 16), True, 16, 0, ("d",), False),
    "Q5_1": GridSpec("Q5_1", 32, 32, 32, _uni(32, 0), True, 0, 0, ("d", "m"), True),
    "IQ4_NL": GridSpec("IQ4_NL", 32, 32, 16, KVALUES_IQ4NL.astype(np.float32), False, 0, 0, ("d",), False),
    "Q2_K": GridSpec("Q2_K", 256, 16, 4, _uni(4, 0), True, 0, 0, ("d", "dmin", "scales", "mins"), True),
    "Q3_K": GridSpec("Q3_K", 256, 16, 8, _uni(8, 4), True, 4, 0, ("d", "scales"), False),
    "Q4_K": GridSpec("Q4_K", 256, 32, 16, _uni(16, 0), True, 0, 0, ("d", "dmin", "scales", "mins"), True),
    "Q5_K": GridSpec("Q5_K", 256, 32, 32, _uni(32, 0), True, 0, 0, ("d", "dmin", "scales", "mins"), True),
    "Q6_K": GridSpec("Q6_K", 256, 16, 64, _uni(64, 32), True, 32, 0, ("d", "scales"), False),
}

GRID_TYPES = list(SPECS)


def supports(qtype) -> bool:
    """Whether ``qtype`` (a QuantType or a name) has a grid here."""
    name = qtype if isinstance(qtype, str) else qtype.name
    return name.upper() in SPECS


def spec_of(qtype) -> GridSpec:
    name = qtype if isinstance(qtype, str) else qtype.name
    try:
        return SPECS[name.upper()]
    except KeyError:
        raise QggufError(f"type {name} has no quantization grid for error-feedback methods "
                         f"(supported: {', '.join(SPECS)})") from None


def _qtype(qtype):
    if isinstance(qtype, str):
        from ..gguf_types import get
        return get(qtype)
    return qtype


def affine(name: str, f) -> tuple[np.ndarray, np.ndarray]:
    """Per-weight ``A`` and ``B`` (float32, (rows, nb*block_size)) of type ``name``'s scale fields ``f``
    (arrays (rows, nb) / (rows, nb, nsub)), computed as the type's ``values()`` computes them."""
    sp = SPECS[name]
    d = np.asarray(f["d"]).astype(np.float32)
    rows, nb = d.shape
    if sp.block_size == 32:
        A = d
        B = np.asarray(f["m"]).astype(np.float32) if sp.has_offset else np.zeros_like(d)
        rep = 32
    else:
        sc = np.asarray(f["scales"])
        if name == "Q3_K":
            A = d[..., None] * (sc.astype(np.int32) - 32).astype(np.float32)
        else:
            A = d[..., None] * sc.astype(np.float32)
        if sp.has_offset:
            dm = np.asarray(f["dmin"]).astype(np.float32)
            B = -(dm[..., None] * np.asarray(f["mins"]).astype(np.float32))
        else:
            B = np.zeros_like(A)
        rep = sp.sub
    A = np.repeat(A.reshape(rows, -1), rep, axis=1)
    B = np.repeat(B.reshape(rows, -1), rep, axis=1)
    return np.ascontiguousarray(A, dtype=np.float32), np.ascontiguousarray(B, dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# nearest grid value (numba)
# ------------------------------------------------------------------------------------------------
@_jit_inline
def _nearest(x, a, b, levels, uniform, center, kmax):
    """Index k of the grid value ``a*levels[k] + b`` (float32) nearest to ``x`` and that value."""
    if uniform:
        if a == np.float32(0.0) or not np.isfinite(x):
            k = min(max(center, 0), kmax)
            return k, a * levels[k] + b
        t = (x - b) / a
        lo = np.float64(-center - 1)
        hi = np.float64(kmax - center + 1)
        if t < lo:
            t = lo
        if t > hi:
            t = hi
        k0 = np.int64(np.rint(t)) + center
        k0 = min(max(k0, 0), kmax)
        best_k = k0
        best_v = a * levels[k0] + b
        best_e = abs(x - best_v)
        if k0 > 0:
            v = a * levels[k0 - 1] + b
            e = abs(x - v)
            if e < best_e:
                best_k, best_v, best_e = k0 - 1, v, e
        if k0 < kmax:
            v = a * levels[k0 + 1] + b
            e = abs(x - v)
            if e < best_e:
                best_k, best_v, best_e = k0 + 1, v, e
        return best_k, best_v
    best_k = 0
    best_v = a * levels[0] + b
    best_e = abs(x - best_v)
    if not np.isfinite(x):
        return best_k, best_v
    for k in range(1, kmax + 1):
        v = a * levels[k] + b
        e = abs(x - v)
        if e < best_e:
            best_k, best_v, best_e = k, v, e
    return best_k, best_v


@_jit
def _project_1d(x, A, B, levels, uniform, center, kmax, codes, vals):
    for i in range(x.shape[0]):
        k, v = _nearest(x[i], A[i], B[i], levels, uniform, center, kmax)
        codes[i] = k
        vals[i] = v


@_jit
def _project_2d(x, A, B, levels, uniform, center, kmax, codes, vals):
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            k, v = _nearest(x[i, j], A[i, j], B[i, j], levels, uniform, center, kmax)
            codes[i, j] = k
            vals[i, j] = v


def project_values(spec: GridSpec, x: np.ndarray, A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest grid values for any array ``x`` with per-element ``A``/``B`` (same shape, float32):
    ``(k int16, values float32)``."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    shape = x.shape
    x2 = x.reshape(1, -1) if x.ndim != 2 else x
    A2 = np.asarray(A, np.float32).reshape(x2.shape)
    B2 = np.asarray(B, np.float32).reshape(x2.shape)
    codes = np.empty(x2.shape, np.int16)
    vals = np.empty(x2.shape, np.float32)
    _project_2d(x2, A2, B2, spec.levels, spec.uniform, spec.center, spec.nlevels - 1, codes, vals)
    return codes.reshape(shape), vals.reshape(shape)


# ------------------------------------------------------------------------------------------------
# scales of one block-column group
# ------------------------------------------------------------------------------------------------
@dataclass
class ScaleState:
    """The scales of one block-column group of a matrix (all rows), as the type stores them.

    ``fields``: the type's scale fields for this block, shapes (rows,) for ``d``/``dmin``/``m`` and
    (rows, nsub) for ``scales``/``mins``. ``A``/``B``: float32 (rows, block_size) per-weight affine map.
    ``codes``: the codes the type's own search chose for the block it was given (k indices, int16)."""
    fields: dict[str, np.ndarray]
    A: np.ndarray
    B: np.ndarray
    codes: np.ndarray | None = None


def choose_scales(qtype, w_block_cols: np.ndarray, importance: np.ndarray | None = None) -> ScaleState:
    """Scales/mins of one block-column group (rows x block_size, the current weights), chosen by the
    type's llama.cpp search (importance-weighted when ``importance`` (block_size,) is given)."""
    qt = _qtype(qtype)
    sp = spec_of(qt)
    wb = np.ascontiguousarray(w_block_cols, dtype=np.float32)
    if wb.ndim != 2 or wb.shape[1] != sp.block_size:
        raise QggufError(f"{sp.name} scales are chosen for blocks of {sp.block_size} columns, got {wb.shape}")
    imp = None
    if importance is not None:
        imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    f = qt.unpack(qt.quantize(wb, imp))
    return state_from_fields(sp.name, f, block=0)


def state_from_fields(name: str, f, block: int = 0) -> ScaleState:
    """The :class:`ScaleState` of block ``block`` of unpacked fields ``f`` (shapes (rows, nb, ...))."""
    sp = SPECS[name]
    sf = {k: np.asarray(f[k])[:, block:block + 1] for k in sp.scale_fields}
    A, B = affine(name, sf)
    q = np.asarray(f["q"])[:, block].astype(np.int16) - np.int16(sp.field_offset)
    return ScaleState({k: v[:, 0] for k, v in sf.items()}, A, B, q.astype(np.int16))


def project(column_values: np.ndarray, state: ScaleState, j: int, spec: GridSpec | str | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Round one column (column ``j`` of the block whose scales are ``state``) onto the fixed grid.

    Returns ``(codes, values)``: the field codes (as the type's ``q`` field: int8 for Q8_0, uint8
    otherwise) and the float32 dequantized values (equal to what llama.cpp will compute)."""
    if spec is None:
        raise QggufError("project() needs the grid spec (or type name)")
    sp = SPECS[spec.upper()] if isinstance(spec, str) else spec
    x = np.asarray(column_values)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    codes = np.empty(x.shape[0], np.int16)
    vals = np.empty(x.shape[0], np.float32)
    _project_1d(x, np.ascontiguousarray(state.A[:, j]), np.ascontiguousarray(state.B[:, j]), sp.levels,
                sp.uniform, sp.center, sp.nlevels - 1, codes, vals)
    q = codes + sp.field_offset
    return q.astype(np.int8 if sp.field_offset else np.uint8), vals


# ------------------------------------------------------------------------------------------------
# a whole matrix
# ------------------------------------------------------------------------------------------------
class LayerGrid:
    """Codes and scales of one (rows x ncols) matrix of type ``qtype``, filled block by block.

    ``A``, ``B``: float32 (rows, ncols) per-weight affine maps; ``k``: int16 (rows, ncols) level indices;
    ``scale``: the scale fields, arrays (rows, nb) / (rows, nb, nsub); ``chosen``: bool (nb,) blocks whose
    scales are set."""

    def __init__(self, qtype, rows: int, ncols: int):
        self.qtype = _qtype(qtype)
        self.spec = sp = spec_of(self.qtype)
        if ncols % sp.block_size:
            raise QggufError(f"rows of {ncols} values do not divide into {sp.name} blocks of {sp.block_size}")
        self.rows, self.ncols = rows, ncols
        self.nb = nb = ncols // sp.block_size
        self.A = np.zeros((rows, ncols), np.float32)
        self.B = np.zeros((rows, ncols), np.float32)
        self.k = np.zeros((rows, ncols), np.int16)
        nsub = sp.block_size // sp.sub
        self.scale: dict[str, np.ndarray] = {}
        for name in sp.scale_fields:
            if name in ("d", "dmin", "m"):
                self.scale[name] = np.zeros((rows, nb), np.float16)
            elif sp.name == "Q6_K":
                self.scale[name] = np.zeros((rows, nb, nsub), np.int8)
            else:
                self.scale[name] = np.zeros((rows, nb, nsub), np.uint8)
        self.chosen = np.zeros(nb, bool)

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_fields(cls, qtype, f) -> "LayerGrid":
        """A grid holding unpacked fields ``f`` (as ``qtype.unpack`` returns them)."""
        qt = _qtype(qtype)
        sp = spec_of(qt)
        q = np.asarray(f["q"])
        rows, nb = q.shape[:2]
        g = cls(qt, rows, nb * sp.block_size)
        for name in sp.scale_fields:
            g.scale[name][...] = np.asarray(f[name])
        g.A[...], g.B[...] = affine(sp.name, f)
        g.k[...] = (q.reshape(rows, -1).astype(np.int16) - np.int16(sp.field_offset))
        g.chosen[:] = True
        return g

    @classmethod
    def from_quantize(cls, qtype, w: np.ndarray, importance: np.ndarray | None = None) -> "LayerGrid":
        """The type's own llama.cpp quantization of ``w`` (with ``importance``) as a grid (RTN start)."""
        qt = _qtype(qtype)
        return cls.from_fields(qt, qt.unpack(qt.quantize(w, importance)))

    def copy(self) -> "LayerGrid":
        g = LayerGrid(self.qtype, self.rows, self.ncols)
        g.A[...], g.B[...], g.k[...] = self.A, self.B, self.k
        for name, v in self.scale.items():
            g.scale[name][...] = v
        g.chosen[...] = self.chosen
        return g

    # --- scales ----------------------------------------------------------------------------------
    def cols(self, b: int) -> slice:
        bs = self.spec.block_size
        return slice(b * bs, (b + 1) * bs)

    def set_scales(self, b: int, state: ScaleState, rows: np.ndarray | None = None) -> None:
        """Store ``state`` as block ``b``'s scales (for the rows selected by the bool mask ``rows``)."""
        sl = self.cols(b)
        if rows is None:
            for name, v in state.fields.items():
                self.scale[name][:, b] = v
            self.A[:, sl] = state.A
            self.B[:, sl] = state.B
        else:
            for name, v in state.fields.items():
                self.scale[name][rows, b] = v[rows]
            self.A[rows, sl] = state.A[rows]
            self.B[rows, sl] = state.B[rows]
        self.chosen[b] = True

    def choose(self, b: int, w_block_cols: np.ndarray, importance: np.ndarray | None = None) -> ScaleState:
        """:func:`choose_scales` for block ``b`` and store the result."""
        st = choose_scales(self.qtype, w_block_cols, importance)
        self.set_scales(b, st)
        return st

    def state(self, b: int) -> ScaleState:
        sl = self.cols(b)
        return ScaleState({n: v[:, b].copy() for n, v in self.scale.items()}, self.A[:, sl].copy(),
                          self.B[:, sl].copy(), self.k[:, sl].copy())

    # --- codes -----------------------------------------------------------------------------------
    def project_col(self, x: np.ndarray, j: int) -> np.ndarray:
        """Round column ``j`` (values ``x`` for all rows) onto its block's grid, store the codes and return
        the float32 dequantized values."""
        x = np.asarray(x)
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64)
        codes = np.empty(self.rows, np.int16)
        vals = np.empty(self.rows, np.float32)
        sp = self.spec
        _project_1d(x, self.A[:, j], self.B[:, j], sp.levels, sp.uniform, sp.center, sp.nlevels - 1, codes, vals)
        self.k[:, j] = codes
        return vals

    def project_block(self, x: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest grid codes and values of ``x`` (rows, block_size) on block ``b``'s grid (not stored)."""
        sl = self.cols(b)
        return project_values(self.spec, x, self.A[:, sl], self.B[:, sl])

    def values(self) -> np.ndarray:
        """float32 (rows, ncols): the dequantized matrix (= ``qtype.dequantize(self.pack())``)."""
        return self.A * self.spec.levels[self.k] + self.B

    def fields(self) -> dict[str, np.ndarray]:
        sp = self.spec
        f = {name: v.copy() for name, v in self.scale.items()}
        q = self.k.reshape(self.rows, self.nb, sp.block_size) + np.int16(sp.field_offset)
        f["q"] = q.astype(np.int8 if sp.field_offset else np.uint8)
        return f

    def pack(self) -> np.ndarray:
        if not self.chosen.all():
            raise QggufError(f"{int((~self.chosen).sum())} blocks have no scales")
        return self.qtype.pack(self.fields())


def layer_loss(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray) -> float:
    """tr((W - W_hat) H (W - W_hat)^T) in float64: the layer's output error ||X W^T - X W_hat^T||^2."""
    D = np.asarray(W_hat, np.float64) - np.asarray(W, np.float64)
    return float(np.einsum("ij,ij->", D @ np.asarray(H, np.float64), D))


__all__ = ["GridSpec", "SPECS", "GRID_TYPES", "supports", "spec_of", "affine", "ScaleState", "choose_scales",
           "state_from_fields", "project", "project_values", "LayerGrid", "layer_loss"]
