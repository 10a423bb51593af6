"""``--method aq``: additive quantization (AQLM: Egiazarian et al., "Extreme Compression of Large Language
Models via Additive Quantization") onto qgguf's codebook types ``aq-MxB-gG``.

Block by block, in the calibration pipeline (:mod:`.blockwise`):

1. every linear of the block that has an AQ type is quantized against its true-sequential Gram matrix
   ``H = X^T X`` (:func:`qgguf.quantize.aq_core.quantize_matrix`: residual k-means init, then rounds of Adam on
   codebooks/scales and beam search over the codes, until the relative error ``tr(dW H dW^T)/tr(W H W^T)``
   improves by less than ``tol``); linears with a standard type (``--tensor-method``, or rows that do not
   divide into groups of ``g``) take the ``other`` method (default ``imatrix``: the type's importance-weighted
   search; ``rtn``, ``gptq`` or ``quantease`` also work);
2. the block's codebooks, scales and RMSNorm weights are fine-tuned (codes frozen; Adam) so that the
   quantized block's output on ``x_q`` (the outputs of the already-quantized blocks) matches the original
   block's output: by default (``ft_target=fp``) the original block on the float model's own activations, so
   the block also corrects the error coming in (SmolLM2 --bits 2: KLD 2.78 against 3.05 with ``xq``);
   ``ft_target=xq`` is AQLM's choice, the original block on the same inputs ``x_q``. The loss over the whole calibration set is
   checked after every epoch and the best state is kept (the start included), so fine-tuning never makes the
   block worse on the calibration data. The tuned norms go back to the pipeline as float32 arrays under their
   short keys (``attn_norm``, ``ffn_norm``), which :func:`qgguf.quantize.blockwise.run_blocks` writes instead of
   the originals;
3. once every block is done, the end-to-end stage (:func:`qgguf.quantize.finetune.finetune_model`, AQLM's
   global fine-tuning) tunes the codebooks, scales and norms of all blocks at once (codes still frozen) to
   minimise the KL divergence from the float model's next-token distribution on the calibration sequences,
   and rewrites the checkpointed blocks (a resumed run that finds the stage done skips it).

The token embedding / output matrix take a standard type by default; ``--tensor-type
'token_embd.weight=aq-4x8-g8'`` (or ``output.weight=...``) puts them in an AQ configuration too
(:meth:`AQ.quantize_tensor`): fitted after the blocks against the Gram matrix of the quantized model's final normed
hidden states (their role as the output head; an untied embedding takes the same as its proxy), without sparse
outliers, then seen as stored by the end-to-end stage and, with ``e2e_head=tuned``, their codebooks and scales tuned
with the blocks'. Measured on SmolLM2-135M's tied 49152 x 576 matrix (docs/BENCHMARKS.md, session 12): layer error
4,611 in aq-4x8-g8 (14.4 MB) against 8,371 in IQ4_NL (15.9 MB), but the KL divergence on WikiText-2 with only that
matrix quantized 0.077 against 0.044 (0.069 with its rows weighted by their tokens' mean probability): the layer
error through ``H`` weighs every vocabulary row alike, the KL divergence weighs the likely tokens' rows, and AQ's
shared codebooks serve the many rare rows. Hence a standard type stays the default there.

What is tuned is what is stored: codebooks are float16 in the file, so the fine-tuning forward pass rounds
them to float16 (straight-through gradient), and scales are float32.

Options (``-O KEY=VALUE``; with the defaults SmolLM2-135M ``--bits 3``, the per-tensor plan's measurement, 210
linears and both fine-tuning stages, took 37 minutes on 2 CPU cores, the end-to-end stage 13.5 of them;
docs/BENCHMARKS.md, session 18):

    beam=1          beam size of the code search (AQLM's beam_size; 1 = greedy coordinate descent)
    max_rounds=4    rounds of (Adam, beam search) per linear
    tol=0.01        stop when a round improves the relative error by less than this fraction
    adam_steps=20   Adam steps on codebooks and scales in the first round (half of them after the last round)
    adam_later=5    Adam steps in the later rounds
    lr=0.005        Adam learning rate (relative to the codebooks' RMS and the scales)
    kmeans_iters=15 kmeans_points=16384   residual k-means initialisation (points sampled per codebook)
    damp=1.0        added to the diagonal of H / mean(diag H) (AQLM fits against the raw Gram matrix; on
                    SmolLM2's ffn_down, 16 x 256 calibration tokens, the undamped fit put its error where the
                    calibration text has little energy: one-chunk-pair KLD, ffn_down alone, 0.607 undamped,
                    0.481 at 0.1, 0.472 at 1, 0.493 at 3; llama.cpp's IQ2_XXS 0.508)
    outliers=0.002  share of the weights kept as sparse float16 values (:func:`salient_positions`: largest
                    w^2 H_cc, the "super weights" and the inputs with massive activations), exact in the file,
                    counted in --bits (48 bits each); 0 turns it off (same probe, damp=1: 0.802 without them)
    finetune=yes    ft_epochs=3  ft_lr=0.0005  ft_batch=4  ft_tol=0.001  ft_target=fp|xq   (block stage)
    e2e=yes         e2e_epochs=1  e2e_lr=0.001  e2e_batch=4  e2e_tol=0.001  e2e_norms=yes   (end-to-end stage, step 3;
                    e2e_lr, SmolLM2, held-out KLD at the stage's end / WikiText-2: at 0.8x llama.cpp Q2_K's size
                    0.002 kept its start, 0.1821; 0.001 0.1409 / 0.1667; 0.0005 0.1364 / 0.1637; 0.00025 0.1373 /
                    0.1652; but --bits 3 (a coarser file): 0.001 0.3100 / 0.3576, 0.0005 0.3166 / 0.3647, so the
                    default stays 0.001: docs/BENCHMARKS.md, sessions 18-20)
    e2e_nsamples=256  sequences of the end-to-end stage (at least the block pass's): the block pass's and more
                    from the same calibration source, only run through the float model (their teacher). On the
                    block pass's 32 x 256 tokens the stage overfits (SmolLM2 ffn_down: calibration KLD -36 %,
                    WikiText-2 -6 %); 128 sequences for 2 epochs (twice the time of 32 for 4) gave -9 %, and
                    -7 % on --bits 3; 256 for 1 epoch (the same time as 128 for 2) -2.3 % more on the mixed file
                    at 0.8x llama.cpp Q2_K's size (WikiText-2 KLD 0.1822 -> 0.1780; docs/BENCHMARKS.md, session 12)
    e2e_val=32 e2e_checks=4  held-out sequences of the end-to-end stage, drawn after its e2e_nsamples from the
                    same source (their teacher run in float too): the stage never trains on them, scores their KLD
                    e2e_checks times per epoch and keeps the state of least held-out KLD (the start included);
                    0: the training sequences' KLD after each epoch, as before. The stage's loss on the sequences
                    it trains on says little about the file: on SmolLM2 at 0.8x llama.cpp Q2_K's size it fell to
                    0.087 while held-out C4 text scored 0.173-0.179 (docs/BENCHMARKS.md, session 18)
    e2e_sched=constant  the end-to-end stage's learning rate: constant, or ``cosine`` (a half cosine from e2e_lr to
                    0 over the stage's steps; SmolLM2 at 0.8x llama.cpp Q2_K's size: held-out KLD 0.1409 -> 0.1389,
                    WikiText-2 0.1667 -> 0.1664; twice the rate or half the batch were worse: session 19)
    e2e_lr_try=0.5  the rate trial: these factors of e2e_lr (comma-separated) are also run, each from the start, over
                    the stage's first held-out check interval (a quarter epoch, 16 steps); the rate whose check
                    scored least runs the rest of the stage as if alone. The best rate depends on how far the blocks
                    start from the float model (0.0005 better at 0.8x llama.cpp Q2_K's size, 0.001 at --bits 3; in
                    both, the quarter-epoch check already ranked them so); costs one check interval per factor.
                    Empty: e2e_lr only (VQ's default; off with e2e_codes)
    e2e_codes=0     PV-Tuning's code step (Malinovskii et al. 2024, the linearised V step) in the end-to-end stage:
                    every e2e_code_every=8 optimizer steps each AQ linear's codes are re-encoded towards its weight
                    moved against its RMS-normalised gradient (e2e_code_lr=0.01 of the weight's RMS per unit),
                    at most this share of its groups changing (:func:`qgguf.quantize.aq_core.reencode_l2`); the
                    codes of the kept state are written. 0: codes frozen (AQLM's stage). Off by default: on
                    SmolLM2 at 0.8x llama.cpp Q2_K's size, 0.01 changed about 1 % of the groups' codes and made the
                    held-out KLD 0.1409 -> 0.1433 and WikiText-2's 0.1667 -> 0.1698, the stage 29 % slower and
                    the peak RSS 1.4 GB higher (docs/BENCHMARKS.md, session 20)
    other=imatrix   method of linears with a standard type
    std_scales=no   ``yes``: both fine-tuning stages also tune the float16 block scales (``d``, and ``m``/``dmin``
                    where the type has them) of the block linears in standard types, their codes and integer
                    sub-block scales frozen (:class:`qgguf.quantize.finetune.GridState`); the file keeps their
                    types. Off by default: on SmolLM2's mixed file at 0.8x Q2_K's size the end-to-end stage's
                    calibration KLD fell 0.108 -> 0.091 with it, WikiText-2's stayed at 0.1836 (docs/BENCHMARKS.md)
    e2e_head=stored the end-to-end stage's token embedding and output matrix: as stored (default), ``tuned`` (as
                    stored, their float16 block scales tuned and written; same measurement: calibration KLD 0.083,
                    WikiText-2 0.1822), or ``float`` (AQLM's choice)
    linear_threads=1  torch threads of the per-linear search and the fine-tuning (small operations: one
                    thread is faster than two on a busy 2-core machine)
    nsamples=128 seqlen=256  calibration of the block pass (the pipeline's --nsamples/--seqlen override): the
                    Gram matrices of the layer fits use all of it, the block stage its first ft_nsamples=32
                    sequences (its cost). On SmolLM2, AQ 3x8-g8 on the 30 ffn_down matrices alone, no fine-tuning
                    (tools/role_probe.py, 4 WikiText-2 chunks): KLD 0.163 from 32 sequences, 0.136 from 128, 0.145
                    from 256; the whole file at 0.8x llama.cpp Q2_K's size from 256: 0.1750 -> 0.1673
                    (docs/BENCHMARKS.md, session 17)

The choice of configuration (``--aq-config``, ``--bits``) and of the tensors AQ applies to
(``--tensor-method PATTERN=aq``) is made before the type plan, by :func:`plan_aq`.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, fields as dc_fields

import numpy as np
import torch

from ..errors import OptionError, QggufError
from ..runtime.threads import torch_threads
from .aq_core import CONFIGS, AQConfig, AQOptions, parse_config, quantize_matrix, to_fields
from .base import QuantContext
from .blockwise import BlockMethod, sequential_quantize, short_key, stored_weight
from .finetune import FT_KEYS as _FT_KEYS, NORM_KEYS, AQState, finetune_block, finetune_options  # noqa: F401
from .finetune import describe as _describe_ft

LINEAR_KEYS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
DEFAULT_CONFIG = "aq-2x8-g8"


# ------------------------------------------------------------------------------------------------
# options


_AQ_KEYS = {f.name for f in dc_fields(AQOptions)}
_OTHER_KEYS = {"other", "linear_threads", "verbose", "tensor_methods", "aq_config", "outliers"}

#: AQ defaults chosen for the time budget (module docstring); AQOptions' own defaults are the library's
METHOD_DEFAULTS = dict(beam=1, max_rounds=4, tol=0.01, adam_steps=20, adam_later=5, lr=5e-3, kmeans_iters=15,
                       kmeans_points=16384, damp=1.0)
#: calibration sequences (of 256 tokens) of the block pass by default: the layer fits' Gram matrices use them all,
#: the block stage its first ``ft_nsamples`` (module docstring; VQ's default is untested beyond 32)
DEFAULT_NSAMPLES = {"aq": 128, "vq": 32}
#: factors of e2e_lr the end-to-end stage also tries over its first held-out check interval by default (module
#: docstring: on SmolLM2 half the rate was better at 0.8x llama.cpp Q2_K's size, worse at --bits 3; VQ's untried)
DEFAULT_E2E_LR_TRY = {"aq": "0.5", "vq": ""}
#: share of each AQ tensor's weights kept as sparse float16 outliers by default (module docstring)
DEFAULT_OUTLIERS = 0.002


def _as_bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def _coerce(cls, values: dict):
    out = {}
    for f in dc_fields(cls):
        if f.name not in values or values[f.name] is None:
            continue
        v = values[f.name]
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        try:
            if "bool" in typ:
                v = _as_bool(v)
            elif typ.startswith("int"):
                v = None if (isinstance(v, str) and v.lower() == "none") else int(v)
            elif typ.startswith("float"):
                v = float(v)
            else:
                v = str(v)
        except (TypeError, ValueError):
            raise OptionError(f"aq option {f.name}={values[f.name]!r}: expected {typ}") from None
        out[f.name] = v
    return cls(**out)


def aq_options(options: dict) -> AQOptions:
    return _coerce(AQOptions, {**METHOD_DEFAULTS, **{k: v for k, v in options.items() if k in _AQ_KEYS}})


def config_of(qtype) -> AQConfig | None:
    """The AQ configuration of a tensor type (None for the standard types)."""
    name = getattr(qtype, "name", str(qtype))
    try:
        return parse_config(name)
    except OptionError:
        return None


# ------------------------------------------------------------------------------------------------
# the method


class AQ(BlockMethod):
    """``--method aq`` (module docstring)."""

    name = "aq"
    needs_calibration = True
    blockwise = True

    def __init__(self, calib=None, nsamples=None, seqlen=None, **options):
        options = {k: v for k, v in options.items() if k not in ("imatrix", "imatrix_out") and v is not None}
        unknown = set(options) - _AQ_KEYS - _FT_KEYS - _OTHER_KEYS - {"nsamples", "seqlen", "seed"}
        if unknown:
            raise OptionError(f"unknown aq option(s): {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(sorted(_AQ_KEYS | _FT_KEYS | {'other'}))}")
        self.aq = aq_options(options)
        self.outliers = float(DEFAULT_OUTLIERS if options.get("outliers") is None else options["outliers"])
        if not 0.0 <= self.outliers < 0.5:
            raise OptionError(f"aq option outliers={self.outliers!r}: expected a fraction of the weights in [0, 0.5)")
        self._setup(calib, nsamples, seqlen, options, "aq")

    def _setup(self, calib, nsamples, seqlen, options: dict, family: str) -> None:
        """What the codebook methods (AQ, VQ) share: block fine-tuning options, the method for the block linears
        left in standard types (``other``), and the calibration size."""
        self.calib = calib
        self.options = options
        self.ft = finetune_options(options)
        if "e2e_lr_try" not in options and not self.ft.e2e_codes:
            self.ft.e2e_lr_try = DEFAULT_E2E_LR_TRY[family]
        self.other = str(options.get("other", "imatrix")).lower()
        if self.other not in ("imatrix", "rtn", "gptq", "quantease"):
            raise OptionError(f"{family} option other={self.other!r}: expected imatrix, rtn, gptq or quantease")
        self._other_method = None
        # the block stage's default target and the end-to-end stage's teacher are the float model's activations
        self.needs_fp_inputs = (self.ft.finetune and self.ft.ft_target == "fp") or self.ft.e2e
        self.nsamples = int(nsamples or DEFAULT_NSAMPLES[family])   # (named parameters: never in ``options``)
        self.seqlen = int(seqlen or 256)

    def _describe_finetune(self) -> str:
        """The shared end of :meth:`describe`: fine-tuning and ``other``."""
        return ", " + _describe_ft(self.ft) + (f", other={self.other})" if self.other != "imatrix" else ")")

    def describe(self) -> str:
        a = self.aq
        return (f"aq(beam={a.beam}, max_rounds={a.max_rounds}, tol={a.tol:g}, adam_steps={a.adam_steps}, "
                f"lr={a.lr:g}, kmeans={a.kmeans_iters}x{a.kmeans_points}"
                + (f", outliers={self.outliers:g}" if self.outliers else "")) + self._describe_finetune()

    # -- non-AQ linears -------------------------------------------------------------------------------
    def _quantize_other(self, name, w, qtype, H, importance, ctx):
        if self.other == "rtn":
            return qtype.quantize(w)
        if self.other == "imatrix":
            return qtype.quantize(w, importance)
        if self._other_method is None:
            from .base import get_method
            self._other_method = get_method(self.other)
        if ctx.importance is None:
            ctx.importance = {}
        ctx.grams[name] = H
        ctx.importance[name] = importance
        try:
            return self._other_method.quantize_tensor(name, w, qtype, ctx)
        finally:
            ctx.grams.pop(name, None)
            ctx.importance.pop(name, None)

    # -- the token embedding / output matrix in an AQ type ---------------------------------------------------
    def quantize_tensor(self, name: str, w: np.ndarray, qtype, ctx: QuantContext) -> np.ndarray:
        """A tensor outside the blocks: a standard type by the base class's importance-weighted search; an AQ
        configuration (the token embedding / output matrix, ``--tensor-type token_embd.weight=aq-4x8-g8``) by the
        layer-wise search against ``ctx.grams[name]``, the Gram matrix of the final normed hidden states of the
        quantized model (:func:`qgguf.quantize.blockwise.run_blocks`), without sparse outliers; the end-to-end
        stage then tunes its codebooks and scales with the blocks' (``e2e_head``)."""
        cfg = config_of(qtype)
        if cfg is not None and self.name != "aq":
            raise OptionError(f"{name}: the AQ configuration {qtype.name} takes --method aq, not {self.name}")
        if cfg is None:
            from ..gguf_types.codebook import is_codebook
            if is_codebook(qtype):
                raise OptionError(f"{name}: {qtype.name} is not an AQ configuration; outside the blocks "
                                  "the codebook methods take AQ configurations or standard types")
            return super().quantize_tensor(name, w, qtype, ctx)
        H = ctx.grams.get(name)
        if H is None:
            raise QggufError(f"{name}: no Gram matrix for its AQ fit (the block pass makes it)")
        import zlib
        seed = (int(ctx.seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)
        res, _ = self._fit(ctx, name, np.array(w, np.float32), H, cfg, 0.0, seed, int(ctx.threads or 1))
        return pack(qtype, cfg, res.codes, res.codebooks, res.scales)

    def _fit(self, ctx: QuantContext, desc: str, w, H, cfg, outliers: float, seed: int, threads: int):
        """:func:`fit_matrix` on ``threads`` torch threads, with a progress bar (``desc``) of its rounds."""
        return _with_bar(ctx, f"{desc} {cfg.name}", self.aq.max_rounds * 2 + 2, threads,
                         lambda progress: fit_matrix(w, H, cfg, self.aq, outliers, seed=seed, progress=progress))

    # -- one block ------------------------------------------------------------------------------------
    def quantize_block(self, block, ctx: QuantContext) -> dict[str, np.ndarray]:
        nt = int((ctx.options or {}).get("linear_threads") or 1)
        state: dict[str, AQState] = {}
        exact: dict[str, tuple] = {}          # key -> (flat positions, original values) of the sparse outliers
        keys = {v: k for k, v in block.names.items()}

        def quantize_linear(name, w, qtype, H, importance, ctx):
            cfg = config_of(qtype)
            if cfg is None:
                return self._quantize_other(name, w, qtype, H, importance, ctx)
            key = keys[name]
            seed = (int(block.seed) * 31 + 1009 * (LINEAR_KEYS.index(key) + 1 if key in LINEAR_KEYS else 99)) % (2**63)
            res, idx = self._fit(ctx, f"blk.{block.index} {key}", w, H, cfg, self.outliers, seed, nt)
            state[key] = AQState(cfg, res.codes, res.codebooks, res.scales)
            if idx is not None:
                exact[key] = (torch.from_numpy(idx), torch.from_numpy(np.asarray(w, np.float32).reshape(-1)[idx]))
                _set_outliers(ctx, name, exact[key], state[key].dequantized())
            if ctx.progress and _as_bool(ctx.options.get("verbose", False)):
                _write(f"aq blk.{block.index} {key}: rel err {res.rel_err:.4g} ({res.seconds:.1f} s; "
                       + ", ".join(f"{s} {e:.4g}" for s, e in res.history) + ")")
            return pack(qtype, cfg, res.codes, res.codebooks, res.scales)

        packed = sequential_quantize(block, ctx, quantize_linear)
        self._finetune_block(block, packed, state, exact, ctx)
        return packed

    # -- the whole model, after the blocks ------------------------------------------------------------------
    def _state_from_packed(self, qtype, data: np.ndarray, shape):
        """The tunable state of a tensor of this method's types (None: a standard type)."""
        return AQState.from_packed(qtype, data, shape) if config_of(qtype) is not None else None

    def _tunable_state(self, qtype, data: np.ndarray, shape, has_outliers: bool):
        """What the fine-tuning stages tune of a stored tensor: the method's own state, else with ``std_scales``
        the block scales of a standard type (:class:`qgguf.quantize.finetune.GridState`; not for a tensor with
        sparse outliers), else None (it stays fixed)."""
        state = self._state_from_packed(qtype, data, shape)
        if state is None and self.ft.std_scales and not has_outliers:
            from .finetune import GridState
            state = GridState.from_packed(qtype, data, shape)
        return state

    def finish_samples(self, nsamples: int) -> int:
        if not self.ft.e2e or self.ft.e2e_epochs <= 0:
            return nsamples
        n = max(nsamples, self.ft.e2e_nsamples)
        return n + self.ft.e2e_val    # the held-out sequences come last (finetune.held_out)

    def finish_model(self, run, ctx: QuantContext) -> None:
        """The end-to-end stage (:func:`qgguf.quantize.finetune.finetune_model`): every block's codebooks, scales
        and norms against the float model's next-token distributions, then written back into the checkpoint.
        A resumed run whose checkpoint records the stage as done skips it."""
        if not self.ft.e2e or self.ft.e2e_epochs <= 0:
            return
        done = run.checkpoint.stage("e2e")
        if done is not None:
            ctx.extra["e2e"] = done
            return
        from .finetune import OUT_NORM, OUTPUT, TOK_EMBD, GridState, ModelParts, Tunables, finetune_model
        t0 = time.perf_counter()
        src, hp = run.source, run.hp
        choices = {c.name: c for c in run.plan.choices}
        names = {t.name for t in src.tensors}
        f32 = lambda n: torch.from_numpy(np.array(src.load(n), np.float32))  # noqa: E731
        head = run.head if run.head is not None else {}

        def as_stored(n, w):   # the student's tensor: as the file stores it (e2e_head=stored), else float
            if self.ft.e2e_head != "stored" or n not in head:
                return w
            c = choices[n]
            return stored_weight(run.qtypes[c.type], head[n], c.shape).reshape(-1, hp.n_embd)

        tok_f = f32("token_embd.weight").reshape(-1, hp.n_embd)
        out_f = f32("output.weight").reshape(-1, hp.n_embd) if "output.weight" in names else tok_f
        tok = as_stored("token_embd.weight", tok_f)
        out_w = as_stored("output.weight", out_f) if "output.weight" in names else tok
        out_norm = f32("output_norm.weight").reshape(-1)
        fixed, states, norms, exact, stored = [], {}, {}, {}, {}
        for il in range(hp.n_layer):
            tensors, outl, st = run.checkpoint.load(il)
            w = {}
            for n, data in tensors.items():
                key, c = short_key(n, il), choices[n]
                qt = run.qtypes[c.type]
                state = self._tunable_state(qt, data, c.shape, n in outl)
                if state is None:
                    w[key] = stored_weight(qt, data, c.shape, outl.get(n))
                    continue
                states[(il, key)] = state
                stored[il] = (tensors, outl, st)     # written back with the tuned values
                if n in outl:
                    idx = torch.from_numpy(np.asarray(outl[n][0], np.int64))
                    exact[(il, key)] = (idx, f32(n).reshape(-1)[idx].clone())
            fixed.append(w)
        if not states:
            return
        if self.ft.e2e_head == "tuned":   # the stored embedding / output matrix with their block scales tuned
            for n in (TOK_EMBD, OUTPUT):
                if n in head and n in choices:
                    qt = run.qtypes[choices[n].type]
                    st = (self._state_from_packed(qt, head[n], choices[n].shape)   # an AQ head: codebooks, scales
                          or GridState.from_packed(qt, head[n], choices[n].shape))
                    if st is not None:
                        states[n] = st
        if self.ft.e2e_norms:
            norms = {(il, k): fixed[il][k] for il in stored for k in NORM_KEYS if k in fixed[il]}
        if self.ft.e2e_out_norm and "output_norm.weight" in choices and run.head is not None:
            norms[OUT_NORM] = out_norm
        parts = ModelParts(hp, run.rope, tok, out_norm, out_w, fixed, teacher_out_norm=out_norm, teacher_out_w=out_f,
                           tied="output.weight" not in names)
        tun = Tunables(states, norms, exact)
        res = finetune_model(parts, tun, run.ids, run.teacher, self.ft, seed=run.seed, progress=run.progress)
        del parts, tun, tok, out_w, fixed, tok_f, out_f
        tuned_head = {n: res.state.pop(n) for n in (TOK_EMBD, OUTPUT) if n in res.state}
        if res.best_epoch and (OUT_NORM in res.norms or tuned_head):   # written by the pipeline from head
            if OUT_NORM in res.norms:
                c = choices["output_norm.weight"]
                v = np.asarray(res.norms.pop(OUT_NORM), np.float32).reshape(-1, c.shape[-1])
                head["output_norm.weight"] = np.ascontiguousarray(run.qtypes[c.type].quantize(v)).view(np.uint8).reshape(-1)
            for n, st in tuned_head.items():
                head[n] = np.ascontiguousarray(st.pack(run.qtypes[choices[n].type])).view(np.uint8).reshape(-1)
            run.checkpoint.save("head", head, {}, {})
        if res.best_epoch:   # write the tuned blocks back
            for (il, key), state in res.state.items():
                tensors, outl, _st = stored[il]
                n = f"blk.{il}.{key}.weight"
                tensors[n] = np.ascontiguousarray(state.pack(run.qtypes[choices[n].type])).view(np.uint8).reshape(-1)
                if (il, key) in exact:
                    outl[n] = outlier_values(exact[(il, key)], state.dequantized())
            for (il, key), v in res.norms.items():
                n = f"blk.{il}.{key}.weight"
                c = choices[n]
                stored[il][0][n] = run.qtypes[c.type].quantize(np.asarray(v, np.float32).reshape(-1, c.shape[-1]))
            for il, (tensors, outl, st) in stored.items():
                run.checkpoint.save(il, tensors, outl, st)
        from .finetune import stage_line
        info = {"start_kld": res.start_loss, "kld": res.loss, "best_epoch": res.best_epoch,
                "history": list(res.history or []), "seconds": time.perf_counter() - t0,
                "tokens": res.trained_tokens, "held_out": res.held_out,
                "train_kld": res.train_loss}
        if res.codes_changed:
            info["codes_changed"] = list(res.codes_changed)
        if res.rate_trials:
            info["lr"], info["rate_trials"] = res.lr, [list(t) for t in res.rate_trials]
        run.checkpoint.mark("e2e", info)
        ctx.extra["e2e"] = info
        if ctx.progress:
            _write(f"{self.name}: end-to-end fine-tuning, {stage_line(info)}")

    def _finetune_block(self, block, packed: dict, state: dict, exact: dict, ctx: QuantContext) -> None:
        """The block stage (:func:`qgguf.quantize.finetune.finetune_block`) of the linears in ``state``; their
        tuned bytes (and norms) replace those in ``packed``, and the sparse outliers in ``exact`` get their values
        against the tuned codebooks."""
        block.x_out = None      # recomputed by the pipeline from the final (fine-tuned) tensors
        if not (self.ft.finetune and state):
            return
        outl = ctx.extra.get("outliers", {})
        state = dict(state)
        for key, qt in block.qtypes.items():    # the block's linears in standard types (std_scales)
            if key not in state and key in packed:
                st = self._tunable_state(qt, packed[key], tuple(block.weights[key].shape), block.names.get(key) in outl)
                if st is not None:
                    state[key] = st
        nt = int((ctx.options or {}).get("linear_threads") or 1)
        t0 = time.perf_counter()
        with torch_threads(nt):
            res = finetune_block(block, packed, state, self.ft, ctx, exact=exact)
        for key, st in res.state.items():
            packed[key] = st.pack(block.qtypes[key])
            if key in exact:      # the outliers stay exact: their values against the tuned codebooks
                _set_outliers(ctx, block.names[key], exact[key], st.dequantized())
        for key, v in res.norms.items():
            packed[key] = v.astype(np.float32)
        ctx.extra.setdefault("block_loss", {})[block.index] = {
            "method": self.name, "start": res.start_loss, "loss": res.loss, "best_epoch": res.best_epoch,
            "seconds": time.perf_counter() - t0}
        if ctx.progress:
            _write(f"{self.name} block {block.index}: fine-tuned block loss {res.start_loss:.4g} -> {res.loss:.4g} "
                   f"(epoch {res.best_epoch}, {time.perf_counter() - t0:.0f} s)")


# ------------------------------------------------------------------------------------------------
# packing


#: bits per sparse outlier in the file: an int32 flat position and a float16 value (docs/FORMAT.md)
OUTLIER_BITS = 48


def salient_positions(w: np.ndarray, H: np.ndarray, fraction: float) -> np.ndarray:
    """The flat positions (sorted, int64) of the ``fraction`` of the weights with the largest saliency
    ``w_rc^2 H_cc`` (the layer-error cost of zeroing one weight, the diagonal of the Gram matrix standing for
    the rest). On SmolLM2-135M these hold the "super weights" of the early ffn_down matrices: a few inputs with
    huge activations make blk.2.ffn_down's error 9x llama.cpp's IQ2_XXS under AQ 2x8-g8 without them."""
    from ..convert.budget import outlier_count
    n = outlier_count(w.size, fraction)
    if n <= 0:
        return np.zeros(0, np.int64)
    sal = (np.asarray(w, np.float64) ** 2 * np.clip(np.diag(np.asarray(H, np.float64)), 0, None)[None, :]).reshape(-1)
    idx = np.argpartition(sal, sal.size - n)[sal.size - n:]
    return np.sort(idx).astype(np.int64)


def fit_matrix(w: np.ndarray, H: np.ndarray, cfg: AQConfig, opts: AQOptions, outliers: float = 0.0, seed: int = 0,
               progress=None):
    """AQ of one matrix with the ``outliers`` share of its most salient weights (:func:`salient_positions`) left
    to the sparse part: they are zeroed before :func:`qgguf.quantize.aq_core.quantize_matrix` fits the rest.
    Returns (the fit, their flat positions or None)."""
    idx = salient_positions(w, H, outliers) if outliers > 0 else None
    if idx is not None:
        w = np.array(w, np.float32, copy=True)
        w.reshape(-1)[idx] = 0.0
    return quantize_matrix(w, H, cfg, opts, seed=seed, progress=progress), idx


def outlier_values(exact: tuple, deq: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(int32 flat positions, float16 values) that, added to the dequantized AQ weight ``deq``, give back the
    original weights ``exact = (positions, originals)`` at the outlier positions."""
    idx, orig = exact
    vals = (orig - deq.reshape(-1)[idx].float()).numpy().astype(np.float16)
    return idx.numpy().astype(np.int32), vals


def _set_outliers(ctx: QuantContext, name: str, exact: tuple, deq: torch.Tensor) -> None:
    """``ctx.extra["outliers"][name]``: :func:`outlier_values` (the pipeline's sparse part, quantize/quantease.py)."""
    ctx.extra.setdefault("outliers", {})[name] = outlier_values(exact, deq)


def pack(qtype, cfg: AQConfig, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """The bytes of an AQ tensor: the type's ``pack`` of the fields (codes ``[C/g][M][R]``, float16
    codebooks ``[M][2^B][g]``, float32 scales ``[R]``)."""
    fields = to_fields(codes, codebooks, scales, cfg)
    return np.asarray(qtype.pack(fields))


# ------------------------------------------------------------------------------------------------
# choosing the configuration and the tensors (before the type plan)


def available_configs() -> list[AQConfig]:
    """The AQ configurations this qgguf can write (registered codebook types; all of :data:`CONFIGS`
    when the registry has none, e.g. in tests of the algorithm alone)."""
    from .. import gguf_types
    out = []
    for c in CONFIGS:
        try:
            gguf_types.get(c.name)
        except QggufError:
            continue
        out.append(c)
    return out or list(CONFIGS)


def _fallback_bytes(shape, fallback_type: str) -> int:
    from .. import gguf_types
    from ..convert.presets import _fallback
    t = _fallback(fallback_type, int(shape[-1]))
    return gguf_types.get(t).nbytes(tuple(shape))


def config_bpw(cfg: AQConfig, shapes, fallback_type: str = "Q8_0") -> float:
    """Bits per weight of the AQ tensors ``shapes`` ((rows, cols) each) in ``cfg``, counting every byte
    (codes, codebooks, scales; tensors whose rows do not divide into groups of ``g`` in their fallback)."""
    nb, n = 0, 0
    for shape in shapes:
        R, C = int(np.prod(shape[:-1])), int(shape[-1])
        nb += cfg.nbytes(R, C) if cfg.fits(C) else _fallback_bytes((R, C), fallback_type)
        n += R * C
    return 8.0 * nb / max(1, n)


def choose_config(shapes, bits: float, configs=None, fallback_type: str = "Q8_0") -> AQConfig:
    """The most accurate configuration whose true bits per weight over ``shapes`` is at most ``bits``.
    Accuracy order: more code bits per weight first; at equal code bits a 16-bit codebook (AQLM's best),
    then the smaller file (measured on SmolLM2: 2x8-g8 beats 4x8-g16, 1x8-g8 beats 2x8-g16)."""
    configs = list(configs or available_configs())
    scored = [(c, config_bpw(c, shapes, fallback_type)) for c in configs]
    fit = [(c, b) for c, b in scored if b <= bits + 1e-9]
    if not fit:
        lo = min(scored, key=lambda t: t[1])
        raise OptionError(f"--bits {bits:g}: no AQ configuration fits this model (the smallest, {lo[0].name}, "
                          f"needs {lo[1]:.3f} bits per weight)")
    fit.sort(key=lambda t: (t[0].code_bits, t[0].B, -t[1]), reverse=True)
    return fit[0][0]


def _fallback_share(shapes, names, fallback, fb_type: str, bits: float) -> float:
    """How far the budget per AQ weight must shrink to pay for the tensors that keep their fallback type."""
    if not fallback:
        return 0.0
    n_aq = sum(int(np.prod(shapes[n])) for n in names)
    n_fb = sum(int(np.prod(shapes[n])) for n in fallback)
    fb_bits = 8.0 * sum(_fallback_bytes(shapes[n], fb_type) for n in fallback)
    return max(0.0, (fb_bits - bits * n_fb) / max(1, n_aq))


def upgrade_configs(shapes: dict, base: AQConfig, bits: float, configs=None, fallback_type: str = "Q8_0") -> dict:
    """Per-tensor configurations within ``bits`` per weight over ``shapes`` ({name: (rows, cols)}), starting from
    ``base`` everywhere (:func:`choose_config`'s single choice). The codebooks are a fixed cost per matrix, so
    one configuration for all matrices leaves budget unused: at ``--bits 3`` on SmolLM2 every 3-codebook
    configuration costs more than 3 bits on the 576 x 576 matrices, and a single choice falls back to 2x8-g8
    (2.18 bits). Tensors of one shape (one role of every block) are upgraded together, largest first, one step
    at a time (the next configuration in :func:`choose_config`'s accuracy order that keeps the total within the
    budget), round after round until nothing changes, so the roles rise evenly."""
    configs = list(configs or available_configs())
    def rank(c):    # choose_config's accuracy order; at equal code bits the smaller group (and smaller codebooks)
        return (c.code_bits, c.B, -c.g)
    order = sorted(configs, key=rank, reverse=True)
    groups: dict[tuple, list[str]] = {}
    for n, sh in shapes.items():
        groups.setdefault(tuple(sh), []).append(n)
    chosen = {sh: base for sh in groups}
    n_all = sum(int(np.prod(sh)) * len(ns) for sh, ns in groups.items())

    def nbytes(sh, c):
        return config_bpw(c, [sh], fallback_type) * int(np.prod(sh)) * len(groups[sh]) / 8.0

    budget = bits * n_all / 8.0 + 1e-6
    changed = True
    while changed:
        changed = False
        for sh in sorted(groups, key=lambda t: -int(np.prod(t))):
            rest = sum(nbytes(o, chosen[o]) for o in groups if o != sh)
            cur = chosen[sh]
            for c in reversed(order):     # the next step up that fits, so that the roles rise evenly
                if not c.fits(sh[-1]) or rank(c) <= rank(cur):
                    continue
                if rest + nbytes(sh, c) <= budget:
                    chosen[sh], changed = c, True
                    break
    return {n: chosen[tuple(sh)] for n, sh in shapes.items()}


def parse_tensor_methods(items) -> list[tuple[str, re.Pattern, str]]:
    """``["PATTERN=METHOD", ...]`` -> [(pattern, compiled, method)]."""
    out = []
    for it in items or ():
        if isinstance(it, (tuple, list)):
            pat, meth = it
        else:
            pat, sep, meth = str(it).rpartition("=")
            if not sep or not pat or not meth:
                raise OptionError(f"--tensor-method {it!r}: expected PATTERN=METHOD, e.g. 'ffn_down=aq'")
        meth = meth.strip().lower()
        if meth not in ("aq", "vq", "imatrix", "rtn", "gptq", "quantease"):
            raise OptionError(f"--tensor-method {it!r}: method must be aq, vq, imatrix, rtn, gptq or quantease")
        try:
            rx = re.compile(pat.lower())
        except re.error as e:
            raise OptionError(f"--tensor-method {it!r}: bad regular expression: {e}") from None
        out.append((pat, rx, meth))
    return out


_LINEAR_RX = re.compile(r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")


@dataclass
class AQPlan:
    """What :func:`plan_aq` decided."""
    config: AQConfig
    type: str                           # the --type for everything else (a standard type or preset)
    tensors: list[str]                  # the tensors stored in the AQ type
    fallback: list[str]                 # AQ was asked for, but their rows do not divide into groups of g
    bpw: float                          # of the AQ tensors (fallbacks counted in their type)
    tensor_types: list                  # --tensor-type overrides to pass to the type plan
    token_embedding_type: str | None
    output_tensor_type: str | None
    other: str | None                   # the method of the block linears that are not AQ


#: standard types for the token embedding / output of a codebook file given --bits: (bits per weight, type) for
#: rows that divide into 256-blocks and for rows that divide into 32-blocks, smallest first
_HEAD_LADDER = {256: ((4.5, "Q4_K"), (5.5, "Q5_K"), (6.5625, "Q6_K"), (8.5, "Q8_0")),
                32: ((4.5, "IQ4_NL"), (5.5, "Q5_0"), (6.0, "Q5_1"), (8.5, "Q8_0"))}
#: how many bits per weight more than the block linears' budget the head gets under --bits (module docstring)
HEAD_EXTRA_BITS = 2.5


def head_types(shapes: dict, token_embedding_type: str | None, output_tensor_type: str | None,
               bits: float | None = None, tensor_types=()):
    """(token embedding type, output type) for a codebook-method file: the given ones; else, when the whole model
    has a bit budget (``bits`` per linear weight), the smallest standard type of at least ``bits`` +
    :data:`HEAD_EXTRA_BITS` bits per weight (``--bits 2``: IQ4_NL or Q4_K, ``--bits 3``: Q5_0 or Q5_K, ``--bits 4``:
    Q6_K or Q8_0); without a budget Q6_K where rows divide into 256-blocks and Q8_0 otherwise. A tied output is the
    token embedding, typed through the output's choice.

    Why bits + 2.5: the embedding/output matrix holds a fifth of a small model's weights, every token reads it, and
    a tied one is also the output layer, so it carries more bits than the linears; the mixed-precision search
    (convert/mixed.py, with measured KLD per tensor and type) gave SmolLM2-135M's tied embedding IQ4_NL at the
    size of the AQ 2-bit file. Q8_0 at every budget would make the head most of a 2-3 bit file.

    A ``tensor_types`` pattern (``--tensor-type``) that matches the embedding or output matrix gives it its type
    instead of this default (the explicit ``--token-embedding-type`` / ``--output-tensor-type`` win over both)."""
    from ..convert.presets import parse_tensor_types
    user = parse_tensor_types(tensor_types)

    def pinned(name: str) -> bool:
        return name in shapes and any(rx.search(name) for _p, rx, _t in user)

    def head_type(name: str) -> str:
        row = shapes[name][-1]
        if bits is None:
            return "Q6_K" if row % 256 == 0 else "Q8_0"
        ladder = _HEAD_LADDER[256] if row % 256 == 0 else _HEAD_LADDER[32] if row % 32 == 0 else ((16.0, "F16"),)
        want = float(bits) + HEAD_EXTRA_BITS
        return next((t for b, t in ladder if b >= want), ladder[-1][1])

    tied = "output.weight" not in shapes
    ote = output_tensor_type
    if ote is None:
        n = "output.weight" if not tied else "token_embd.weight"
        ote = head_type(n) if n in shapes and not pinned(n) else None
    tte = token_embedding_type
    if tte is None and not tied and "token_embd.weight" in shapes and not pinned("token_embd.weight"):
        tte = head_type("token_embd.weight")
    return tte, ote


def plan_aq(tensors, *, type: str = "Q8_0", aq_config: str | None = None, bits: float | None = None,
            tensor_methods=(), tensor_types=(), token_embedding_type: str | None = None,
            output_tensor_type: str | None = None, method: str = "aq", outliers: float = 0.0) -> AQPlan:
    """Decide the AQ configuration and the tensors it applies to. ``tensors``: (name, numpy shape) pairs.

    * AQ applies to every block linear, or with ``tensor_methods`` (``PATTERN=aq``) to the block linears
      that match; ``tensor_types`` given by the user win over AQ for the tensors they match;
    * the configuration: ``aq_config``, else ``type`` when it names one (``--type aq-2x8-g8``), else the
      best fit for ``bits`` (:func:`choose_config`), else :data:`DEFAULT_CONFIG`;
    * rows that do not divide into groups of ``g`` keep the standard type the plan gives them
      (``--type``; llama.cpp's row-length fallbacks, F16 at worst);
    * ``outliers`` (the fraction of each AQ tensor's weights kept as sparse float16 values) comes off ``bits``;
    * token_embd / output: given, else by the bit budget when AQ covers the whole model (:func:`head_types`),
      else Q6_K when the rows divide into 256 and Q8_0 otherwise."""
    shapes = {n: tuple(s) for n, s in tensors}
    tms = parse_tensor_methods(tensor_methods)
    from ..convert.presets import parse_tensor_types
    user_tt = parse_tensor_types(tensor_types)
    want = []
    other = None
    for n in sorted(shapes):
        if not _LINEAR_RX.match(n):
            continue
        if any(rx.search(n) for _p, rx, _t in user_tt):
            continue
        if tms:
            meth = next((m for _p, rx, m in tms if rx.search(n)), None)
            if meth == "aq":
                want.append(n)
            elif meth is not None and other is None:
                other = meth
        elif method == "aq":
            want.append(n)
    if not want:
        raise OptionError("AQ applies to no tensor (check --tensor-method patterns)")
    cfg = None
    if aq_config:
        cfg = parse_config(aq_config)
    elif config_of(type) is not None:
        cfg = config_of(type)
    std_type = type if config_of(type) is None else "Q8_0"
    from ..convert.presets import resolve_preset
    try:
        fb_type = resolve_preset(std_type)[2]
    except OptionError:
        fb_type = "Q8_0"
    head_bits = None if tms else bits
    if bits is not None:      # the sparse outliers (an int32 position and a float16 value each) come off the budget
        bits = float(bits) - OUTLIER_BITS * float(outliers)
    if cfg is None and bits is not None:
        cfg = choose_config([shapes[n] for n in want], float(bits), fallback_type=fb_type)
    if cfg is None:
        cfg = parse_config(DEFAULT_CONFIG)
    avail = {c.name for c in available_configs()}
    if cfg.name not in avail:
        raise OptionError(f"AQ configuration {cfg.name} is not available; choose from {', '.join(sorted(avail))}")
    aq_names = [n for n in want if cfg.fits(shapes[n][-1])]
    fallback = [n for n in want if not cfg.fits(shapes[n][-1])]
    if not aq_names:
        raise OptionError(f"{cfg.name}: no tensor has rows that divide into groups of {cfg.g}")
    per = {n: cfg for n in aq_names}
    if bits is not None and not aq_config and config_of(type) is None:
        per = upgrade_configs({n: shapes[n] for n in aq_names}, cfg, float(bits) - _fallback_share(
            shapes, aq_names, fallback, fb_type, float(bits)), fallback_type=fb_type)
    nbytes = sum(per[n].nbytes(int(np.prod(shapes[n][:-1])), int(shapes[n][-1])) for n in aq_names) + \
        sum(_fallback_bytes(shapes[n], fb_type) for n in fallback)
    n_aq = sum(int(np.prod(shapes[n])) for n in aq_names)
    bpw = (8.0 * nbytes + OUTLIER_BITS * float(outliers) * n_aq) / max(1, sum(int(np.prod(shapes[n])) for n in want))
    tt = [(re.escape(n), per[n].name.upper()) for n in aq_names] + [(p, t) for p, _rx, t in user_tt]
    tte, ote = head_types(shapes, token_embedding_type, output_tensor_type, head_bits, tensor_types)
    return AQPlan(cfg, std_type, aq_names, fallback, bpw, tt, tte, ote, other)


# ------------------------------------------------------------------------------------------------
# helpers


def _bar(ctx: QuantContext, desc: str, total: int):
    if not ctx.progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, leave=False, unit="step")


def _with_bar(ctx: QuantContext, desc: str, total: int, threads: int, fit):
    """``fit(progress)`` (a layer-wise search: AQ's, VQ's) on ``threads`` torch threads, its ``progress(stage,
    rel err)`` calls shown on a progress bar of ``total`` steps."""
    bar = _bar(ctx, desc, total)

    def progress(stage, err):
        if bar is not None:
            bar.set_postfix_str(f"{stage}: rel err {err:.4g}", refresh=False)
            bar.update(1)

    try:
        with torch_threads(threads):
            return fit(progress)
    finally:
        if bar is not None:
            bar.close()


def _write(msg: str) -> None:
    try:
        from tqdm import tqdm
        tqdm.write(msg)
    except ImportError:  # pragma: no cover
        print(msg, flush=True)


__all__ = ["AQ", "AQPlan", "plan_aq", "choose_config", "config_bpw", "available_configs", "config_of",
           "finetune_block", "pack", "parse_tensor_methods", "aq_options", "finetune_options", "DEFAULT_CONFIG"]
