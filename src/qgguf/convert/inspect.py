"""``qgguf inspect FILE``: the tensors of a GGUF file (name, type, shape, bytes, bpw) and totals.

Rows come from :data:`ROW_PROVIDERS`: functions ``(gguf_file) -> list[dict] | None`` tried in order;
later qgguf types (codebooks stored in standard containers + ``qgguf.*`` metadata) register a provider
that describes their tensors (and may add extra columns) before the standard one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

from .ggufread import GGUFFile


def _standard_rows(g: GGUFFile) -> list[dict]:
    rows = []
    for t in g.tensors:
        gt = GGMLQuantizationType(t.ggml_type)
        n = int(np.prod(t.ne)) if t.ne else 1
        rows.append({"name": t.name, "type": gt.name, "shape": list(t.ne), "params": n,
                     "bytes": t.nbytes, "bpw": 8.0 * t.nbytes / max(1, n)})
    return rows


def qgguf_rows(g: GGUFFile) -> list[dict] | None:
    """Rows of a file with qgguf extensions (None: a plain file). A codebook tensor (AQ, ...) is one row named
    after the weight, with its type name (e.g. ``aq-2x8-g8``) as ``type``, ``family``/``config``, its GGUF shape
    ``[C, R]``, and ``bytes`` = every byte of its companions (codes, codebooks, scales), so ``bpw`` is the true
    bits per weight; sparse-outlier companions are folded into their dense tensor's row (``outliers``: count)."""
    if g.get("qgguf.version") is None:
        return None
    from ..errors import QggufError
    from ..gguf_types.codebook import codebook_tensors
    from .writer import OUTLIER_IDX, OUTLIER_VAL

    by = {t.name: t for t in g.tensors}
    cbt = codebook_tensors(g.metadata)
    owner: dict[str, str] = {}      # companion tensor -> weight name
    for name, qt in cbt.items():
        for suffix in qt.suffixes():
            if name + suffix not in by:
                raise QggufError(f"tensor {name} ({qt.name}) has no companion {name}{suffix}", g.path)
            owner[name + suffix] = name
    for n in by:
        if n.endswith((OUTLIER_IDX, OUTLIER_VAL)):
            base = n.rsplit(".", 1)[0]
            if base in by or base in cbt:
                owner[n] = base
    rows, done = [], set()
    for t in g.tensors:
        name = owner.get(t.name, t.name)
        if name in done:
            continue
        done.add(name)
        if name in cbt:
            qt = cbt[name]
            shp = g.get(f"qgguf.tensor.{name}.shape")
            shape = [int(x) for x in shp] if shp is not None else None
            nb = sum(int(by[name + s].nbytes) for s in qt.suffixes())
            if shape is None:   # from the codes: [R, M, C/g]
                ne = by[name + qt.suffixes()[0]].ne
                shape = [int(ne[-1]) * qt.block_size, int(ne[0])]
            row = {"name": name, "type": qt.name, "family": qt.family, "config": qt.name, "shape": shape}
        else:
            nb = int(t.nbytes)
            shape = list(t.ne)
            row = {"name": name, "type": GGMLQuantizationType(t.ggml_type).name, "shape": shape}
        n = int(np.prod(shape)) if shape else 1
        if name + OUTLIER_IDX in by and name + OUTLIER_VAL in by:
            row["outliers"] = int(np.prod(by[name + OUTLIER_IDX].ne))
            nb += int(by[name + OUTLIER_IDX].nbytes) + int(by[name + OUTLIER_VAL].nbytes)
        row["params"] = n
        row["bytes"] = nb
        row["bpw"] = 8.0 * nb / max(1, n)
        rows.append(row)
    return rows


# qgguf_rows is built in (tried last, before the standard rows); register_rows puts providers before it
ROW_PROVIDERS: list[Callable[[GGUFFile], list[dict] | None]] = [qgguf_rows]


def register_rows(fn: Callable[[GGUFFile], list[dict] | None]) -> None:
    ROW_PROVIDERS.insert(0, fn)


def inspect_file(path: str | Path) -> dict:
    with GGUFFile(path) as g:
        rows = None
        for fn in ROW_PROVIDERS:
            rows = fn(g)
            if rows is not None:
                break
        if rows is None:
            rows = _standard_rows(g)
        per_type: dict[str, dict] = {}
        for r in rows:
            d = per_type.setdefault(r["type"], {"tensors": 0, "params": 0, "bytes": 0})
            d["tensors"] += 1
            d["params"] += r["params"]
            d["bytes"] += r["bytes"]
        params = sum(r["params"] for r in rows)
        tbytes = sum(r["bytes"] for r in rows)
        md = {k: v.value for k, v in g.metadata.items()
              if not (isinstance(v.value, list) and len(v.value) > 16)}
        return {
            "file": str(path), "file_bytes": g.size, "architecture": g.get("general.architecture"),
            "name": g.get("general.name"), "file_type": g.get("general.file_type"),
            "n_tensors": len(rows), "params": params, "tensor_bytes": tbytes,
            "bpw": 8.0 * tbytes / max(1, params), "bytes_per_type": per_type, "tensors": rows,
            "metadata": md, "qgguf_version": g.get("qgguf.version"),
            "needs_qgguf_runner": g.get("qgguf.version") is not None,
            "recipe": _recipe(g, {r["name"]: r["type"] for r in rows}),
        }


def _recipe(g: GGUFFile, types: dict[str, str]) -> dict | None:
    """The mixed-precision recipe summary (``qgguf.recipe.*``, convert/budget.py), or None."""
    if g.get("qgguf.recipe.mode") is None:
        return None
    out = {k[len("qgguf.recipe."):]: g.get(k) for k in g.metadata if k.startswith("qgguf.recipe.")}
    names, kld = out.pop("tensors", None) or [], out.pop("tensor_kld", None) or []
    out["tensors"] = {n: {"type": types.get(n), "predicted_kld": float(v)} for n, v in zip(names, kld)}
    try:
        out["target"] = json.loads(out.get("target") or "{}")
    except ValueError:
        pass
    return out


def format_table(info: dict) -> str:
    rows = info["tensors"]
    w = max([len(r["name"]) for r in rows] + [4])
    tw = max([len(r["type"]) for r in rows] + [8])
    out = [f"{'name':<{w}}  {'type':<{tw}} {'shape':<18} {'bytes':>12} {'bpw':>7}"]
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        extra = f"  +{r['outliers']:,} outliers" if r.get("outliers") else ""
        out.append(f"{r['name']:<{w}}  {r['type']:<{tw}} {shape:<18} {r['bytes']:>12,} {r['bpw']:>7.3f}{extra}")
    out.append("")
    out.append(f"file: {info['file']}  ({info['file_bytes']:,} bytes, {info['file_bytes'] / 2**20:.2f} MiB)")
    out.append(f"architecture: {info['architecture']}  name: {info['name']}  file_type: {info['file_type']}")
    out.append(f"tensors: {info['n_tensors']}  params: {info['params']:,}  "
               f"tensor bytes: {info['tensor_bytes']:,}  overall bpw: {info['bpw']:.3f}")
    out.append("bytes per type:")
    for t, d in sorted(info["bytes_per_type"].items(), key=lambda kv: -kv[1]["bytes"]):
        out.append(f"  {t:<{tw}} {d['tensors']:>4} tensors {d['params']:>14,} params {d['bytes']:>14,} bytes "
                   f"{8.0 * d['bytes'] / max(1, d['params']):7.3f} bpw")
    rc = info.get("recipe")
    if rc:
        out.append(f"mixed-precision recipe: mode {rc.get('mode')}, compat {rc.get('compat')}, method {rc.get('method')}, "
                   f"target {rc.get('target')}")
        if rc.get("predicted_kld") is not None:
            out.append(f"  predicted KL divergence {rc['predicted_kld']:.4f} (sum over tensors); largest contributions:")
            top = sorted(rc["tensors"].items(), key=lambda kv: -kv[1]["predicted_kld"])[:10]
            for n, d in top:
                out.append(f"    {n:<{w}}  {d['type'] or '?':<{tw}} {d['predicted_kld']:.5f}")
    if info.get("needs_qgguf_runner"):
        out.append(f"qgguf extensions (qgguf.version {info.get('qgguf_version')}): this file needs the qgguf runner "
                   "(qgguf run/eval/bench, qgguf.load); stock llama.cpp will not load it")
    return "\n".join(out)


def to_json(info: dict) -> str:
    return json.dumps(info, indent=1, default=str)
