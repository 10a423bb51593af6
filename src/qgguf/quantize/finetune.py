"""Fine-tuning of the codebook methods' continuous parameters with the codes (AQ) or indices (VQ) frozen.

Two stages, both Adam on the same relative parametrisation (:class:`Tunables`):

* :func:`finetune_block` (AQLM section 3.3, "fine-tuning for intra-layer cohesion"): one block's codebooks,
  scales and RMSNorm weights against the original block's outputs on the calibration set, right after the
  block's linears were quantized (run by the AQ and VQ methods inside the block pipeline).
* :func:`finetune_model` (AQLM's end-to-end fine-tuning, its appendix "global fine-tuning"; PV-Tuning's
  continuous step): after every block is quantized, the codebooks, scales and RMSNorm weights of *all* blocks
  at once against the original model's next-token distributions: the loss is the KL divergence from the float
  model's softmax to the quantized model's on the calibration sequences. The block stage matches each block's
  outputs in isolation; this stage lets a block correct what the later blocks and the output head make of its
  error, which is what the evaluation measures. Blocks run under activation checkpointing (their weights are
  rebuilt from the codebooks in the backward pass), and the logits are made a chunk of tokens at a time, so
  the memory is one block's activations plus one chunk of logits. The teacher is the float model's final hidden
  state of every calibration token (the block pipeline computes it as ``x_fp``); its logits are made per
  batch from the float output matrix. AQLM keeps the token embeddings and output matrix unquantized; here they
  are quantized too, so the student uses them as stored (``e2e_head=stored``, the default: the blocks learn to
  make up for their error too; the pipeline quantizes them before the stage) and the output RMSNorm weight is
  tuned with the blocks' (``e2e_out_norm``). ``e2e_head=float`` gives the student the float ones.

Optionally (``e2e_codes``) the end-to-end stage also moves AQ codes, PV-Tuning's discrete step (Malinovskii et
al., "PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM Compression", the linearised V step): each AQ
weight's gradient ``dL/dW`` is collected through a zero tensor added to the weight (:meth:`Tunables.track_codes`),
normalised by its running RMS and summed (:meth:`Tunables.accumulate`); every ``e2e_code_every`` steps the codes
are re-encoded towards the weight moved against that sum, a bounded share of groups changing
(:meth:`Tunables.code_step`). Codes are replaced, not changed in place, so the state kept is a snapshot of them too.

Parameters are relative (codebooks in units of their RMS, scales and norms as factors of their start), so one
learning rate suits every layer. What is tuned is what is stored: values stored as float16 are rounded to float16
in the forward pass (straight-through gradient). The block stage checks its loss over its calibration set after
every epoch and keeps the best state, the start included, so it never makes that loss worse. The end-to-end
stage trains on the calibration sequences but one held-out set (``e2e_val``, drawn after them from the same
source) and keeps the state of least KL divergence on the held-out set, checked several times per epoch: on
SmolLM2 its loss on the sequences it trained on fell to half of the KL divergence on unseen text, so the
training loss says little about the file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields as dc_fields
from typing import Any, Hashable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import OptionError
from ..runtime import model as rm
from .aq_core import AQConfig, dequantize

NORM_KEYS = ("attn_norm", "ffn_norm")


# ------------------------------------------------------------------------------------------------
# options


@dataclass
class FinetuneOptions:
    """``-O`` options of both stages (AQ and VQ)."""
    finetune: bool = True        # block stage
    ft_epochs: int = 3
    ft_lr: float = 5e-4
    ft_batch: int = 4
    ft_tol: float = 1e-3
    ft_target: str = "fp"
    ft_nsamples: int = 32        # sequences of the block stage: the first ft_nsamples of the block pass's (0: all);
                                 # the Gram matrices of the layer fits use all of them (aq.py: nsamples)
    e2e: bool = True             # end-to-end stage
    e2e_epochs: int = 1          # with e2e_nsamples=256: the cost of 128 for 2 epochs, less overfitting (aq.py)
    e2e_lr: float = 1e-3
    e2e_batch: int = 4
    e2e_tol: float = 1e-3
    e2e_norms: bool = True       # tune the RMSNorm weights of the blocks in the end-to-end stage too
    e2e_nsamples: int = 256      # calibration sequences of the end-to-end stage (at least the block pass's; more
                                 # are drawn from the same source after the block pass's, their teacher run in float)
    e2e_val: int = 32            # held-out sequences drawn after those: their KLD, checked e2e_checks times per
                                 # epoch, picks the state kept (0: the training sequences' KLD after each epoch)
    e2e_checks: int = 4          # checks of the held-out KLD per epoch
    e2e_sched: str = "constant"  # the stage's learning rate over its steps: constant, or cosine (to 0 at the end)
    e2e_lr_try: str = ""         # factors of e2e_lr (comma-separated) also tried, each from the start, over the
                                 # stage's first held-out check interval; the rate of least held-out KLD there runs
                                 # the rest of the stage (needs e2e_val; empty: e2e_lr only; AQ's default: 0.5)
    e2e_codes: float = 0.0       # PV-Tuning's discrete step in the end-to-end stage: at most this share of each AQ
                                 # linear's groups take new codes per code step (0: codes frozen, AQLM's stage)
    e2e_code_lr: float = 0.01    # the code step's move of each weight, in units of the linear's RMS per step of
                                 # RMS-normalised gradient (Tunables.code_step)
    e2e_code_every: int = 8      # optimizer steps between code steps
    e2e_head: str = "stored"     # the student's token embedding and output matrix: as stored, as stored with their
                                 # float16 block scales tuned (tuned), or float
    e2e_out_norm: bool = True    # tune the output RMSNorm weight in the end-to-end stage
    std_scales: bool = False     # tune the float16 block scales of the linears in standard types too (GridState;
                                 # on SmolLM2's mixed file it lowered the calibration KLD, not WikiText-2's)


FT_KEYS = {f.name for f in dc_fields(FinetuneOptions)}


def finetune_options(options: dict) -> FinetuneOptions:
    from .aq import _coerce
    ft = _coerce(FinetuneOptions, {k: v for k, v in options.items() if k in FT_KEYS})
    if ft.ft_target not in ("xq", "fp"):
        raise OptionError(f"option ft_target={ft.ft_target!r}: expected xq or fp")
    if ft.e2e_sched not in ("constant", "cosine"):
        raise OptionError(f"option e2e_sched={ft.e2e_sched!r}: expected constant or cosine")
    if ft.e2e_head not in ("stored", "tuned", "float"):
        raise OptionError(f"option e2e_head={ft.e2e_head!r}: expected stored, tuned or float")
    if not 0.0 <= ft.e2e_codes <= 1.0:
        raise OptionError(f"option e2e_codes={ft.e2e_codes:g}: expected a share of groups from 0 to 1")
    factors = lr_try_factors(ft)
    if factors and ft.e2e_codes > 0:
        raise OptionError("options e2e_lr_try and e2e_codes: a rate trial with code steps is not supported "
                          "(set e2e_lr_try= to turn the trial off)")
    for k in ("ft_epochs", "ft_batch", "ft_nsamples", "e2e_epochs", "e2e_batch", "e2e_nsamples", "e2e_val",
              "e2e_checks", "e2e_code_every"):
        pos = k.endswith(("batch", "checks", "every"))
        if getattr(ft, k) < (1 if pos else 0):
            raise OptionError(f"option {k}={getattr(ft, k)}: expected a {'positive' if pos else 'non-negative'} integer")
    return ft


def lr_try_factors(ft: FinetuneOptions) -> list[float]:
    """The factors of ``ft.e2e_lr`` that the end-to-end stage tries besides 1 (``e2e_lr_try``), in order."""
    out = []
    for part in str(ft.e2e_lr_try or "").replace(" ", "").split(","):
        if not part or part.lower() == "none":
            continue
        try:
            f = float(part)
        except ValueError:
            raise OptionError(f"option e2e_lr_try={ft.e2e_lr_try!r}: expected factors of e2e_lr separated by "
                              f"commas, e.g. 0.5") from None
        if not (f > 0 and math.isfinite(f)):
            raise OptionError(f"option e2e_lr_try={ft.e2e_lr_try!r}: {part} is not a positive factor")
        if f != 1.0 and f not in out:
            out.append(f)
    return out


def describe(ft: FinetuneOptions) -> str:
    s = (f"finetune={ft.ft_epochs} epochs lr={ft.ft_lr:g} batch={ft.ft_batch} tol={ft.ft_tol:g} target={ft.ft_target}"
         + (f" nsamples={ft.ft_nsamples}" if ft.ft_nsamples else "") if ft.finetune else "no finetune")
    if ft.e2e:
        s += (f", e2e={ft.e2e_epochs} epochs lr={ft.e2e_lr:g} batch={ft.e2e_batch} tol={ft.e2e_tol:g}"
              + ("" if ft.e2e_norms else " no norms") + (f" nsamples={ft.e2e_nsamples}" if ft.e2e_nsamples else "")
              + (f" held-out={ft.e2e_val} checks={ft.e2e_checks}" if ft.e2e_val else "")
              + (f" {ft.e2e_sched} schedule" if ft.e2e_sched != "constant" else "")
              + (f" also tried x{','.join(f'{f:g}' for f in lr_try_factors(ft))}"
                 if ft.e2e_val and lr_try_factors(ft) else "")
              + (f" codes {ft.e2e_codes:g}/step lr={ft.e2e_code_lr:g} every {ft.e2e_code_every}" if ft.e2e_codes
                 else "")
              + (" float head" if ft.e2e_head == "float" else " tuned head" if ft.e2e_head == "tuned" else "")
              + ("" if ft.e2e_out_norm else " no output norm"))
    if ft.std_scales:
        s += ", standard types' scales tuned"
    return s


# ------------------------------------------------------------------------------------------------
# what is tuned


@dataclass
class AQState:
    """One AQ linear: codes (R, J, M) long, codebooks (M, K, g) and scales (R,) float32. Codebooks are stored as
    float16, scales as float32 (docs/FORMAT.md)."""
    cfg: AQConfig
    codes: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor

    def tunables(self) -> dict:
        return {"codebooks": (self.codebooks, "rms", True), "scales": (self.scales, "factor", False)}

    def weight(self, values: dict) -> torch.Tensor:
        return dequantize(self.codes, values["codebooks"], values["scales"])

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.codes, self.codebooks, self.scales)

    def with_values(self, values: dict) -> "AQState":
        return AQState(self.cfg, self.codes, values["codebooks"].detach(), values["scales"].detach())

    def pack(self, qtype) -> np.ndarray:
        from .aq import pack
        return pack(qtype, self.cfg, self.codes, self.codebooks, self.scales)

    @classmethod
    def from_packed(cls, qtype, data: np.ndarray, shape) -> "AQState":
        """The state of an AQ tensor's bytes (``qtype.unpack``: codes [C/g][M][R], codebooks, scales)."""
        from .aq import config_of
        f = qtype.unpack(np.asarray(data).view(np.uint8), tuple(shape))
        codes = torch.from_numpy(np.ascontiguousarray(np.asarray(f["codes"]).astype(np.int64).transpose(2, 0, 1)))
        return cls(config_of(qtype), codes, torch.from_numpy(np.asarray(f["codebooks"], np.float32)),
                   torch.from_numpy(np.asarray(f["scales"], np.float32).reshape(-1)))


@dataclass
class GridState:
    """A linear in a standard ggml type (the types of :mod:`qgguf.quantize.grid`): its codes and integer
    sub-block scales frozen, its float16 (super-)block scale ``d`` and, where the type has one, its float16
    offset scale (``m`` of Q4_1/Q5_1, ``dmin`` of Q2_K/Q4_K/Q5_K) tuned. Every block's weights are
    ``d * U + o * V``: ``U`` the code's level times the integer sub-block scale (``grid.affine`` at ``d = 1``),
    ``V`` the offset's multiplier (1, or minus the integer sub-block min), both fixed. Tuning these scales with
    the codes frozen is what AutoRound's min/max tuning and the AQ/VQ stages' scale tuning do; the bytes keep
    the type, so a file of standard types still loads in llama.cpp."""
    fields: dict                    # the unpacked fields (codes and integer sub-block scales as stored)
    U: torch.Tensor                 # (R, nb, block) float32
    V: torch.Tensor | None          # (R, nb, block) float32, or None for types without an offset
    d: torch.Tensor                 # (R, nb) float32 (float16 values)
    o: torch.Tensor | None          # (R, nb) float32 (float16 values)
    off: str | None                 # the offset field's name: "m", "dmin" or None

    def tunables(self) -> dict:
        t = {"d": (self.d, "factor", True)}
        if self.off is not None:
            t[self.off] = (self.o, "factor", True)
        return t

    def weight(self, values: dict) -> torch.Tensor:
        w = values["d"][..., None] * self.U
        if self.off is not None:
            w = w + values[self.off][..., None] * self.V
        return w.reshape(self.U.shape[0], -1)

    def dequantized(self) -> torch.Tensor:
        return self.weight({"d": self.d, **({self.off: self.o} if self.off else {})})

    def with_values(self, values: dict) -> "GridState":
        return GridState(self.fields, self.U, self.V, values["d"].detach(),
                         values[self.off].detach() if self.off else None, self.off)

    def pack(self, qtype) -> np.ndarray:
        f = dict(self.fields)
        f["d"] = self.d.numpy().astype(np.float16)
        if self.off is not None:
            f[self.off] = self.o.numpy().astype(np.float16)
        return np.asarray(qtype.pack(f))

    @classmethod
    def from_packed(cls, qtype, data: np.ndarray, shape) -> "GridState | None":
        """The state of a standard-type tensor's bytes; None for a type without a grid (F16, F32, AQ, ...)."""
        from . import grid
        if not grid.supports(qtype):
            return None
        sp = grid.spec_of(qtype)
        R, C = int(np.prod(shape[:-1])), int(shape[-1])
        f = qtype.unpack(np.asarray(data).view(np.uint8).reshape(R, -1))
        off = next((k for k in ("m", "dmin") if k in sp.scale_fields), None)
        unit = {k: np.ones_like(np.asarray(f[k])) for k in ("d", off) if k is not None}
        A1, B1 = grid.affine(sp.name, {**f, **unit})
        k = np.asarray(f["q"]).reshape(R, C).astype(np.int64) - sp.field_offset
        nb = C // sp.block_size
        U = torch.from_numpy((A1 * sp.levels[k]).reshape(R, nb, sp.block_size))
        V = torch.from_numpy(np.ascontiguousarray(B1.reshape(R, nb, sp.block_size))) if off else None
        d = torch.from_numpy(np.asarray(f["d"], np.float32).reshape(R, nb))
        o = torch.from_numpy(np.asarray(f[off], np.float32).reshape(R, nb)) if off else None
        return cls(f, U, V, d, o, off)


class _F16STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.half().float()

    @staticmethod
    def backward(ctx, g):
        return g


class Tunables:
    """The tunable parameters of some quantized linears (states with ``tunables()``/``weight()``/
    ``with_values()``: :class:`AQState`, :class:`qgguf.quantize.vq.VQState`) and RMSNorm weights, by any
    hashable key (a block's short keys, or ``(block, key)`` for the whole model). ``exact``: key -> (flat
    positions, values) held fixed in that linear's weight (AQ's sparse outliers)."""

    def __init__(self, states: dict, norms: dict | None = None, exact: dict | None = None):
        self.states = dict(states)
        self.exact = dict(exact or {})
        self.lin: dict[Hashable, dict] = {}
        self.norms: dict[Hashable, tuple] = {}
        self.params: list[torch.Tensor] = []
        for k, st in self.states.items():
            ps = {}
            for name, (t0, mode, half) in st.tunables().items():
                if mode == "factor":
                    ps[name] = (t0.clone(), 1.0, torch.ones_like(t0).requires_grad_(True), half)
                else:
                    rms = float(t0.pow(2).mean().sqrt()) or 1.0
                    ps[name] = (None, rms, (t0 / rms).clone().requires_grad_(True), half)
                self.params.append(ps[name][2])
            self.lin[k] = ps
        for k, n0 in (norms or {}).items():
            pn = torch.ones_like(n0).requires_grad_(True)
            self.norms[k] = (n0.detach().clone(), pn)
            self.params.append(pn)
        self.probe: dict[Hashable, torch.Tensor] = {}   # key -> zero leaf added to the weight: its .grad is dL/dW
        self.moves: dict[Hashable, tuple] = {}          # key -> (sum of normalised gradients, EMA of g^2, steps)

    @staticmethod
    def _values(ps: dict, grad: bool) -> dict:
        out = {}
        for name, (t0, rms, p, half) in ps.items():
            val = t0 * p if t0 is not None else p * rms
            if half:
                val = _F16STE.apply(val) if grad else val.half().float()
            out[name] = val
        return out

    def weight(self, key, grad: bool) -> torch.Tensor:
        w = self.states[key].weight(self._values(self.lin[key], grad))
        if grad and key in self.probe:
            w = w + self.probe[key]
        if key in self.exact:
            idx, vals = self.exact[key]
            w = w.reshape(-1).index_put((idx,), vals).reshape(w.shape)
        return w

    def norm(self, key) -> torch.Tensor:
        n0, pn = self.norms[key]
        return n0 * pn

    def weights(self, grad: bool, keys=None) -> dict:
        keys = set(self.lin) | set(self.norms) if keys is None else keys
        out = {k: self.weight(k, grad) for k in self.lin if k in keys}
        out.update({k: self.norm(k) for k in self.norms if k in keys})
        return out

    def snapshot(self) -> tuple[list[torch.Tensor], dict]:
        """The continuous parameters (copies) and the states (codes are replaced, never changed in place)."""
        return [p.detach().clone() for p in self.params], dict(self.states)

    @torch.no_grad()
    def restore(self, snap: tuple[list[torch.Tensor], dict]) -> None:
        for p, v in zip(self.params, snap[0]):
            p.copy_(v)
        self.states.update(snap[1])

    # -- PV-Tuning's code step (AQ states only) --------------------------------------------------

    def track_codes(self) -> list:
        """Start collecting ``dL/dW`` of every AQ linear (a zero tensor added to its weight in the forward pass);
        returns their keys."""
        keys = [k for k, st in self.states.items() if isinstance(st, AQState)]
        for k in keys:
            R, J, M = self.states[k].codes.shape
            # one stored zero, broadcast: only its gradient takes the weight's memory
            self.probe[k] = torch.zeros(()).expand(R, J * self.states[k].codebooks.shape[-1]).requires_grad_(True)
        return keys

    @torch.no_grad()
    def accumulate(self, beta2: float = 0.95, eps: float = 1e-12) -> None:
        """After a backward pass: add each tracked weight's gradient, normalised by the running RMS of its
        gradients (RMSprop's statistics, bias-corrected), to its pending move; clear the gradient."""
        for k, p in self.probe.items():
            g = p.grad
            if g is None:
                continue
            acc, v, t = self.moves.get(k) or (torch.zeros_like(g), torch.zeros_like(g), 0)
            t += 1
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            acc.addcdiv_(g, (v / (1 - beta2 ** t)).sqrt_().add_(eps))
            self.moves[k] = (acc, v, t)
            p.grad = None

    @torch.no_grad()
    def code_step(self, lr: float, max_fraction: float) -> tuple[int, int]:
        """PV-Tuning's V step on every tracked AQ linear: the target is the current weight moved against its
        pending normalised gradient by ``lr`` times the weight's RMS per unit; codes re-encoded towards it
        (:func:`qgguf.quantize.aq_core.reencode_l2`, at most ``max_fraction`` of the groups change). Groups that
        changed drop their pending move, the others keep it. Returns (groups changed, groups)."""
        from .aq_core import reencode_l2
        changed = total = 0
        for k, (acc, v, t) in self.moves.items():
            st = self.states[k]
            vals = self._values(self.lin[k], False)
            w = st.weight(vals)
            rms = float(w.pow(2).mean().sqrt()) or 1.0
            codes, mask = reencode_l2(w - lr * rms * acc, vals["codebooks"], vals["scales"], st.codes, max_fraction)
            g = st.codebooks.shape[-1]
            acc.masked_fill_(mask.repeat_interleave(g, 1), 0.0)
            if bool(mask.any()):
                self.states[k] = AQState(st.cfg, codes, st.codebooks, st.scales)
            changed += int(mask.sum())
            total += mask.numel()
        return changed, total

    @torch.no_grad()
    def result(self) -> tuple[dict, dict]:
        """The tuned states (values rounded as stored) and norms (float32 numpy)."""
        states = {k: self.states[k].with_values(self._values(ps, False)) for k, ps in self.lin.items()}
        norms = {k: (n0 * pn).numpy().astype(np.float32) for k, (n0, pn) in self.norms.items()}
        return states, norms


@dataclass
class FinetuneResult:
    state: dict            # key -> tuned state (the given states when the start was best)
    norms: dict            # key -> float32 numpy (empty when the start was best)
    start_loss: float      # the checked loss (``full_loss``) at the start ...
    loss: float            # ... and of the state kept
    best_epoch: float      # when the kept state was checked, in epochs (0: the start; 0.5: half-way through the first)
    history: list = None   # the checked loss at each check
    train_loss: float | None = None   # mean of the last epoch's batch losses (each taken before its step)
    held_out: int = 0      # how many sequences (the last ones) the checked loss scored and no step trained on
    trained_tokens: int = 0   # tokens of the sequences trained on
    codes_changed: list = None   # per code step (e2e_codes): the share of the AQ groups that took new codes
    lr: float | None = None      # the learning rate that ran the stage (after a rate trial: the one chosen)
    rate_trials: list = None     # a rate trial's [(rate, checked loss at its first check)], in the order tried


def _train(tun: Tunables, states: dict, full_loss, batch_loss, n: int, bs: int, epochs: int, lr: float, tol: float,
           seed: int, bar=None, label: str = "loss", checks: int = 1, sched: str = "constant",
           after_step=None, try_rates=()) -> FinetuneResult:
    """Adam over ``n`` samples in shuffled batches of ``bs`` for up to ``epochs`` epochs; ``full_loss()`` at
    ``checks`` evenly spaced points of each epoch (its end included), the best state kept (the start included);
    stops early when an epoch improves the loss by less than ``tol``. ``full_loss`` may score other samples than
    the trained ones (the end-to-end stage's held-out sequences). ``sched``: the learning rate stays ``lr``
    (constant) or follows a half cosine from ``lr`` at the first step to 0 after the last of ``epochs``.
    ``after_step(step)``: called after every optimizer step (1, 2, ...), before any check (the code step).
    ``try_rates``: other rates, each run from the start over the same batches up to the first check (as is
    ``lr``); the rate whose first check scored least (``lr`` on a tie) goes on from its own state and Adam
    moments, as if it had run alone; the others' steps are dropped."""
    start = full_loss()
    best = (start, tun.snapshot(), 0)
    history = []
    gen = torch.Generator().manual_seed(int(seed) + 17)
    bs = max(1, min(int(bs), n))
    nb = -(-n // bs)
    checks = max(1, min(int(checks), nb))
    at = {round(nb * (j + 1) / checks) for j in range(checks)}     # batch counts after which full_loss runs
    steps = max(1, int(epochs)) * nb
    rates = [float(lr)] + [r for r in dict.fromkeys(float(r) for r in try_rates) if r != float(lr)]
    trials = None
    prev, train = start, None

    def new_opt(rate: float):
        return torch.optim.Adam(tun.params, lr=rate, betas=(0.9, 0.95))

    def one_step(opt, rate: float, step: int, idx) -> float:
        if sched == "cosine":
            for grp in opt.param_groups:
                grp["lr"] = rate * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        with torch.enable_grad():
            loss = batch_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if after_step is not None:
            after_step(step)
        return float(loss.detach()) * len(idx)

    def checked(cur: float, when: float) -> None:
        nonlocal best
        history.append(cur)
        if cur < best[0]:
            best = (cur, tun.snapshot(), when)
        if bar is not None:
            bar.set_postfix_str(f"{label} {start:.4g} -> {cur:.4g}", refresh=False)
            bar.update(1)

    opt, step = None, 0
    try:
        for ep in range(1, max(0, int(epochs)) + 1):
            order = torch.randperm(n, generator=gen)
            tot, cur, done = 0.0, prev, 0
            if ep == 1 and len(rates) > 1:    # the rate trial: each rate over the batches up to the first check
                first = min(at)
                start_snap = tun.snapshot()
                outcomes = []
                for rate in rates:
                    tun.restore(start_snap)
                    o = new_opt(rate)
                    t = sum(one_step(o, rate, b, order[(b - 1) * bs:b * bs]) for b in range(1, first + 1))
                    loss_r = full_loss()
                    outcomes.append((loss_r, rate, o, t, tun.snapshot()))
                    if bar is not None:
                        bar.set_postfix_str(f"rate {rate:g}: {label} {start:.4g} -> {loss_r:.4g}", refresh=False)
                        bar.update(1)
                trials = [(rate, loss_r) for loss_r, rate, *_ in outcomes]
                cur, lr, opt, tot, snap = min(outcomes, key=lambda o: o[0])
                del outcomes, start_snap
                tun.restore(snap)
                history.append(cur)
                if cur < best[0]:
                    best = (cur, snap, first / nb)
                step = done = first
            if opt is None:
                opt = new_opt(lr)
            for b in range(done + 1, nb + 1):
                step += 1
                idx = order[(b - 1) * bs:b * bs]
                tot += one_step(opt, lr, step, idx)
                if b in at:
                    cur = full_loss()
                    checked(cur, ep - 1 + b / nb)
            train = tot / n
            if prev - cur < tol * prev:
                break
            prev = cur
    finally:
        if bar is not None:
            bar.close()
    tun.restore(best[1])
    if not best[2]:   # the start was best: keep the given states and the original norms
        res = FinetuneResult(dict(states), {}, start, best[0], 0, history, train)
    else:
        out_state, out_norms = tun.result()
        res = FinetuneResult(out_state, out_norms, start, best[0], best[2], history, train)
    res.lr, res.rate_trials = float(lr), trials
    return res


# ------------------------------------------------------------------------------------------------
# block stage


def finetune_block(block, packed: dict, state: dict, ft: FinetuneOptions, ctx, exact: dict | None = None
                   ) -> FinetuneResult:
    """Adam on the codebooks, scales and RMSNorm weights of one block (codes frozen) against the original
    block's outputs (module docstring). ``state``: short key -> :class:`AQState` or VQ state; ``exact``: short
    key -> (flat positions, values) of the sparse outliers."""
    from .aq import _bar
    hp, rope = block.hp, block.rope
    n = block.nsamples if not ft.ft_nsamples else min(int(ft.ft_nsamples), block.nsamples)
    x = block.x_q[:n]
    orig = dict(block.weights)
    base = block.current()
    for k in block.qtypes:   # the block's other quantized linears as stored
        if k not in state:
            base[k] = block.dequantized(k, packed[k], ctx)
    src = block.x_fp if (ft.ft_target == "fp" and block.x_fp is not None) else block.x_q
    with torch.no_grad():
        target = torch.empty_like(x)
        for sl in block.chunks(n):
            target[sl] = rm.block_forward(hp, orig, src[sl], rope)
    tnorm = float(target.double().pow(2).mean()) or 1.0
    tun = Tunables(state, {k: base[k] for k in NORM_KEYS if k in base and k in orig}, exact)

    def weights(grad: bool) -> dict:
        w = dict(base)
        w.update(tun.weights(grad))
        return w

    @torch.no_grad()
    def full_loss() -> float:
        w = weights(False)
        tot = 0.0
        for sl in block.chunks(n):
            d = rm.block_forward(hp, w, x[sl], rope) - target[sl]
            tot += float(d.double().pow(2).sum())
        return tot / (target.numel() * tnorm)

    def batch_loss(idx):
        out = rm.block_forward(hp, weights(True), x[idx], rope)
        return (out - target[idx]).pow(2).mean() / tnorm

    bar = _bar(ctx, f"blk.{block.index} finetune", max(1, ft.ft_epochs))
    return _train(tun, state, full_loss, batch_loss, x.shape[0], ft.ft_batch, ft.ft_epochs, ft.ft_lr, ft.ft_tol,
                  block.seed, bar, "block loss")


# ------------------------------------------------------------------------------------------------
# end-to-end stage

#: tokens per chunk of the output head in the end-to-end loss (a chunk's logits are n_vocab floats per token)
HEAD_CHUNK = 256


#: the key of the output RMSNorm weight among a :class:`Tunables`' norms in :func:`finetune_model`
OUT_NORM = "output_norm"
#: the keys of the token embedding and the output matrix among a :class:`Tunables`' linears (``e2e_head=tuned``)
TOK_EMBD, OUTPUT = "token_embd.weight", "output.weight"


@dataclass
class ModelParts:
    """What :func:`finetune_model` needs of the model: hyper-parameters, rope tables, the student's token
    embedding (n_vocab, n_embd), output norm (its start value) and output matrix, per block the weights that
    stay fixed (short key -> float32 tensor: the other linears as stored, and the norms' start values), and the
    teacher's (float) output norm and matrix (None: the student's)."""
    hp: Any
    rope: Any
    tok_embd: torch.Tensor
    out_norm: torch.Tensor
    out_w: torch.Tensor
    fixed: list[dict]
    teacher_out_norm: torch.Tensor | None = None
    teacher_out_w: torch.Tensor | None = None
    tied: bool = False              # the output matrix is the token embedding

    def head(self, tun: "Tunables", grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's (token embedding, output matrix): tuned ones where ``tun`` holds them (keys
        :data:`TOK_EMBD`, :data:`OUTPUT`), else the fixed ones."""
        n = self.hp.n_embd
        tok = tun.weight(TOK_EMBD, grad).reshape(-1, n) if TOK_EMBD in tun.lin else self.tok_embd
        if OUTPUT in tun.lin:
            out = tun.weight(OUTPUT, grad).reshape(-1, n)
        else:
            out = tok if self.tied else self.out_w
        return tok, out


def _kl_chunks(parts: ModelParts, h: torch.Tensor, t: torch.Tensor, out_norm: torch.Tensor,
               out_w: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of KL(softmax(teacher logits) || softmax(student logits)) for student hidden states ``h``
    and teacher hidden states ``t`` (both (N, n_embd), before the final norm; the student's output norm
    ``out_norm`` and output matrix ``out_w``), a chunk of tokens at a time."""
    tot = h.new_zeros(())
    t_norm = parts.out_norm if parts.teacher_out_norm is None else parts.teacher_out_norm
    t_w = out_w.detach() if parts.teacher_out_w is None else parts.teacher_out_w
    for s in range(0, h.shape[0], HEAD_CHUNK):
        def chunk(hs, ts, ow, on):
            lp = F.log_softmax(rm.lm_head(ow, rm.final_norm(parts.hp, on, hs)), -1)
            with torch.no_grad():
                lt = F.log_softmax(rm.lm_head(t_w, rm.final_norm(parts.hp, t_norm, ts)), -1)
            return (lt.exp() * (lt - lp)).sum()
        hs, ts = h[s:s + HEAD_CHUNK], t[s:s + HEAD_CHUNK]
        tot = tot + (checkpoint(chunk, hs, ts, out_w, out_norm, use_reentrant=False) if hs.requires_grad
                     else chunk(hs, ts, out_w, out_norm))
    return tot


def finetune_model(parts: ModelParts, tun: Tunables, ids: torch.Tensor, teacher: torch.Tensor,
                   ft: FinetuneOptions, seed: int = 0, progress: bool = True) -> FinetuneResult:
    """The end-to-end stage (module docstring). ``tun``: keyed by ``(block index, short key)`` (and
    :data:`OUT_NORM`, the output norm); ``ids``: (nsamples, seqlen) calibration tokens; ``teacher``: the float
    model's final hidden states of them (nsamples, seqlen, n_embd). The last ``ft.e2e_val`` sequences
    (:func:`held_out`) are held out: the stage trains on the others and keeps the state of least KL divergence
    on them, checked ``ft.e2e_checks`` times per epoch; without them it checks the training sequences after
    each epoch. Returns the tuned states and norms under the same keys; the losses are mean KL divergences per
    token (``start_loss``/``loss``: of the checked sequences; ``train_loss``: of the last epoch's batches)."""
    from ..runtime.threads import no_nested_openmp
    no_nested_openmp()   # MKL inside torch's parallel regions must not start nested teams (runtime/threads.py)
    hp = parts.hp
    n_layer = len(parts.fixed)
    per_block = [[k for k in list(tun.lin) + list(tun.norms) if isinstance(k, tuple) and k[0] == il]
                 for il in range(n_layer)]
    ntok = float(ids.shape[1])

    def block_weights(il: int, grad: bool) -> dict:
        w = dict(parts.fixed[il])
        w.update({k[1]: v for k, v in tun.weights(grad, set(per_block[il])).items()})
        return w

    def run(idx, grad: bool, tok: torch.Tensor) -> torch.Tensor:
        x = rm.embed(tok, ids[idx])
        for il in range(n_layer):
            if grad and per_block[il]:
                def blk(a, il=il):
                    return rm.block_forward(hp, block_weights(il, True), a, parts.rope)
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = rm.block_forward(hp, block_weights(il, False), x, parts.rope)
        return x

    def out_norm() -> torch.Tensor:
        return tun.norm(OUT_NORM) if OUT_NORM in tun.norms else parts.out_norm

    n_val = held_out(ft, int(ids.shape[0]))
    n_train = int(ids.shape[0]) - n_val
    first = n_train if n_val else 0      # the sequences full_loss scores: the held-out ones, else all

    @torch.no_grad()
    def full_loss() -> float:
        tot = 0.0
        tok, out_w = parts.head(tun, False)
        for s in range(first, ids.shape[0], max(1, ft.e2e_batch)):
            idx = torch.arange(s, min(s + max(1, ft.e2e_batch), ids.shape[0]))
            h = run(idx, False, tok)
            tot += float(_kl_chunks(parts, h.reshape(-1, h.shape[-1]), teacher[idx].reshape(-1, h.shape[-1]),
                                    out_norm(), out_w))
        return tot / ((ids.shape[0] - first) * ntok)

    def batch_loss(idx):
        tok, out_w = parts.head(tun, True)
        h = run(idx, True, tok)
        return _kl_chunks(parts, h.reshape(-1, h.shape[-1]), teacher[idx].reshape(-1, h.shape[-1]),
                          out_norm(), out_w) / (len(idx) * ntok)

    after_step, shares = None, []
    if ft.e2e_codes > 0 and tun.track_codes():     # PV-Tuning: code steps between the continuous ones
        def after_step(step: int) -> None:
            tun.accumulate()
            if step % ft.e2e_code_every == 0:
                changed, total = tun.code_step(ft.e2e_code_lr, ft.e2e_codes)
                shares.append(changed / max(1, total))

    # the rate trial needs held-out sequences (its pick must not be scored on the batches it trained on)
    try_rates = [ft.e2e_lr * f for f in lr_try_factors(ft)] if n_val and ft.e2e_epochs > 0 else []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=max(1, ft.e2e_epochs) * (ft.e2e_checks if n_val else 1) + len(try_rates),
                   desc="end-to-end finetune", unit="check", leave=False)
    states0 = dict(tun.states)
    res = _train(tun, states0, full_loss, batch_loss, n_train, ft.e2e_batch, ft.e2e_epochs, ft.e2e_lr,
                 ft.e2e_tol, seed, bar, "held-out KLD" if n_val else "KLD", ft.e2e_checks if n_val else 1,
                 ft.e2e_sched, after_step, try_rates)
    tun.probe.clear()
    tun.moves.clear()
    res.held_out, res.trained_tokens = n_val, int(ids[:n_train].numel())
    res.codes_changed = shares or None
    return res


def stage_line(info: dict) -> str:
    """The end-to-end stage's outcome in words, from the record AQ/VQ keep of it (``ConversionReport.e2e``)."""
    what = f"held-out KLD ({info['held_out']} sequences)" if info.get("held_out") else "calibration KLD"
    s = f"{what} {info['start_kld']:.4g} -> {info['kld']:.4g} (best at epoch {info['best_epoch']:.3g}"
    if info.get("held_out") and info.get("train_kld") is not None:
        s += f"; training batches {info['train_kld']:.4g}"
    if info.get("rate_trials"):
        s += (f"; rate {info['lr']:g} chosen at its first check ("
              + ", ".join(f"{r:g}: {v:.4g}" for r, v in info["rate_trials"]) + ")")
    if info.get("codes_changed"):
        ch = info["codes_changed"]
        s += f"; {len(ch)} code steps, their new codes {100 * sum(ch):.3g} % of the AQ groups (summed over steps)"
    return s + f", {info['seconds']:.0f} s)"


def held_out(ft: FinetuneOptions, n: int) -> int:
    """How many of the end-to-end stage's ``n`` sequences (the last ones) are held out: ``ft.e2e_val`` when at
    least one is left to train on, else none (AQ asks the block pass for ``e2e_val`` sequences more than it
    trains on: :meth:`qgguf.quantize.aq.AQ.finish_samples`)."""
    v = int(ft.e2e_val)
    return v if 0 < v < n else 0


__all__ = ["FinetuneOptions", "finetune_options", "lr_try_factors", "AQState", "GridState", "Tunables", "FinetuneResult", "finetune_block",
           "ModelParts", "finetune_model", "held_out", "stage_line", "FT_KEYS", "NORM_KEYS", "OUT_NORM",
           "TOK_EMBD", "OUTPUT"]
