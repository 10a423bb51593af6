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
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .ggufread import GGUFFile


def _standard_rows(g: GGUFFile) -> list[dict]:
    rows = []
    for t in g.tensors:
        gt = GGMLQuantizationType(t.ggml_type)
        n = int(np.prod(t.ne)) if t.ne else 1
        rows.append({"name": t.name, "type": gt.name, "shape": list(t.ne), "params": n,
                     "bytes": t.nbytes, "bpw": 8.0 * t.nbytes / max(1, n)})
    return rows


ROW_PROVIDERS: list[Callable[[GGUFFile], list[dict] | None]] = []


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
            "metadata": md,
        }


def format_table(info: dict) -> str:
    rows = info["tensors"]
    w = max([len(r["name"]) for r in rows] + [4])
    out = [f"{'name':<{w}}  {'type':<8} {'shape':<18} {'bytes':>12} {'bpw':>7}"]
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        out.append(f"{r['name']:<{w}}  {r['type']:<8} {shape:<18} {r['bytes']:>12,} {r['bpw']:>7.3f}")
    out.append("")
    out.append(f"file: {info['file']}  ({info['file_bytes']:,} bytes, {info['file_bytes'] / 2**20:.2f} MiB)")
    out.append(f"architecture: {info['architecture']}  name: {info['name']}  file_type: {info['file_type']}")
    out.append(f"tensors: {info['n_tensors']}  params: {info['params']:,}  "
               f"tensor bytes: {info['tensor_bytes']:,}  overall bpw: {info['bpw']:.3f}")
    out.append("bytes per type:")
    for t, d in sorted(info["bytes_per_type"].items(), key=lambda kv: -kv[1]["bytes"]):
        out.append(f"  {t:<8} {d['tensors']:>4} tensors {d['params']:>14,} params {d['bytes']:>14,} bytes "
                   f"{8.0 * d['bytes'] / max(1, d['params']):7.3f} bpw")
    return "\n".join(out)


def to_json(info: dict) -> str:
    return json.dumps(info, indent=1, default=str)
