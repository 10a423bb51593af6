"""Budgets and the allocator of mixed-precision conversions (issue 6), plus the recipe file.

Problem: every tensor ``t`` has a few candidate types ``q`` with a size ``bytes(t, q)`` (padded to the file's
alignment) and a predicted damage ``err(t, q)`` (the KL divergence the model would gain if only ``t`` were
stored as ``q``; :mod:`qgguf.quantize.sensitivity`). Pick one candidate per tensor so that the sum of the
bytes fits a budget and the sum of the errors is smallest: a multiple-choice knapsack.

:func:`allocate` solves it in two ways and keeps the better answer:

* a dynamic programme over the bytes above each tensor's cheapest candidate, counted in units of
  ``ceil(range / 65536)`` bytes, every size rounded *up* (so the answer always fits; with sizes small enough
  for units of 1 byte it is the exact optimum);
* the Lagrangian greedy: walk each tensor's lower convex hull of (bytes, error) and take the steps in order
  of error saved per byte while they fit.

Both are then "topped up" exactly in bytes: while some single-tensor change lowers the error and fits the
bytes left, the one that saves most is applied. The budget is never exceeded.

A recipe (:class:`Recipe`) is what a conversion needs to reproduce the choice: tensor -> type, the budget,
the predicted KL divergence and the measured sensitivities; ``--save-recipe``/``--recipe`` write and read it
as JSON (:func:`load_recipe`), and the file keeps a summary under ``qgguf.recipe.*`` (:func:`recipe_metadata`).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputFileError, OptionError, OutputError

RECIPE_VERSION = 1
ALIGNMENT = 32          # GGUF data alignment: every tensor's bytes are padded to it
DP_UNITS = 1 << 16      # capacity of the dynamic programme, in units


def padded(nbytes: int, align: int = ALIGNMENT) -> int:
    return (int(nbytes) + align - 1) // align * align


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}   # GGUFValueType -> bytes


def _value_bytes(value, vtype, sub_type=None) -> int:
    from gguf import GGUFValueType as V
    if vtype == V.STRING:
        return 8 + len(str(value).encode("utf-8"))
    if vtype == V.ARRAY:
        return 4 + 8 + sum(_value_bytes(v, sub_type) for v in value)
    return _SCALAR_BYTES[int(vtype)]


def kv_bytes(key: str, mv) -> int:
    """Bytes of one metadata key/value pair in a GGUF header."""
    return 8 + len(key.encode("utf-8")) + 4 + _value_bytes(mv.value, mv.vtype, mv.sub_type)


def tensor_info_bytes(name: str, ndims: int) -> int:
    """Bytes of one tensor-info record in a GGUF header (name, dims, type, offset)."""
    return 8 + len(name.encode("utf-8")) + 4 + 8 * int(ndims) + 4 + 8


def outlier_bytes(name: str, count: int) -> int:
    """Bytes of ``count`` sparse outliers of ``name`` in a file (the writer's ``plan_outliers``): the int32
    positions and float16 values, each padded, their two tensor-info records and the
    ``qgguf.tensor.NAME.outliers`` key (UINT32). Zero when ``count`` is 0 (the writer stores nothing)."""
    from .writer import OUTLIER_IDX, OUTLIER_VAL
    count = int(count)
    if count <= 0:
        return 0
    key = f"qgguf.tensor.{name}.outliers"
    return (padded(4 * count) + padded(2 * count) + tensor_info_bytes(name + OUTLIER_IDX, 1)
            + tensor_info_bytes(name + OUTLIER_VAL, 1) + 8 + len(key.encode("utf-8")) + 4 + 4)


def file_bytes(name: str, shape, qt, outliers: float = 0.0) -> int:
    """Bytes ``name`` adds to a file in type ``qt`` beyond its tensor-info record as a standard type: the data
    padded to the alignment, and for a codebook type (qgguf's AQ/VQ) every companion padded, the companions'
    tensor-info records and the ``qgguf.tensor.NAME.*`` keys, less the one record of the standard tensor (the
    header of the file this tensor goes into counts it already); with ``outliers`` (the share of the weights
    AQ keeps as sparse float16 values) also their bytes (:func:`outlier_bytes`). For standard types: the padded
    data."""
    from ..gguf_types.codebook import is_codebook
    shape = tuple(int(s) for s in shape)
    if not is_codebook(qt):
        return padded(qt.nbytes(shape))
    nb = sum(padded(c.nbytes) + tensor_info_bytes(name + c.suffix, len(c.shape)) for c in qt.companion_specs(shape))
    nb += sum(kv_bytes(k, mv) for k, mv in qt.metadata(name, shape).items())
    if outliers:
        nb += outlier_bytes(name, outlier_count(int(np.prod(shape)), outliers))
    return nb - tensor_info_bytes(name, len(shape))


def outlier_count(n_weights: int, fraction: float) -> int:
    """How many of ``n_weights`` weights a share ``fraction`` of sparse outliers keeps (AQ's
    :func:`qgguf.quantize.aq.salient_positions` takes this many)."""
    return max(0, int(round(float(fraction) * int(n_weights))))


# ------------------------------------------------------------------------------------------------
# sizes on the command line

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMgGtT]?i?[bB]?)?\s*$")
_MULT = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "t": 10**12, "tb": 10**12, "kib": 2**10, "ki": 2**10, "mib": 2**20, "mi": 2**20, "gib": 2**30, "gi": 2**30,
         "tib": 2**40, "ti": 2**40}


def parse_size(text) -> int:
    """``"60MB"`` (10^6), ``"57.8MiB"`` (2^20), ``"60606752"`` (bytes) -> bytes."""
    if isinstance(text, (int, np.integer)):
        if text <= 0:
            raise OptionError(f"--target-size {text}: must be positive")
        return int(text)
    m = _SIZE.match(str(text))
    if not m or (m.group(2) or "").lower() not in _MULT:
        raise OptionError(f"--target-size {text!r}: expected bytes or a size like 60MB, 57.8MiB, 1.2GB")
    n = int(math.floor(float(m.group(1)) * _MULT[(m.group(2) or "").lower()]))
    if n <= 0:
        raise OptionError(f"--target-size {text!r}: must be positive")
    return n


# ------------------------------------------------------------------------------------------------
# the allocator


@dataclass
class Option:
    type: str
    nbytes: int          # padded bytes in the file
    error: float         # predicted damage (KL divergence) of this tensor in this type


@dataclass
class TensorOptions:
    name: str
    options: list[Option]


@dataclass
class Allocation:
    choice: dict[str, str]            # tensor -> type
    nbytes: int                       # sum of the chosen (padded) bytes
    error: float                      # sum of the chosen errors
    budget: int
    how: str = ""                     # which solver gave the answer


def _pareto(opts: list[Option]) -> list[Option]:
    """Options by increasing bytes with strictly decreasing error (the dominated ones removed)."""
    best: list[Option] = []
    for o in sorted(opts, key=lambda o: (o.nbytes, o.error)):
        if not best or o.error < best[-1].error:
            if best and best[-1].nbytes == o.nbytes:
                best[-1] = o
            else:
                best.append(o)
    return best


def _check(tables: list[TensorOptions]) -> list[list[Option]]:
    out = []
    seen = set()
    for t in tables:
        if t.name in seen:
            raise OptionError(f"allocator: tensor {t.name} listed twice")
        seen.add(t.name)
        if not t.options:
            raise OptionError(f"allocator: tensor {t.name} has no candidate type")
        for o in t.options:
            if o.nbytes < 0 or not np.isfinite(o.error):
                raise OptionError(f"allocator: tensor {t.name} type {o.type} has bytes {o.nbytes}, error {o.error}")
        out.append(_pareto(t.options))
    return out


def _total(fr: list[list[Option]], idx: list[int]) -> tuple[int, float]:
    return (sum(f[i].nbytes for f, i in zip(fr, idx)), float(sum(f[i].error for f, i in zip(fr, idx))))


def _top_up(fr: list[list[Option]], idx: list[int], budget: int) -> list[int]:
    """Apply the single-tensor change that lowers the error most and fits the bytes left, until none does."""
    idx = list(idx)
    used = sum(f[i].nbytes for f, i in zip(fr, idx))
    while True:
        left = budget - used
        best, best_gain = None, 0.0
        for t, f in enumerate(fr):
            cur = f[idx[t]]
            for j in range(idx[t] + 1, len(f)):       # larger options only (the frontier is sorted)
                o = f[j]
                if o.nbytes - cur.nbytes > left:
                    break
                gain = cur.error - o.error
                if gain > best_gain:
                    best, best_gain = (t, j), gain
        if best is None:
            return idx
        t, j = best
        used += fr[t][j].nbytes - fr[t][idx[t]].nbytes
        idx[t] = j


def _greedy(fr: list[list[Option]], budget: int) -> list[int]:
    """Lagrangian greedy over each tensor's lower convex hull, steps by decreasing error saved per byte."""
    idx = [0] * len(fr)
    used = sum(f[0].nbytes for f in fr)
    steps = []   # (-slope, tensor, from, to)
    for t, f in enumerate(fr):
        hull = [0]
        for j in range(1, len(f)):
            while len(hull) >= 2:
                a, b = f[hull[-2]], f[hull[-1]]
                # b lies on or above the segment a -> f[j]: not on the lower hull
                if (a.error - b.error) * (f[j].nbytes - a.nbytes) <= (a.error - f[j].error) * (b.nbytes - a.nbytes):
                    hull.pop()
                else:
                    break
            hull.append(j)
        for a, b in zip(hull, hull[1:]):
            slope = (f[a].error - f[b].error) / max(1, f[b].nbytes - f[a].nbytes)
            steps.append((-slope, t, a, b))
    steps.sort()
    blocked = set()
    for _, t, a, b in steps:
        if t in blocked or idx[t] != a:
            blocked.add(t)
            continue
        extra = fr[t][b].nbytes - fr[t][a].nbytes
        if used + extra <= budget:
            idx[t] = b
            used += extra
        else:
            blocked.add(t)   # a later (flatter) step of this tensor cannot be taken before this one
    return idx


def _dp(fr: list[list[Option]], budget: int, units: int = DP_UNITS) -> list[int]:
    """Dynamic programme over the bytes above the cheapest options, sizes rounded up to whole units."""
    base = sum(f[0].nbytes for f in fr)
    room = budget - base
    span = sum(f[-1].nbytes - f[0].nbytes for f in fr)
    unit = max(1, -(-min(span, room) // units)) if room > 0 else 1
    cap = int(min(room, span) // unit)
    if cap <= 0:
        return [0] * len(fr)
    best = np.zeros(cap + 1)                        # best[c]: least error with at most c units used so far
    back = np.zeros((len(fr), cap + 1), dtype=np.int16)
    for t, f in enumerate(fr):
        new = np.full(cap + 1, np.inf)
        arg = back[t]
        for j, o in enumerate(f):
            w = -(-(o.nbytes - f[0].nbytes) // unit)
            if w > cap:
                break
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + o.error
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        best = new
    idx = [0] * len(fr)
    c = cap
    for t in range(len(fr) - 1, -1, -1):
        j = int(back[t, c])
        idx[t] = j
        c -= -(-(fr[t][j].nbytes - fr[t][0].nbytes) // unit)
    return idx


def allocate(tables: list[TensorOptions], budget: int) -> Allocation:
    """The candidate per tensor with the least total error whose total bytes are at most ``budget``."""
    fr = _check(tables)
    least = sum(f[0].nbytes for f in fr)
    if least > budget:
        raise OptionError(f"the budget of {budget:,} bytes is below the smallest possible choice "
                          f"({least:,} bytes for the tensors)")
    results = []
    for how, idx in (("dp", _dp(fr, budget)), ("greedy", _greedy(fr, budget))):
        idx = _top_up(fr, idx, budget)
        nb, err = _total(fr, idx)
        assert nb <= budget
        results.append((err, nb, how, idx))
    err, nb, how, idx = min(results, key=lambda r: (r[0], r[1]))
    return Allocation({t.name: f[i].type for t, f, i in zip(tables, fr, idx)}, nb, err, budget, how)


# ------------------------------------------------------------------------------------------------
# recipes


@dataclass
class Recipe:
    """A mixed-precision choice: ``types`` tensor -> type (every tensor the conversion quantizes)."""
    types: dict[str, str]
    mode: str = "target-size"                 # target-size | target-bpw | dynamic | file
    target: dict = field(default_factory=dict)
    method: str = ""
    compat: str = "any"
    predicted_kld: float | None = None
    tensor_kld: dict[str, float] = field(default_factory=dict)
    tensor_bytes: int = 0
    sensitivity: dict = field(default_factory=dict)   # tensor -> {alpha, ref, ref_kld, candidates: {T: [bytes, err, kld]}}
    proxy_check: dict = field(default_factory=dict)
    search_seconds: float | None = None
    source: str = ""
    version: int = RECIPE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, path) -> None:
        path = Path(path)
        if not path.parent.is_dir():
            raise OutputError("folder does not exist", path.parent)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(self.to_json())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write the recipe: {e.strerror}", path) from None

    def overrides(self) -> list[tuple[str, str]]:
        """``--tensor-type`` pairs that select exactly these types (anchored, escaped names)."""
        return [(f"^{re.escape(n)}$", t) for n, t in self.types.items()]

    def summary(self, top: int = 8) -> str:
        from collections import Counter
        cnt = Counter(self.types.values())
        lines = [f"recipe ({self.mode}, compat {self.compat}): " + ", ".join(f"{t}: {n}" for t, n in sorted(cnt.items()))]
        tgt = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in self.target.items())
        if tgt:
            lines.append(f"  budget: {tgt}; tensors {self.tensor_bytes:,} bytes")
        if self.predicted_kld is not None:
            lines.append(f"  predicted KL divergence (sum of single-tensor predictions): {self.predicted_kld:.4f}")
        if self.tensor_kld:
            worst = sorted(self.tensor_kld.items(), key=lambda kv: -kv[1])[:top]
            lines.append("  largest predicted contributions: " +
                         ", ".join(f"{n} {self.types.get(n, '?')} {v:.4f}" for n, v in worst))
        if self.proxy_check:
            pc = self.proxy_check
            lines.append(f"  proxy check: Spearman {pc.get('spearman', float('nan')):.3f} over {pc.get('pairs', 0)} "
                         "single-tensor KLD measurements")
        cb = sorted({t for t in self.types.values() if t.lower().startswith(("aq-", "vq-"))})
        if cb:
            lines.append(f"  qgguf codebook types ({', '.join(cb)}): the file needs the qgguf runner")
        if self.search_seconds is not None:
            lines.append(f"  search {self.search_seconds:.1f} s")
        return "\n".join(lines)


def load_recipe(path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise InputFileError("no such recipe file", path)
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFileError(f"not a recipe JSON file ({e})", path) from None
    if not isinstance(d, dict) or not isinstance(d.get("types"), dict) or not d["types"]:
        raise InputFileError("not a recipe file: no 'types' object (tensor -> type)", path)
    if int(d.get("version", RECIPE_VERSION)) > RECIPE_VERSION:
        raise InputFileError(f"recipe version {d.get('version')} is newer than this qgguf reads ({RECIPE_VERSION})", path)
    for k, v in d["types"].items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InputFileError(f"recipe entry {k!r}: {v!r} is not tensor name -> type name", path)
    known = {f.name for f in Recipe.__dataclass_fields__.values()}
    return Recipe(**{k: v for k, v in d.items() if k in known})


def recipe_metadata(recipe: Recipe) -> dict:
    """``qgguf.recipe.*`` keys (MetaValue) summarising the recipe (the types are the tensors' own)."""
    from gguf import GGUFValueType as V

    from .ggufread import MetaValue
    md = {
        "qgguf.recipe.version": MetaValue(RECIPE_VERSION, V.UINT32),
        "qgguf.recipe.mode": MetaValue(recipe.mode, V.STRING),
        "qgguf.recipe.compat": MetaValue(recipe.compat, V.STRING),
        "qgguf.recipe.method": MetaValue(recipe.method or "", V.STRING),
        "qgguf.recipe.target": MetaValue(json.dumps(recipe.target, sort_keys=True), V.STRING),
    }
    if recipe.predicted_kld is not None:
        md["qgguf.recipe.predicted_kld"] = MetaValue(float(recipe.predicted_kld), V.FLOAT32)
    if recipe.tensor_kld:
        names = list(recipe.tensor_kld)
        md["qgguf.recipe.tensors"] = MetaValue(names, V.ARRAY, V.STRING)
        md["qgguf.recipe.tensor_kld"] = MetaValue([float(recipe.tensor_kld[n]) for n in names], V.ARRAY, V.FLOAT32)
    return md


__all__ = ["Option", "TensorOptions", "Allocation", "allocate", "Recipe", "load_recipe", "recipe_metadata",
           "parse_size", "padded", "file_bytes", "kv_bytes", "tensor_info_bytes", "ALIGNMENT"]
