"""File-type presets: which tensor type each tensor gets, ported from llama.cpp's
``llama_tensor_get_type`` (src/llama-quant.cpp of the llama.cpp bundled with llama-cpp-python 0.3.36).

A *preset* is one of llama.cpp's file types (``Q4_K_M``, ``Q3_K_S``, ``Q8_0``, ...): a default type
plus mixing rules (``use_more_bits`` layers, attn_v / ffn_down upgrades, output / token_embd rules).
``--pure`` turns the mixing rules off, ``--token-embedding-type`` / ``--output-tensor-type`` pin those
two tensors, and ``--tensor-type PATTERN=TYPE`` overrides (first matching regex wins, searched in the
tensor name, as llama-quantize). Row lengths that do not divide the chosen type's block fall back as
llama.cpp does (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ* -> IQ4_NL, then F16).

Bare type names that are not presets (``Q3_K``, ``Q4_K``, ``Q5_K``, ``IQ4_NL``, and qgguf's own
types) mean: every linear weight in that type (like ``--pure``), while token_embd and output keep
llama.cpp's defaults for them (output -> Q6_K, or Q8_0 when the row does not divide the block;
token_embd -> the same as output when embeddings are tied, else the bare type).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from gguf import GGMLQuantizationType as T, LlamaFileType as FT

from ..errors import OptionError

# preset name -> (llama_ftype, default tensor type)
PRESETS: dict[str, tuple[int, str]] = {
    "F32": (FT.ALL_F32, "F32"),
    "F16": (FT.MOSTLY_F16, "F16"),
    "BF16": (FT.MOSTLY_BF16, "BF16"),
    "Q8_0": (FT.MOSTLY_Q8_0, "Q8_0"),
    "Q4_0": (FT.MOSTLY_Q4_0, "Q4_0"),
    "Q4_1": (FT.MOSTLY_Q4_1, "Q4_1"),
    "Q5_0": (FT.MOSTLY_Q5_0, "Q5_0"),
    "Q5_1": (FT.MOSTLY_Q5_1, "Q5_1"),
    "Q2_K": (FT.MOSTLY_Q2_K, "Q2_K"),
    "Q2_K_S": (FT.MOSTLY_Q2_K_S, "Q2_K"),
    "Q3_K_S": (FT.MOSTLY_Q3_K_S, "Q3_K"),
    "Q3_K_M": (FT.MOSTLY_Q3_K_M, "Q3_K"),
    "Q3_K_L": (FT.MOSTLY_Q3_K_L, "Q3_K"),
    "Q4_K_S": (FT.MOSTLY_Q4_K_S, "Q4_K"),
    "Q4_K_M": (FT.MOSTLY_Q4_K_M, "Q4_K"),
    "Q5_K_S": (FT.MOSTLY_Q5_K_S, "Q5_K"),
    "Q5_K_M": (FT.MOSTLY_Q5_K_M, "Q5_K"),
    "Q6_K": (FT.MOSTLY_Q6_K, "Q6_K"),
}

# general.file_type written for a bare type name
BARE_FTYPE = {"Q3_K": FT.MOSTLY_Q3_K_S, "Q4_K": FT.MOSTLY_Q4_K_S, "Q5_K": FT.MOSTLY_Q5_K_S,
              "IQ4_NL": FT.MOSTLY_IQ4_NL, "IQ4_XS": FT.MOSTLY_IQ4_XS}

_FLOATS = {"F32", "F16", "BF16", "F64"}
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
             "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL",
             "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
             "TQ1_0": "Q4_0", "TQ2_0": "Q4_0"}


def block_size(type_name: str) -> int:
    """Weights per block of a type (registry first, then ggml's table)."""
    from .. import gguf_types
    from ..errors import QggufError
    try:
        return gguf_types.get(type_name).block_size
    except QggufError:
        from gguf import GGML_QUANT_SIZES
        try:
            return GGML_QUANT_SIZES[T[type_name.upper()]][0]
        except KeyError:
            raise OptionError(f"unknown tensor type {type_name!r}") from None


def is_quantized(type_name: str) -> bool:
    return type_name.upper() not in _FLOATS


def normalize_type(name: str, what: str = "type") -> str:
    """Canonical upper-case name of a tensor type, or OptionError."""
    from .. import gguf_types
    up = name.strip().upper()
    if up in gguf_types._BY_NAME or up in T.__members__:
        return up
    raise OptionError(f"unknown {what} {name!r}; known types: {', '.join(sorted(set(gguf_types.names()) | {'Q2_K', 'Q3_K', 'Q4_K', 'Q5_K', 'Q6_K'}))}")


def parse_tensor_types(items) -> list[tuple[str, re.Pattern, str]]:
    """``["PATTERN=TYPE", ...]`` -> [(pattern, compiled, TYPE)] (llama-quantize's --tensor-type)."""
    out = []
    for it in items or ():
        if isinstance(it, (tuple, list)):
            pat, typ = it
        else:
            pat, sep, typ = str(it).rpartition("=")
            if not sep or not pat or not typ:
                raise OptionError(f"--tensor-type {it!r}: expected PATTERN=TYPE, e.g. 'attn_v=Q6_K'")
        pat = pat.lower()
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise OptionError(f"--tensor-type {it!r}: bad regular expression: {e}") from None
        out.append((pat, rx, normalize_type(typ, "tensor type in --tensor-type")))
    return out


def tensor_allows_quantization(name: str, ndim: int) -> bool:
    if ndim < 2 or not name.endswith("weight"):
        return False
    for bad in ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
                "position_embd", "token_types", "ssm_conv1d", "attn_rel_b.weight"):
        if bad in name:
            return False
    return True


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def llama_tensor_order(names):
    """llama.cpp's weight order (its ``weights_map`` comparer): by layer (non-layer tensors first), then name."""
    def key(n):
        m = re.match(r"blk\.(\d+)\.", n)
        return (int(m.group(1)) if m else -1, n)
    return sorted(names, key=key)


@dataclass
class TensorChoice:
    name: str
    shape: tuple[int, ...]
    type: str                       # chosen output type
    wanted: str | None = None       # the type before the row-length fallback (None: no fallback)
    quantize: bool = True           # False: copied in a float type (norms, biases)
    requires_imatrix: bool = False


@dataclass
class TypePlan:
    preset: str
    ftype: int | None
    choices: list[TensorChoice]
    fallbacks: dict[str, int] = field(default_factory=dict)   # "Q4_K->Q5_0": count


class _State:
    def __init__(self, n_layer, n_head, n_head_kv, arch, tied, ftype, params, n_attention_wv):
        self.n_layer, self.arch, self.tied, self.ftype, self.p = n_layer, arch, tied, ftype, params
        self.n_gqa = n_head // max(1, n_head_kv)
        self.is_70b = n_layer == 80 and n_head != n_head_kv
        self.n_attention_wv = n_attention_wv
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        self.has_imatrix = params.get("has_imatrix", False)


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _get_type_impl(qs: _State, new_type: str, name: str, ne0: int, cat: str) -> str:
    ft = qs.ftype
    F = FT
    if cat == "output" or (qs.tied and cat == "token_embd"):
        if qs.p.get("output_tensor_type"):
            return qs.p["output_tensor_type"]
        if qs.arch == "falcon" or ne0 % block_size(new_type) != 0:
            return "Q8_0"
        if ft in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S,
                  F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M):
            return "Q5_K"
        if new_type != "Q8_0":
            return "Q6_K"
        return new_type
    if ft is None:          # bare type name: no mixing beyond output / tied embeddings
        return new_type
    if cat == "token_embd":
        if qs.p.get("token_embedding_type"):
            return qs.p["token_embedding_type"]
        return new_type
    if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        if ft == F.MOSTLY_Q2_K:
            new_type = "Q4_K" if qs.n_gqa >= 4 else "Q3_K"
        elif ft == F.MOSTLY_Q2_K_S and qs.n_gqa >= 4:
            new_type = "Q4_K"
        elif ft == F.MOSTLY_Q3_K_M:
            new_type = "Q5_K" if qs.i_attention_wv < 2 else "Q4_K"
        elif ft == F.MOSTLY_Q3_K_L:
            new_type = "Q5_K"
        elif ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and qs.n_gqa >= 4:
            new_type = "Q5_K"
        elif ft in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new_type = "Q6_K"
        elif ft == F.MOSTLY_Q4_K_S and qs.i_attention_wv < 4:
            new_type = "Q5_K"
        if qs.is_70b and new_type in ("Q3_K", "Q4_K"):
            new_type = "Q5_K"
        qs.i_attention_wv += 1
        return new_type
    if cat in ("attn_k", "attn_q"):
        return new_type
    if cat == "ffn_down":
        i, n = qs.i_ffn_down, qs.n_layer
        if ft == F.MOSTLY_Q2_K:
            new_type = "Q3_K"
        elif ft == F.MOSTLY_Q2_K_S:
            if i < n // 8:
                new_type = "Q4_K"
        elif ft == F.MOSTLY_Q3_K_M:
            new_type = "Q5_K" if i < n // 16 else ("Q4_K" if qs.arch != "falcon" or _use_more_bits(i, n) else "Q3_K")
        elif ft == F.MOSTLY_Q3_K_L:
            new_type = "Q4_K" if qs.arch == "falcon" else "Q5_K"
        elif ft == F.MOSTLY_Q4_K_M:
            if qs.arch == "falcon":
                new_type = "Q6_K" if i < n // 16 else ("Q5_K" if _use_more_bits(i, n) else "Q4_K")
            elif _use_more_bits(i, n):
                new_type = "Q6_K"
        elif i < n // 8 and ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and not qs.has_imatrix:
            new_type = "Q5_K"
        elif ft == F.MOSTLY_Q5_K_M and _use_more_bits(i, n):
            new_type = "Q6_K"
        elif ft == F.MOSTLY_Q4_K_S and qs.arch != "falcon" and i < n // 8:
            new_type = "Q5_K"
        elif ft in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and qs.has_imatrix and i < n // 8:
            new_type = "Q4_1" if ft == F.MOSTLY_Q4_0 else "Q5_1"
        qs.i_ffn_down += 1
        return new_type
    if cat == "attn_output":
        if qs.arch != "falcon":
            if ft == F.MOSTLY_Q2_K:
                new_type = "Q3_K"
            elif ft == F.MOSTLY_Q3_K_M:
                new_type = "Q4_K"
            elif ft == F.MOSTLY_Q3_K_L:
                new_type = "Q5_K"
        elif ft == F.MOSTLY_Q3_K_L:
            new_type = "Q4_K"
        return new_type
    if cat == "ffn_gate":
        qs.i_ffn_gate += 1
    elif cat == "ffn_up":
        qs.i_ffn_up += 1
    return new_type


def _fallback(type_name: str, ne0: int) -> str:
    bs = block_size(type_name)
    if ne0 % bs == 0:
        return type_name
    ret = _FALLBACK.get(type_name)
    if ret is None:
        if bs <= 32:
            ret = type_name
        else:
            raise OptionError(f"no fallback type is defined for {type_name} (rows of {ne0})")
    if ne0 % block_size(ret) != 0:
        ret = "F16"
    return ret


def resolve_preset(type_name: str) -> tuple[str, int | None, str, bool]:
    """``--type`` value -> (preset name, llama ftype or None, default tensor type, is_bare)."""
    up = type_name.strip().upper()
    if up in PRESETS:
        ft, base = PRESETS[up]
        return up, int(ft), base, False
    base = normalize_type(up, "--type")
    if not is_quantized(base):
        raise OptionError(f"unknown --type {type_name!r}")
    ft = BARE_FTYPE.get(base)
    return base, (int(ft) if ft is not None else None), base, True


def plan_types(tensors, *, arch: str, n_layer: int, n_head: int, n_head_kv: int, type: str = "Q8_0",
               pure: bool = False, token_embedding_type: str | None = None,
               output_tensor_type: str | None = None, tensor_types=(), has_imatrix: bool = False,
               float_source_types: dict[str, str] | None = None) -> TypePlan:
    """Choose the output type of every tensor. ``tensors``: iterable of (name, numpy shape).

    Returns the choices in llama.cpp's tensor order. ``float_source_types``: for tensors that are not
    quantized (norms, biases), the source type to keep when it is F16/BF16 (otherwise F32)."""
    preset, ftype, default_type, bare = resolve_preset(type)
    tte = normalize_type(token_embedding_type, "--token-embedding-type") if token_embedding_type else None
    ott = normalize_type(output_tensor_type, "--output-tensor-type") if output_tensor_type else None
    overrides = parse_tensor_types(tensor_types)
    shapes = dict(tensors)
    names = llama_tensor_order(shapes)
    tied = "output.weight" not in shapes
    n_attention_wv = sum(1 for n in names if category(n) in ("attn_v", "attn_qkv", "attn_kv_b"))
    qs = _State(n_layer, n_head, n_head_kv, arch, tied, None if bare else ftype,
                {"token_embedding_type": tte, "output_tensor_type": ott, "has_imatrix": has_imatrix},
                n_attention_wv)
    choices, fallbacks = [], {}
    for name in names:
        shape = tuple(shapes[name])
        ne0 = shape[-1]
        cat = category(name)
        if not tensor_allows_quantization(name, len(shape)):
            keep = (float_source_types or {}).get(name, "F32")
            choices.append(TensorChoice(name, shape, keep if keep in ("F16", "BF16") else "F32", quantize=False))
            continue
        if tte and cat == "token_embd":
            choices.append(TensorChoice(name, shape, tte))
            continue
        if ott and cat == "output":
            choices.append(TensorChoice(name, shape, ott))
            continue
        new_type = default_type
        wanted = None
        if is_quantized(default_type):
            manual = False
            for _pat, rx, typ in overrides:
                if rx.search(name):
                    new_type, manual = typ, True
                    break
            if not manual and not pure:
                new_type = _get_type_impl(qs, new_type, name, ne0, cat)
            fb = _fallback(new_type, ne0)
            if fb != new_type:
                wanted = new_type
                key = f"{new_type}->{fb}"
                fallbacks[key] = fallbacks.get(key, 0) + 1
                new_type = fb
        req = (new_type == "Q2_K" and ftype == FT.MOSTLY_Q2_K_S and cat not in ("token_embd", "output")) or \
            new_type in ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S") and cat not in ("token_embd", "output")
        choices.append(TensorChoice(name, shape, new_type, wanted=wanted, requires_imatrix=req))
    return TypePlan(preset, ftype, choices, fallbacks)
