"""``convert()``: source -> (calibrate) -> choose types -> quantize one tensor at a time -> GGUF.

The plain path (``method="rtn"``) imports no torch/transformers; only calibration does.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from ..errors import BadWeightsError, OptionError, QggufError
from .presets import TypePlan, plan_types
from .sources import ModelSource, is_alias, open_source

GGML_QNT_VERSION = 2


@dataclass
class TensorReport:
    name: str
    shape: tuple[int, ...]
    type: str
    nbytes: int
    wanted: str | None = None   # type before the row-length fallback


@dataclass
class ConvertReport:
    source: str
    output: str
    method: str
    preset: str
    tensors: list[TensorReport] = field(default_factory=list)
    types: dict[str, int] = field(default_factory=dict)        # tensors per type
    bytes_per_type: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, int] = field(default_factory=dict)    # "Q4_K->Q5_0": count
    tensor_bytes: int = 0
    file_bytes: int = 0
    n_params: int = 0
    bpw: float = 0.0
    wall_s: float = 0.0
    peak_rss_bytes: int = 0
    estimated_peak_bytes: int = 0   # the plan's memory estimate (convert/resources.py; --max-memory)
    # block methods
    calibration: str | None = None
    layer_errors: dict[str, float] = field(default_factory=dict)   # relative output error per linear
    resumed_blocks: int = 0
    e2e: dict = field(default_factory=dict)     # AQ/VQ end-to-end fine-tuning: calibration KLD before/after
    outliers: dict[str, int] = field(default_factory=dict)         # sparse outliers per tensor
    codebook_types: list[str] = field(default_factory=list)       # qgguf codebook types used (AQ, VQ)
    needs_qgguf_runner: bool = False
    mixed: dict = field(default_factory=dict)   # mixed precision (issue 6): recipe summary, search seconds

    def summary(self) -> str:
        lines = [f"wrote {self.output}: {self.file_bytes / 2**20:.2f} MiB, {self.n_params / 1e6:.2f} M params, "
                 f"{self.bpw:.3f} bpw ({self.preset}, method {self.method})"]
        lines.append("  types: " + ", ".join(f"{t}: {n} tensors, {self.bytes_per_type[t] / 2**20:.2f} MiB"
                                             for t, n in sorted(self.types.items())))
        if self.fallbacks:
            lines.append("  fallbacks (row length not a multiple of the block): " +
                         ", ".join(f"{k}: {v}" for k, v in sorted(self.fallbacks.items())))
        if self.layer_errors:
            errs = self.layer_errors
            worst = max(errs, key=errs.get)
            lines.append(f"  relative layer error (calibration): mean {np.mean(list(errs.values())):.3e}, "
                         f"max {errs[worst]:.3e} ({worst})")
        if self.e2e:
            from ..quantize.finetune import stage_line
            lines.append(f"  end-to-end fine-tuning: {stage_line(self.e2e)}")
        if self.resumed_blocks:
            lines.append(f"  resumed: {self.resumed_blocks} blocks taken from the checkpoint")
        if self.outliers:
            lines.append(f"  sparse outliers: {sum(self.outliers.values()):,} values in {len(self.outliers)} tensors")
        if self.needs_qgguf_runner:
            what = [w for w, on in (("codebook tensors", bool(self.codebook_types)),
                                    ("sparse outliers", bool(self.outliers))) if on]
            lines.append(f"  NOTE: this file uses qgguf extensions ({', '.join(what)}); it needs the qgguf runner "
                         "(qgguf run/eval, qgguf.load) - stock llama.cpp will not load it")
        if self.mixed:
            lines.append("  " + self.mixed["summary"].replace("\n", "\n  "))
        lines.append(f"  time {self.wall_s:.2f} s, peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB "
                     f"(estimated {self.estimated_peak_bytes / 2**20:.0f} MiB)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def _head_tensors() -> tuple[str, ...]:
    """The tensors outside the blocks (quantize/blockwise.py's HEAD_TENSORS; imported late: torch)."""
    from ..quantize.blockwise import HEAD_TENSORS
    return HEAD_TENSORS


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def default_output(src, type_name: str) -> Path:
    """NAME-TYPE.gguf next to the source (./NAME-TYPE.gguf for an alias)."""
    s = str(src)
    if is_alias(s):
        return Path.cwd() / f"{s.lower()}-{type_name.upper()}.gguf"
    p = Path(s).resolve()
    stem = p.name if p.is_dir() else p.stem
    return p.parent / f"{stem}-{type_name.upper()}.gguf"


def _qtype(name: str):
    from .. import gguf_types
    try:
        return gguf_types.get(name)
    except QggufError:
        raise OptionError(f"tensor type {name} is not available in this qgguf") from None


def _check_finite(name: str, w: np.ndarray, source: ModelSource) -> None:
    if not np.isfinite(w).all():
        bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
        raise BadWeightsError(f"tensor {name!r} has {bad} NaN or infinite values", source.path)


def convert(src, out=None, method: str = "rtn", type: str = "Q8_0", tensor_types=(), pure: bool = False,
            token_embedding_type: str | None = None, output_tensor_type: str | None = None, calib=None,
            nsamples: int | None = None, seqlen: int | None = None, imatrix=None, imatrix_out=None, seed: int = 0,
            threads: int | None = None, progress: bool = True, method_options: dict | None = None,
            resume: bool = False, aq_config: str | None = None, bits: float | None = None,
            tensor_methods=(), target_size=None, target_bpw: float | None = None, compat: str | None = None,
            dynamic: bool = False, dynamic_extra: float = 0.10, recipe_file=None, save_recipe=None,
            sensitivity: dict | None = None, vq_config: str | None = None, max_memory=None,
            bits_plan: str = "auto") -> ConvertReport:
    """Convert ``src`` (GGUF file, Hugging Face folder or alias) to a GGUF at ``out``.

    ``bits_plan="tensor"`` (with ``method="aq"`` and ``bits``): the mixed-precision allocator spends the bytes of
    ``bits`` per weight on each block linear's type (:func:`qgguf.convert.mixed.bits_budget`) instead of one
    configuration per role (``"role"``). ``"auto"`` (the default): ``"tensor"`` for AQ ``bits`` over the whole model
    (no ``aq_config``, ``tensor_methods`` or other mixed-precision option), else ``"role"``.

    ``method_options``: options of the method (``damp``, ``actorder``, ``passes``, ``init``, ``outliers``,
    ``iters``, ``lr``, ``recipe``, ``batch_size``, ...), passed to its constructor and kept in
    ``ctx.options``. Block methods (GPTQ, QuantEase, AutoRound) checkpoint each finished block in
    ``OUT.qgguf-resume/``; ``resume=True`` continues from there. ``nsamples``/``seqlen`` default to the
    method's own preference (its ``nsamples``/``seqlen`` attributes, e.g. an AutoRound recipe's), else
    128 x 512.

    AQ (``method="aq"``, quantize/aq.py): ``aq_config`` (``"aq-2x8-g8"``) or ``bits`` (the most accurate
    configuration whose bits per weight, every byte counted, fit) and ``tensor_methods``
    (``["ffn_down=aq"]``: AQ only on the matching block linears, ``type`` elsewhere).

    VQ (``method="vq"``, quantize/vq.py): ``vq_config`` (``"vq-v8-k4096-256"``, or ``type`` naming one) or
    ``bits``, and ``tensor_methods`` with ``PATTERN=vq``, as for AQ.

    Mixed precision (convert/mixed.py): ``target_size`` (file bytes or "60MB"), ``target_bpw``, ``dynamic``
    (``type``'s plan plus upgrades for ``dynamic_extra`` more bytes) or ``recipe_file`` choose every tensor's
    type from measured sensitivities; ``compat="llama.cpp"`` keeps to llama.cpp's types; ``save_recipe``
    writes the choice as JSON; ``sensitivity``: options of the measurement (nsamples, seqlen, kld_samples,
    kld_seqlen, check)."""
    from ..quantize.base import QuantContext, get_method, is_blockwise, quantize_with

    t0 = time.perf_counter()
    if threads:
        import torch  # noqa: F401  before numba's OpenMP pool: torch then keeps its own OpenMP runtime
        from ..runtime.threads import no_nested_openmp
        try:
            import numba
            numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
        except ImportError:
            pass
        no_nested_openmp()   # numba's pool allows nested regions on this thread (runtime/threads.py)
    opts = {k: v for k, v in (method_options or {}).items() if v is not None}
    mixed_wanted = recipe_file is not None or target_size is not None or target_bpw is not None or dynamic
    if imatrix and method == "rtn":
        method = "imatrix"   # an importance matrix was given: use it
    vq_wanted = (method == "vq" or vq_config is not None or str(type).strip().lower().startswith("vq-")
                 or any(str(t).strip().lower().endswith("=vq") for t in tensor_methods))
    if vq_wanted:   # VQ codebooks (quantize/vq.py)
        if aq_config is not None or method == "aq":
            raise OptionError("VQ (--method vq, --vq-config, --type vq-...) and AQ (--method aq, --aq-config) "
                              "are not combined in one conversion")
        if method not in ("vq", "rtn", "imatrix"):
            opts.setdefault("other", method)
        method = "vq"
    aq_wanted = not vq_wanted and (method == "aq" or aq_config is not None or bits is not None
                                   or bool(tensor_methods))
    if aq_wanted:   # AQ codebooks (quantize/aq.py); another named method does the other block linears
        if method not in ("aq", "rtn", "imatrix"):
            opts.setdefault("other", method)
        method = "aq"
    for k, given in (("nsamples", nsamples), ("seqlen", seqlen)):   # -O nsamples=N is --nsamples N
        if k in opts:
            raw = opts.pop(k)
            if given is not None and str(raw) != str(given):
                raise OptionError(f"-O {k}={raw} contradicts --{k} {given}")
            try:
                v = int(raw)
            except (TypeError, ValueError):
                v = 0
            if v < 1:
                raise OptionError(f"option {k}={raw!r}: expected a positive integer")
            if k == "nsamples":
                nsamples = v
            else:
                seqlen = v
    m = get_method(method, calib=calib, nsamples=nsamples, seqlen=seqlen, imatrix=imatrix, imatrix_out=imatrix_out,
                   **opts)
    blockwise = is_blockwise(m)
    nsamples = int(nsamples or getattr(m, "nsamples", None) or 128)
    seqlen = int(seqlen or getattr(m, "seqlen", None) or 512)
    if imatrix_out and (not m.needs_calibration or blockwise):
        raise OptionError(f"--imatrix-out needs --method imatrix (method {method} collects no importance matrix)")
    if resume and not blockwise:
        raise OptionError(f"--resume applies to block methods (gptq, quantease, autoround), not {method}")

    if bits_plan not in ("auto", "role", "tensor"):
        raise OptionError(f"--bits-plan {bits_plan!r}: expected auto, role or tensor")
    whole_model_bits = (bits is not None and method == "aq" and not vq_wanted and aq_config is None
                        and not tensor_methods and not mixed_wanted)
    per_tensor = bits_plan == "tensor" or (bits_plan == "auto" and whole_model_bits)
    if per_tensor and not whole_model_bits:
        raise OptionError("--bits-plan tensor takes --method aq --bits B for the whole model (no --aq-config, "
                          "--tensor-method, VQ or other mixed-precision option)")
    if mixed_wanted and (vq_wanted or aq_config is not None or bits is not None or tensor_methods):
        raise OptionError("mixed precision (--target-size/--target-bpw/--dynamic/--recipe) takes --method aq alone "
                          "(the recipe gives each block linear its AQ configuration or a standard type), not "
                          "--aq-config, --bits, --tensor-method or VQ")
    source = open_source(src)
    user_types = (list(tensor_types), token_embedding_type, output_tensor_type)
    try:
        if (aq_wanted or vq_wanted) and not mixed_wanted:   # the AQ/VQ configuration and its tensors -> overrides
            if vq_wanted:
                from ..quantize.vq import plan_vq
                aqp = plan_vq([(t.name, t.shape) for t in source.tensors], type=type, vq_config=vq_config,
                              bits=bits, tensor_methods=tensor_methods, tensor_types=tensor_types,
                              token_embedding_type=token_embedding_type, output_tensor_type=output_tensor_type)
            else:
                from ..quantize.aq import plan_aq
                aqp = plan_aq([(t.name, t.shape) for t in source.tensors], type=type, aq_config=aq_config,
                              bits=bits, tensor_methods=tensor_methods, tensor_types=tensor_types,
                              outliers=float(getattr(m, "outliers", 0.0) or 0.0),
                              token_embedding_type=token_embedding_type, output_tensor_type=output_tensor_type)
            type, tensor_types = aqp.type, aqp.tensor_types
            token_embedding_type, output_tensor_type = aqp.token_embedding_type, aqp.output_tensor_type
            if aqp.other and "other" not in opts:
                m.other = aqp.other
            if bits is not None and not per_tensor:   # the configuration --bits chose, and its true size
                from collections import Counter
                mix = Counter(t.lower() for _p, t in aqp.tensor_types[:len(aqp.tensors)])
                print(f"qgguf: --bits {bits:g}: {', '.join(f'{c} on {k}' for c, k in mix.most_common())} tensors "
                      f"(embedding/output {aqp.output_tensor_type or aqp.token_embedding_type}), {aqp.bpw:.3f} bits "
                      "per weight counting every byte" + (f" ({len(aqp.fallback)} in their fallback type)"
                                                          if aqp.fallback else ""), file=sys.stderr)
        if per_tensor:   # --bits B over the whole model, spent per tensor by the mixed-precision allocator
            from .mixed import bits_budget
            target_size = bits_budget(source, Path(out) if out is not None else default_output(src, type), aqp, bits,
                                      pure=pure, has_imatrix=m.needs_calibration,
                                      outliers=float(getattr(m, "outliers", 0.0) or 0.0))
            print(f"qgguf: --bits {bits:g} --bits-plan tensor: the allocator spends {target_size:,} bytes (the block "
                  f"linears at {bits:g} bits per weight, every byte counted, and the embedding/output as --bits gives "
                  "it) on measured AQ configurations and standard types per tensor (--bits-plan role: one "
                  "configuration per role, no measurement, faster)", file=sys.stderr)
            tensor_types, token_embedding_type, output_tensor_type = user_types
            mixed_wanted, bits = True, None
        recipe = None
        if mixed_wanted:
            from .mixed import plan_mixed
            # the measurement is kept beside the block checkpoints: --resume reuses it instead of measuring again
            kept = None
            if blockwise and out is not None and recipe_file is None:
                from ..quantize.blockwise import resume_folder
                kept = resume_folder(out) / "sensitivity.json"
                if resume and kept.is_file() and not (sensitivity or {}).get("from"):
                    sensitivity = {**(sensitivity or {}), "from": str(kept)}
                    print(f"qgguf: --resume: the sensitivities measured before, from {kept}", file=sys.stderr)
                elif not resume:   # an earlier run's, whose measurement this run replaces
                    kept.unlink(missing_ok=True)
            recipe = plan_mixed(source, Path(out) if out is not None else default_output(src, type), type=type,
                                method=m.describe(), pure=pure, token_embedding_type=token_embedding_type,
                                output_tensor_type=output_tensor_type, tensor_types=tensor_types,
                                has_imatrix=m.needs_calibration, target_size=target_size, target_bpw=target_bpw,
                                compat=compat, dynamic=dynamic, dynamic_extra=dynamic_extra, recipe=recipe_file,
                                calib=calib, imatrix=imatrix, seed=seed, sensitivity=sensitivity,
                                progress=progress, threads=threads, codebook=aq_wanted,
                                aq_outliers=float(getattr(m, "outliers", 0.0) or 0.0) if aq_wanted else 0.0)
            tensor_types = [*recipe.overrides(), *tensor_types]
            if aq_wanted and recipe_file is not None and "outliers" not in opts:
                # the recipe's AQ bytes were planned with this outlier share (recipes before it: none)
                m.outliers = float((recipe.sensitivity or {}).get("_calibration", {}).get("aq_outliers", 0.0) or 0.0)
            if save_recipe:
                recipe.save(save_recipe)
            if kept is not None and not (sensitivity or {}).get("from") and kept.parent.parent.is_dir():
                kept.parent.mkdir(exist_ok=True)
                recipe.save(kept)
        plan: TypePlan = plan_types(
            [(t.name, t.shape) for t in source.tensors], arch=source.arch, n_layer=source.n_layer,
            n_head=source.n_head, n_head_kv=source.n_head_kv, type=type, pure=pure,
            token_embedding_type=token_embedding_type, output_tensor_type=output_tensor_type,
            tensor_types=tensor_types, has_imatrix=m.needs_calibration,
            float_source_types={t.name: t.src_type for t in source.tensors})
        qtypes = {c.type: _qtype(c.type) for c in plan.choices}
        from ..gguf_types.codebook import is_codebook
        from ..gguf_types.tiers import is_tiered
        for c in plan.choices:   # outside the blocks only --method aq's own configurations (AQ.quantize_tensor)
            if is_tiered(qtypes[c.type]) and c.name not in _head_tensors():
                raise OptionError(f"{c.name} in {qtypes[c.type].name}: row tiers are for the token embedding and "
                                  "the output matrix")
            if is_codebook(qtypes[c.type]) and not is_tiered(qtypes[c.type]) and c.name in _head_tensors() and (
                    getattr(m, "name", "") != "aq" or not str(qtypes[c.type].name).startswith("aq-")):
                raise OptionError(f"{c.name} in {qtypes[c.type].name}: the embedding/output matrix takes a codebook "
                                  "type only as an AQ configuration with --method aq")
        if not m.needs_calibration:
            need = [c.name for c in plan.choices if c.requires_imatrix]
            if need:
                raise OptionError(f"{plan.preset} needs an importance matrix for {need[0]} and "
                                  f"{len(need) - 1} more tensors: use --method imatrix (or --imatrix FILE)")
        out = Path(out) if out is not None else default_output(src, plan.preset)
        if out.resolve() == Path(source.path).resolve():
            raise OptionError("the output would overwrite the input", out)

        from .resources import check_memory, estimate_peak_memory, expected_output_bytes
        mem = estimate_peak_memory(source, plan, m, blockwise, nsamples, seqlen, calib)
        check_memory(mem, max_memory)   # --max-memory: refuse a plan that cannot fit, before any work
        from .writer import SPACE_MARGIN, OutputFile
        with OutputFile(out, source.arch) as of:   # checks the folder before any work
            file_b, ckpt_b = expected_output_bytes(plan, qtypes, source.metadata, blockwise)
            of.check_space(file_b + ckpt_b + SPACE_MARGIN, "the output and its block checkpoints" if ckpt_b else
                           "the output")
            ctx = QuantContext(source=source, seed=seed, threads=threads, progress=progress, options=dict(opts))
            blocks = None
            if blockwise:
                from ..quantize.blockwise import as_block_method, run_blocks
                m = as_block_method(m)
                m.prepare(source, plan, ctx)
                file_imp = None
                if imatrix:
                    from ..quantize.imatrix import IMatrixData
                    file_imp = IMatrixData.load(imatrix).importance()
                try:
                    blocks = run_blocks(source, plan, qtypes, m, ctx, out, calib=calib, nsamples=nsamples,
                                        seqlen=seqlen, seed=seed, resume=resume, options=opts, imatrix=file_imp,
                                        progress=progress)
                except (KeyboardInterrupt, MemoryError):
                    _resume_hint(out)
                    raise
                ctx.importance = dict(blocks.importance)
                if file_imp:
                    ctx.importance.update(file_imp)
            else:
                m.prepare(source, plan, ctx)

            of.update(source.metadata)
            U32 = GGUFValueType.UINT32
            if plan.ftype is not None:
                of.set("general.file_type", plan.ftype, U32)
            of.set("general.quantization_version", GGML_QNT_VERSION, U32)
            of.update(ctx.metadata)
            if recipe is not None:
                from .budget import recipe_metadata
                of.update(recipe_metadata(recipe))
            outliers = blocks.outliers if blocks is not None else {}
            if outliers:
                from .writer import plan_outliers, set_outlier_keys
                set_outlier_keys(of, outliers)
            for c in plan.choices:
                qt = qtypes[c.type]
                of.plan_qtensor(c.name, c.shape, qt)
                if c.name in outliers:
                    plan_outliers(of, c.name, outliers[c.name])
            of.open()

            rep = ConvertReport(str(src), str(out), m.describe(), plan.preset, fallbacks=dict(plan.fallbacks))
            rep.estimated_peak_bytes = mem.total
            total = sum(int(np.prod(c.shape)) for c in plan.choices)
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=total, unit="w", unit_scale=True, desc=f"{plan.preset}", leave=False)
            src_types = {t.name: t for t in source.tensors}
            ck_block, ck_data = None, None
            try:
                for c in plan.choices:
                    qt = qtypes[c.type]
                    spec = src_types[c.name]
                    if bar is not None:
                        bar.set_postfix_str(f"{c.name} -> {c.type}", refresh=False)
                    raw = None
                    blk = _block_index(c.name) if blocks is not None else None
                    if blk is not None:
                        if blk != ck_block:
                            ck_block, ck_data = blk, blocks.checkpoint.load(blk)
                        raw = ck_data[0][c.name]
                    elif blocks is not None and c.name in (blocks.head or {}):
                        # made before the end-to-end stage, which tuned the blocks against them (or tuned them)
                        _check_finite(c.name, source.load(c.name), source)
                        raw = blocks.head[c.name]
                    elif (m.copy_same_type and spec.src_type == c.type and hasattr(source, "file")):
                        raw = source.file.raw(c.name)
                        if c.type in ("F32", "F16", "BF16"):
                            _check_finite(c.name, qt.dequantize(raw, c.shape), source)
                    else:
                        w = source.load(c.name)
                        _check_finite(c.name, w, source)
                        w2 = w.reshape(-1, c.shape[-1])
                        if not c.quantize or qt.is_float:
                            raw = qt.quantize(w2)
                        else:
                            raw = quantize_with(m, c.name, w2, qt, ctx)
                        del w, w2
                    of.write_tensor(c.name, raw)
                    nb = int(raw.nbytes)
                    del raw
                    if c.name in outliers:
                        from .writer import write_outliers
                        idx, vals = ck_data[1][c.name]
                        nb += write_outliers(of, c.name, idx, vals)
                    rep.tensors.append(TensorReport(c.name, c.shape, c.type, nb, c.wanted))
                    rep.types[c.type] = rep.types.get(c.type, 0) + 1
                    rep.bytes_per_type[c.type] = rep.bytes_per_type.get(c.type, 0) + nb
                    if bar is not None:
                        bar.update(int(np.prod(c.shape)))
            finally:
                if bar is not None:
                    bar.close()
            of.commit()
        if blocks is not None:
            blocks.checkpoint.remove()
            rep.outliers = dict(outliers)
            rep.layer_errors = dict(blocks.stats)
            rep.resumed_blocks = blocks.resumed_blocks
            rep.e2e = dict(ctx.extra.get("e2e") or {})
            rep.calibration = blocks.dataset
    finally:
        source.close()
    from ..gguf_types.codebook import is_codebook
    if recipe is not None:
        rep.mixed = {"summary": recipe.summary(), "search_seconds": recipe.search_seconds,
                     "predicted_kld": recipe.predicted_kld, "target": recipe.target, "mode": recipe.mode}
    rep.codebook_types = sorted(getattr(qt, "name", n) for n, qt in qtypes.items() if is_codebook(qt))
    rep.needs_qgguf_runner = bool(rep.outliers) or bool(rep.codebook_types)
    rep.tensor_bytes = sum(t.nbytes for t in rep.tensors)
    rep.file_bytes = out.stat().st_size
    rep.n_params = sum(int(np.prod(t.shape)) for t in rep.tensors)
    rep.bpw = 8.0 * rep.tensor_bytes / max(1, rep.n_params)
    rep.wall_s = time.perf_counter() - t0
    rep.peak_rss_bytes = peak_rss_bytes()
    return rep


def _resume_hint(out: Path) -> None:
    from ..quantize.blockwise import resume_folder
    ck = resume_folder(out)
    n = len(list(ck.glob("blk.*.npz"))) if ck.is_dir() else 0
    if n:
        print(f"qgguf: {n} finished blocks are saved in {ck}; run the same command with --resume to continue",
              file=sys.stderr)


def _block_index(name: str) -> int | None:
    if not name.startswith("blk."):
        return None
    head, _, _ = name[4:].partition(".")
    return int(head) if head.isdigit() else None
