"""Mixed-precision planning for ``convert()`` (issue 6): measure, allocate, and return a :class:`Recipe`.

Three ways in:

* a budget (``target_size``: the whole file in bytes, header included; ``target_bpw``: bits per weight over
  every tensor as the conversion report counts them): every quantizable tensor may take any candidate type
  (``compat="llama.cpp"``: the llama.cpp-loadable types of :data:`~qgguf.quantize.sensitivity.STANDARD_CANDIDATES`
  whose block divides the row; ``"any"`` with a codebook method (``--method aq``, ``codebook=True``): also
  qgguf's AQ configurations :data:`~qgguf.quantize.sensitivity.AQ_CANDIDATES` for the block linears, whose
  files need the qgguf runner; the embedding/output matrix takes a standard type unless ``--tensor-type``
  pins it to an AQ configuration, e.g. ``token_embd.weight=aq-4x8-g8``);
* ``dynamic``: the plan of ``--type`` (presets' mixing rules included) is the floor; tensors are upgraded to
  larger types, the most damaging first (the allocator's optimum), until ``1 + dynamic_extra`` times the
  quantized tensors' bytes;
* ``recipe``: a recipe JSON file from ``--save-recipe``: its types, no measurement.

The measurement (:func:`qgguf.quantize.sensitivity.measure`) takes its options from ``sensitivity``: nsamples,
seqlen, kld_samples, kld_seqlen, check (``--proxy-check``), alpha_stride, aq_options, and ``aq_search``
(``"sampled"``, the default: the AQ candidates searched only in the KL divergence layers, predicted in the
others; ``"full"``: searched in every layer).

The AQ candidates keep the AQ method's sparse outliers (``aq_outliers``, its ``outliers`` option, 0.2 % of the
weights by default): their bytes (positions, values, records, keys) are in the candidates' sizes and the outliers in
their measured errors; the recipe records the share (``_calibration.aq_outliers``), ``--recipe`` converts with it and
``--sens-from`` refuses sensitivities measured with another.

Tensors pinned by ``--tensor-type`` (or ``--token-embedding-type`` / ``--output-tensor-type``) keep their type
and count as fixed bytes. The result is a set of exact per-tensor overrides for :func:`plan_types`.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np

from .. import gguf_types
from ..errors import InputFileError, OptionError
from ..gguf_types.codebook import is_codebook
from .budget import (ALIGNMENT, Recipe, allocate, load_recipe, outlier_count, padded, parse_size,
                     recipe_metadata)
from .presets import normalize_type, parse_tensor_types, plan_types

COMPAT = ("llama.cpp", "any")
_LINEAR_RX = re.compile(r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")


def is_block_linear(name: str) -> bool:
    """The tensors a codebook method (AQ) can store in its own types."""
    return bool(_LINEAR_RX.match(name))


def _base_plan(source, **kw):
    return plan_types([(t.name, t.shape) for t in source.tensors], arch=source.arch, n_layer=source.n_layer,
                      n_head=source.n_head, n_head_kv=source.n_head_kv,
                      float_source_types={t.name: t.src_type for t in source.tensors}, **kw)


def _header_bytes(source, plan, out: Path, recipe: Recipe | None, ftype, outliers: dict[str, int] | None = None) -> int:
    """Bytes before the tensor data of the file the pipeline will write (metadata and tensor infos, padded);
    ``outliers``: the sparse-outlier counts of the AQ tensors (their keys and companion records)."""
    from gguf import GGUFValueType

    from .writer import OutputFile, plan_outliers, set_outlier_keys
    probe = out.with_name(out.name + ".qgguf-probe")
    of = OutputFile(probe, source.arch)
    try:
        of.update(source.metadata)
        if ftype is not None:
            of.set("general.file_type", int(ftype), GGUFValueType.UINT32)
        of.set("general.quantization_version", 2, GGUFValueType.UINT32)
        if recipe is not None:
            of.update(recipe_metadata(recipe))
        set_outlier_keys(of, outliers or {})
        for c in plan.choices:
            of.plan_qtensor(c.name, c.shape, gguf_types.get(c.type))
            if outliers and c.name in outliers:
                plan_outliers(of, c.name, outliers[c.name])
        of.open()
        for f in (getattr(of._writer, "fout", None) or []):
            f.flush()
        n = of.tmp.stat().st_size
    finally:
        of.abort()
    return padded(n, ALIGNMENT)


def check_recipe(recipe: Recipe, source, path, codebook: bool = False) -> None:
    from ..gguf_types.codebook import is_codebook
    from ..gguf_types.tiers import is_tiered
    from ..quantize.blockwise import HEAD_TENSORS
    shapes = {t.name: tuple(t.shape) for t in source.tensors}
    for name, typ in recipe.types.items():
        if name not in shapes:
            raise InputFileError(f"recipe names tensor {name!r}, which the model does not have", path)
        try:
            qt = gguf_types.get(normalize_type(typ, "recipe type"))
        except Exception:
            raise InputFileError(f"recipe gives {name} the unknown type {typ!r}", path) from None
        if is_tiered(qt):       # row tiers: the token embedding / output matrix only, with any method
            if name not in HEAD_TENSORS:
                raise InputFileError(f"recipe gives {name} the row-tiered type {typ}, which only the token "
                                     "embedding and the output matrix take", path)
        elif is_codebook(qt):
            if not codebook:
                raise OptionError(f"recipe {path} gives {name} qgguf's codebook type {typ}: convert with --method aq")
            if not is_block_linear(name) and not (name in HEAD_TENSORS and str(qt.name).startswith("aq-")):
                raise InputFileError(f"recipe gives {name} the codebook type {typ}, which only block linears (and "
                                     "AQ configurations the embedding/output matrix) take", path)
        if not qt.fits(shapes[name][-1]):
            raise InputFileError(f"recipe gives {name} type {typ}, whose blocks do not divide rows of "
                                 f"{shapes[name][-1]}", path)


def sensitivity_from(path, free: dict, types_for, aq_outliers: float | None = None):
    """The sensitivities saved in a recipe file (``--sens-from``): a new budget without a new measurement.
    ``aq_outliers``: the AQ outlier share of this conversion (None: no AQ candidates), which must be the one the
    recipe's AQ bytes and errors were measured with."""
    from ..quantize.sensitivity import Sensitivity, TensorSensitivity
    r = load_recipe(path)
    if not r.sensitivity:
        raise InputFileError("the recipe has no sensitivities (it was not made by a measurement)", path)
    cal = r.sensitivity.get("_calibration", {})
    measured_with = float(cal.get("aq_outliers", 0.0) or 0.0)
    if aq_outliers is not None and abs(measured_with - float(aq_outliers)) > 1e-12 and any(
            str(q).startswith("aq-") for d in r.sensitivity.values() if isinstance(d, dict)
            for q in d.get("candidates", {})):
        raise OptionError(f"--sens-from {path}: its AQ candidates were measured with outliers={measured_with:g}, this "
                          f"conversion keeps outliers={float(aq_outliers):g} (pass --outliers {measured_with:g})")
    out = {}
    for name, c in free.items():
        d = r.sensitivity.get(name)
        if d is None:
            raise InputFileError(f"the recipe has no sensitivity for {name}", path)
        keep = set(types_for(name, tuple(c.shape)))
        cand = {q: v for q, v in d["candidates"].items() if q in keep}
        if not cand:
            raise InputFileError(f"the recipe has none of the candidate types of {name}", path)
        ts = TensorSensitivity(name, tuple(c.shape), {q: int(v[0]) for q, v in cand.items()},
                               {q: float(v[1]) for q, v in cand.items()}, d.get("ref", ""),
                               float(d.get("ref_kld", 0.0)), float(d.get("alpha", 0.0)),
                               ref_error=float(d.get("ref_error", 0.0)), tier_ref=str(d.get("tier_ref", "")),
                               tier_alpha=float(d.get("tier_alpha", 0.0)))
        out[name] = ts
    return Sensitivity(out, cal.get("dataset", ""), int(cal.get("tokens", 0)), int(cal.get("kld_tokens", 0)),
                       proxy_check=r.proxy_check)


def plan_mixed(source, out: Path, *, type: str, method: str, pure: bool = False, token_embedding_type=None,
               output_tensor_type=None, tensor_types=(), has_imatrix: bool = False, target_size=None,
               target_bpw: float | None = None, compat: str | None = None, dynamic: bool = False,
               dynamic_extra: float = 0.10, recipe=None, calib=None, imatrix=None, seed: int = 0,
               sensitivity: dict | None = None, progress: bool = True, threads: int | None = None,
               metadata_margin: int = 1024, codebook: bool = False, aq_outliers: float = 0.0) -> Recipe:
    """The recipe of a mixed-precision conversion (module docstring). ``aq_outliers``: the share of each AQ
    tensor's weights the AQ method keeps as sparse float16 outliers; the AQ candidates' bytes and errors count them."""
    modes = [m for m, on in (("recipe", recipe is not None), ("target-size", target_size is not None),
                             ("target-bpw", target_bpw is not None), ("dynamic", dynamic)) if on]
    if len(modes) > 1:
        raise OptionError(f"choose one of --recipe FILE, --target-size, --target-bpw, --dynamic (got {', '.join(modes)})")
    compat = compat or ("any" if codebook else "llama.cpp")
    if compat not in COMPAT:
        raise OptionError(f"--compat {compat!r}: expected one of {', '.join(COMPAT)}")
    if recipe is not None:
        r = load_recipe(recipe)
        check_recipe(r, source, recipe, codebook)
        return r
    t0 = time.perf_counter()
    mode = modes[0]
    if dynamic and not (0.0 < dynamic_extra <= 10.0):
        raise OptionError(f"--dynamic-extra {dynamic_extra}: expected a fraction such as 0.1 (10% more bytes)")
    if target_bpw is not None and not (0.5 <= float(target_bpw) <= 32.0):
        raise OptionError(f"--target-bpw {target_bpw}: expected bits per weight between 0.5 and 32")
    base = _base_plan(source, type=type, pure=pure, token_embedding_type=token_embedding_type,
                      output_tensor_type=output_tensor_type, tensor_types=tensor_types, has_imatrix=has_imatrix)
    pins = parse_tensor_types(tensor_types)
    pinned = {}
    for c in base.choices:
        if not c.quantize:
            continue
        if any(rx.search(c.name) for _, rx, _ in pins) or (token_embedding_type and c.name == "token_embd.weight") \
                or (output_tensor_type and c.name == "output.weight"):
            pinned[c.name] = gguf_types.get(c.type).name   # its canonical spelling (aq-4x8-g8, Q8_0)
    free = {c.name: c for c in base.choices if c.quantize and c.name not in pinned}
    so = dict(sensitivity or {})
    if not free:
        raise OptionError("every quantizable tensor is pinned by --tensor-type: nothing to choose")
    from ..quantize.blockwise import HEAD_TENSORS
    from ..quantize.sensitivity import (AQ_CANDIDATES, STANDARD_CANDIDATES, candidate_types, measure,
                                        tier_candidates)

    aq_pool = AQ_CANDIDATES if (codebook and compat == "any") else ()
    pool = STANDARD_CANDIDATES
    if so.get("types"):   # the user's candidate list (--mix-types)
        from ..quantize.aq import available_configs
        aq_known = tuple(c.name for c in available_configs()) if aq_pool else ()
        if aq_pool:   # any other valid aq-MxB-gG named (e.g. aq-6x8-g16): measured like the offered ones
            from ..quantize.aq_core import parse_config
            for t in (str(t).strip().lower() for t in so["types"]):
                if t.startswith("aq-"):
                    name = parse_config(t).name
                    gguf_types.get(name)   # registers its type
                    if name not in aq_known:
                        aq_known += (name,)
        known = {normalize_type(t): t for t in STANDARD_CANDIDATES + aq_known}
        wanted = [normalize_type(t, "--mix-types type") for t in so["types"]]
        bad = [t for t in wanted if t not in known]
        if bad:
            raise OptionError(f"--mix-types {bad[0]}: not a measured candidate type "
                              f"({', '.join(STANDARD_CANDIDATES + (aq_known or ('(AQ configurations with --method aq --compat any)',)))})")
        pool = tuple(known[t] for t in wanted if known[t] in STANDARD_CANDIDATES)
        aq_pool = tuple(known[t] for t in wanted if known[t] in aq_known)

    def types_for(name, shape):
        c = free.get(name)
        if c is None:
            return []
        types = candidate_types(shape, pool + (aq_pool if is_block_linear(name) else ()))
        if aq_pool and name in HEAD_TENSORS:   # the embedding/output matrix: rows by their tokens' likelihood
            types += tier_candidates(shape, pool)
        if dynamic:   # the preset's type and the larger ones
            floor = gguf_types.get(c.type).nbytes(shape)
            types = [c.type] + [q for q in types if q != c.type and gguf_types.get(q).nbytes(shape) > floor]
        return types

    imp = None
    if imatrix:
        from ..quantize.imatrix import IMatrixData
        imp = IMatrixData.load(imatrix).importance()
    def log(s: str) -> None:   # three lines of timings, also with --quiet
        print("qgguf: " + s, file=sys.stderr)
    if so.get("from"):
        sens = sensitivity_from(so["from"], free, types_for, aq_outliers if aq_pool else None)
    else:
        sens = measure(source, types_for=types_for, calib=calib, nsamples=int(so.get("nsamples", 32)),
                       seqlen=int(so.get("seqlen", 512)), seed=seed, imatrix=imp,
                       kld_samples=int(so.get("kld_samples", 4)), kld_seqlen=int(so.get("kld_seqlen", 128)),
                       alpha_stride=so.get("alpha_stride"), aq_options=so.get("aq_options"),
                       aq_search=str(so.get("aq_search") or "sampled"), aq_outliers=aq_outliers if aq_pool else 0.0,
                       check=int(so.get("check", 0)), progress=progress, threads=threads, log=log)
    missing = set(free) - set(sens.tensors)
    if missing:
        raise OptionError(f"no candidate type fits {sorted(missing)[0]} (and {len(missing) - 1} more)")
    # tensors that keep their type: their data (the base plan's header, counted apart, has their records)
    fixed = sum(padded(n) for c in base.choices if c.name not in free for n in _data_sizes(c))
    n_params = sum(int(np.prod(c.shape)) for c in base.choices)
    target: dict = {}
    tables = []
    for name, ts in sens.tensors.items():
        allowed = None
        if dynamic:
            floor_err = ts.error[free[name].type]
            allowed = {q for q in ts.error if q == free[name].type or ts.error[q] < floor_err}
        tables.append(ts.options(allowed))
    recipe_obj = Recipe({}, mode=mode, method=method, compat=compat, source=str(source.path))
    if mode == "target-size":
        file_bytes_target = parse_size(target_size)
        target = {"file_bytes": file_bytes_target}
        recipe_obj.target = target
        recipe_obj.tensor_kld = {n: 0.0 for n in sens.tensors}
        recipe_obj.predicted_kld = 0.0
        header = _header_bytes(source, base, out, recipe_obj, base.ftype)
        budget = file_bytes_target - header - metadata_margin - fixed
        if budget <= 0:
            raise OptionError(f"--target-size {file_bytes_target:,} bytes is smaller than the file's header and float "
                              f"tensors ({header + fixed:,} bytes)")
    elif mode == "target-bpw":
        target = {"bpw": float(target_bpw)}
        budget = int(float(target_bpw) * n_params / 8) - fixed
    else:
        floor = sum(ts.nbytes[free[n].type] for n, ts in sens.tensors.items())
        target = {"extra": float(dynamic_extra), "base_type": type, "base_bytes": floor}
        budget = int(floor * (1.0 + dynamic_extra))
    alloc = allocate(tables, budget)
    types = dict(pinned)
    types.update(alloc.choice)
    recipe_obj.types = {c.name: types[c.name] for c in base.choices if c.name in types}
    recipe_obj.target = target
    recipe_obj.tensor_kld = {n: sens.tensors[n].kld(q) for n, q in alloc.choice.items()}
    recipe_obj.predicted_kld = float(sum(recipe_obj.tensor_kld.values()))
    recipe_obj.tensor_bytes = int(alloc.nbytes + fixed)
    recipe_obj.sensitivity = {n: ts.to_json() for n, ts in sens.tensors.items()}
    recipe_obj.sensitivity["_calibration"] = {"dataset": sens.dataset, "tokens": sens.tokens,
                                              "kld_tokens": sens.kld_tokens, "allocator": alloc.how,
                                              "aq_search_seconds": float(getattr(sens, "aq_seconds", 0.0)),
                                              "aq_search": getattr(sens, "aq_search", "") or None,
                                              "aq_outliers": float(aq_outliers) if aq_pool else 0.0,
                                              "budget_tensor_bytes": int(budget + fixed)}
    recipe_obj.proxy_check = sens.proxy_check
    if mode == "target-size":   # the file as planned, header included, must fit (sizes are exact; margin 1 KiB)
        final = _base_plan(source, type=type, pure=pure, token_embedding_type=token_embedding_type,
                           output_tensor_type=output_tensor_type, tensor_types=[*recipe_obj.overrides(), *tensor_types],
                           has_imatrix=has_imatrix)
        outl = _planned_outliers(final, aq_outliers)
        planned = _header_bytes(source, final, out, recipe_obj, final.ftype, outl) + sum(
            padded(s) for c in final.choices for s in _data_sizes(c)) + sum(
            padded(4 * k) + padded(2 * k) for k in outl.values())
        recipe_obj.sensitivity["_calibration"]["planned_file_bytes"] = int(planned)
        if planned > file_bytes_target:
            raise OptionError(f"internal: the plan needs {planned:,} bytes, more than --target-size {file_bytes_target:,}")
    recipe_obj.search_seconds = time.perf_counter() - t0
    return recipe_obj


def bits_budget(source, out: Path, aqp, bits: float, *, pure: bool, has_imatrix: bool, outliers: float) -> int:
    """The file bytes that ``--bits B --bits-plan tensor`` gives the allocator: the file that ``--bits B`` writes
    (``aqp``, :func:`qgguf.quantize.aq.plan_aq`; its header, the embedding/output and float tensors exactly),
    with its AQ tensors at exactly ``B`` bits per weight, every byte counted (codes, codebooks, scales and
    ``outliers``' share of sparse values), instead of the bits of the configuration ``--bits`` chose."""
    plan = _base_plan(source, type=aqp.type, pure=pure, token_embedding_type=aqp.token_embedding_type,
                      output_tensor_type=aqp.output_tensor_type, tensor_types=aqp.tensor_types,
                      has_imatrix=has_imatrix)
    aq = set(aqp.tensors)
    total = _header_bytes(source, plan, out, None, plan.ftype, _planned_outliers(plan, outliers))
    for c in plan.choices:
        if c.name in aq:
            total += int(float(bits) * int(np.prod(c.shape)) / 8)
        else:
            total += sum(padded(s) for s in _data_sizes(c))
    return int(total)


def _planned_outliers(plan, share: float) -> dict[str, int]:
    """Name -> sparse-outlier count of the codebook tensors of ``plan`` (AQ's ``share`` of each one's weights;
    the tensors that get none left out), as the conversion will write them."""
    if not share:
        return {}
    outl = {c.name: outlier_count(int(np.prod(c.shape)), share) for c in plan.choices
            if is_codebook(gguf_types.get(c.type)) and is_block_linear(c.name)}   # an AQ head keeps none
    return {n: k for n, k in outl.items() if k > 0}


def _data_sizes(c) -> list[int]:
    """Bytes of each tensor the writer stores for plan choice ``c`` (a codebook type: its companions)."""
    from ..gguf_types.codebook import is_codebook
    qt = gguf_types.get(c.type)
    if is_codebook(qt):
        return [s.nbytes for s in qt.companion_specs(c.shape)]
    return [qt.nbytes(c.shape)]


__all__ = ["plan_mixed", "check_recipe", "is_block_linear", "bits_budget", "COMPAT"]
