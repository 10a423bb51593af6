"""Up-front resource checks of a conversion plan (issue 7), made before any work is spent:

* :func:`expected_output_bytes`: the output file's bytes (every planned tensor, aligned, plus the metadata) and,
  for block methods, the per-block checkpoints beside it (they hold the packed block tensors until the file is
  written) - compared with the destination folder's free space (:meth:`OutputFile.check_space`);
* :func:`estimate_peak_memory`: the plan's peak resident memory, for ``--max-memory`` (:func:`check_memory`)
  and the report.

The memory model (bytes; float32 unless said otherwise):

* a base for the interpreter and libraries: 200 MiB, 400 MiB once torch is imported (calibrated methods);
* tensor-by-tensor quantization: the largest tensor as float32 times 1.5 (the array plus the type search's
  temporaries);
* calibration through the whole float model (``imatrix``; ``--calib self`` sampling of the block methods):
  every weight as float32 plus the float32 token embedding and one batch of logits (64 x vocabulary);
* block methods (``gptq``, ``quantease``, ``autoround``, ``aq``, ...): the activation sets of
  ``nsamples x seqlen`` tokens (``x_q``, the residual after attention, the block output: 3 x n_embd, the attention
  output, the FFN hidden state; ``x_fp`` too for methods that read the float model's inputs), the widest input's
  Gram matrix: 8 float64 copies and a float32 one (the matrix, its cleaned and damped copies, the Cholesky factor,
  its inverse and the upper factor coexist inside GPTQ's inverse_cholesky; measured on the Llama-3.2-1B shape,
  ffn_down's 8192 x 8192 matrix took the peak to 5.17 GB; AutoRound has none unless it starts from GPTQ), and one
  block's weights three times (originals, working copy, dequantized result; six times for the methods
  that fine-tune with Adam: autoround, aq, vq).

The phases do not overlap (activations are freed before the tensors outside the blocks are quantized), so the
estimate is the base plus the largest phase. It is an estimate, meant to refuse plans that cannot fit (a 7B model
with 128 x 2048 calibration tokens on an 8 GB machine), not to predict RSS to the megabyte; the convert report shows
it next to the measured peak RSS.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import OptionError

ALIGNMENT = 32
MiB = 1 << 20
BASE_PLAIN = 200 * MiB
BASE_TORCH = 400 * MiB
TENSOR_FACTOR = 1.5
LOGIT_BATCH = 64

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text, what: str = "--max-memory") -> int:
    """``"2GB"`` -> 2e9, ``"1500MB"``, ``"1.5GiB"``, ``"4g"``, ``"123456"`` (bytes); decimal units unless ``iB``."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        n = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise OptionError(f"{what} wants a size such as 2GB, 1500MB or 1.5GiB, got {text!r}")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise OptionError(f"{what} must be positive, got {text!r}")
    return n


def _aligned(n: int) -> int:
    return (int(n) + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _value_bytes(v) -> int:
    if isinstance(v, str):
        return 8 + len(v.encode("utf-8", "replace"))
    if isinstance(v, (bytes, bytearray)):
        return 8 + len(v)
    if isinstance(v, np.ndarray):
        return 12 + int(v.nbytes) + (8 * v.size if v.dtype.kind in "OUS" else 0)
    if isinstance(v, (list, tuple)):
        return 12 + sum(_value_bytes(x) for x in v)
    return 8


def metadata_bytes(metadata: dict) -> int:
    """About the bytes the key/value section takes (keys, values, strings with their lengths)."""
    n = 0
    for k, mv in metadata.items():
        n += 12 + len(k) + _value_bytes(getattr(mv, "value", mv))
    return n


def tensor_bytes(shape, qt) -> int:
    """Bytes of one planned tensor (a codebook type: all its companions), each aligned as in the file."""
    from ..gguf_types.codebook import is_codebook
    shape = tuple(int(s) for s in shape)
    if is_codebook(qt):
        return sum(_aligned(spec.nbytes) for spec in qt.companion_specs(shape))
    return _aligned(qt.nbytes(shape))


def expected_output_bytes(plan, qtypes: dict, metadata: dict, blockwise: bool) -> tuple[int, int]:
    """(output file bytes, checkpoint bytes) of a plan: the tensors in their planned types plus the metadata and
    tensor table; the checkpoints of a block method hold the block tensors' packed bytes once more."""
    data = 0
    blocks = 0
    for c in plan.choices:
        nb = tensor_bytes(c.shape, qtypes[c.type])
        data += nb
        if c.name.startswith("blk."):
            blocks += nb
    table = sum(40 + len(c.name) for c in plan.choices)
    return data + metadata_bytes(metadata) + table + 4096, (blocks if blockwise else 0)


@dataclass
class MemoryEstimate:
    total: int
    parts: dict[str, int] = field(default_factory=dict)   # phase -> bytes (without the base)
    base: int = BASE_PLAIN
    block: dict[str, int] = field(default_factory=dict)   # the block phase's parts

    def describe(self) -> str:
        top = max(self.parts, key=self.parts.get) if self.parts else "base"
        detail = ""
        if top.startswith("block") and self.block:
            detail = " (" + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in self.block.items()) + ")"
        return (f"about {self.total / 2**30:.2f} GiB ({self.base / MiB:.0f} MiB base + "
                f"{self.parts.get(top, 0) / 2**30:.2f} GiB for {top}{detail})")


def _numel(shape) -> int:
    return int(np.prod([int(s) for s in shape], dtype=np.int64)) if len(shape) else 1


def estimate_peak_memory(source, plan, method, blockwise: bool, nsamples: int, seqlen: int,
                         calib=None) -> MemoryEstimate:
    """The plan's estimated peak resident bytes (module docstring)."""
    shapes = {t.name: tuple(t.shape) for t in source.tensors}
    largest = max((_numel(s) for s in shapes.values()), default=0)
    parts = {"quantizing the largest tensor": int(largest * 4 * TENSOR_FACTOR)}
    needs_calib = bool(getattr(method, "needs_calibration", False))
    base = BASE_TORCH if needs_calib or blockwise else BASE_PLAIN
    total_params = sum(_numel(s) for s in shapes.values())
    emb = shapes.get("token_embd.weight", (0, 0))
    vocab = int(emb[0]) if len(emb) == 2 else 0
    n_embd = int(emb[1]) if len(emb) == 2 else 0
    full_model = total_params * 4 + (vocab * n_embd * 4 if "output.weight" not in shapes else 0)
    if needs_calib and (not blockwise or calib is None or str(calib) == "self"):
        parts["calibration through the float model"] = full_model + vocab * n_embd * 4 + LOGIT_BATCH * vocab * 4
    if blockwise:
        blk = {n[len("blk.0."):]: s for n, s in shapes.items() if n.startswith("blk.0.")}
        attn = int(blk.get("attn_q.weight", (n_embd,))[0])
        n_ff = int(blk.get("ffn_up.weight", blk.get("ffn_gate.weight", (n_embd,)))[0])
        widths = 3 * n_embd + attn + n_ff
        if getattr(method, "needs_fp_inputs", False):
            widths += n_embd
        acts = int(nsamples) * int(seqlen) * 4 * widths
        wide = max(n_ff, attn, n_embd)
        name = str(getattr(method, "name", "")).lower()
        # AutoRound tunes against block outputs; it builds Gram matrices only to start from GPTQ or QuantEase (--init)
        uses_grams = name != "autoround" or getattr(getattr(method, "recipe", None), "init", "gptq") != "rtn"
        grams = wide * wide * (8 * 8 + 4) if uses_grams else 0
        copies = 6 if name in ("autoround", "aq", "vq") else 3
        weights = sum(_numel(s) for s in blk.values()) * 4 * copies
        parts["block calibration"] = acts + grams + weights
        block = {"activations": acts, "Gram matrices": grams, "one block's weights": weights}
    else:
        block = {}
    top = max(parts.values()) if parts else 0
    return MemoryEstimate(base + top, parts, base, block)


def check_memory(est: MemoryEstimate, max_memory) -> None:
    """OptionError when the estimate exceeds ``--max-memory``."""
    if max_memory is None:
        return
    limit = parse_size(max_memory)
    if est.total > limit:
        top = max(est.parts, key=est.parts.get) if est.parts else ""
        how = "use a machine with more memory"
        if top.startswith("calibration through the float model"):
            how = "calibrate from a text file (--calib FILE) or take an --imatrix FILE"
        elif top.startswith("block") and est.block:
            how = ("use fewer calibration tokens (--nsamples/--seqlen)"
                   if max(est.block, key=est.block.get) == "activations" else
                   "the widest layer's Gram matrices do not depend on the samples: use a method without them "
                   "(rtn, imatrix) or more memory")
        raise OptionError(f"this plan needs {est.describe()}, more than --max-memory {max_memory} "
                          f"({limit / 2**30:.2f} GiB): {how}")
