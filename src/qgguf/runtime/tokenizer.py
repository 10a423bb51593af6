"""Tokenizer built from GGUF metadata, giving the same token ids as llama.cpp.

Two vocabulary types are supported:

* ``tokenizer.ggml.model == "llama"`` (SentencePiece-style, "SPM"): optional space prefix,
  spaces become U+2581, then the adjacent pair whose concatenation is a vocabulary entry with
  the highest score is merged repeatedly (ties: leftmost), and pieces left outside the
  vocabulary fall back to ``<0xXX>`` byte tokens.  llama.cpp runs this over the whole text
  between special tokens; we do the same, but cut the text first at every position that no
  merge can ever cross (two adjacent characters that occur next to each other in no vocabulary
  entry).  The pieces are independent, so the result is identical, and repeated pieces are
  cached.
* ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE): the text is pre-split with llama.cpp's
  regular expressions for the vocabulary's ``tokenizer.ggml.pre`` type, each word is mapped
  byte-by-byte to printable characters and merged by merge rank.

Pre-splitting follows llama.cpp's ``unicode_regex_split``: every code point is first
"collapsed" to one character standing for its Unicode class (ASCII kept as is, other
whitespace -> ``\\x0b``, numbers -> ``\\xd1``, letters -> ``\\xd2``, punctuation -> ``\\xd3``,
marks -> ``\\xd4``, symbols -> ``\\xd5``, anything else -> ``\\xd0``) and the expressions run on
that string with ``\\p{..}`` replaced by those classes.  llama.cpp's hand-written splitters for
the GPT-2 and Llama-3 expressions behave exactly as those expressions do on the collapsed
string (checked case by case), so one engine serves all supported types.
"""
from __future__ import annotations

import codecs
import heapq
import json
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from qgguf.errors import InputFileError, QggufError

__all__ = ["Tokenizer", "StreamDecoder", "CHATML_TEMPLATE"]

# --------------------------------------------------------------------------------------------
# token attributes (same bit values as llama.cpp's llama_token_attr)
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

# GGUF tokenizer.ggml.token_type values -> attributes
_TYPE_TO_ATTR = {
    0: ATTR_UNDEFINED,
    1: ATTR_NORMAL,
    2: ATTR_UNKNOWN,
    3: ATTR_CONTROL,
    4: ATTR_USER_DEFINED,
    5: ATTR_UNUSED,
    6: ATTR_BYTE,
}

SPACE_MARK = "\u2581"
_CACHE_MAX = 1 << 20  # cached words/chunks before the cache is dropped  # SentencePiece's escaped space

# texts llama.cpp treats as end-of-turn (first found is eot_id) and end-of-generation tokens
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>",
)
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
))
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# --------------------------------------------------------------------------------------------
# GPT-2 byte <-> printable character mapping


def _byte_to_char_table() -> list[str]:
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table: list[str] = [""] * 256
    for b in keep:
        table[b] = chr(b)
    n = 0
    for b in range(256):
        if not table[b]:
            table[b] = chr(256 + n)
            n += 1
    return table


_BYTE_TO_CHAR = _byte_to_char_table()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}
# bytes.translate cannot map to multi-char strings, but a latin-1 decode + str.translate can
_LATIN1_TO_BYTECHAR = {b: _BYTE_TO_CHAR[b] for b in range(256)}

# --------------------------------------------------------------------------------------------
# code point classes, as llama.cpp's unicode tables define them

_WHITESPACE = frozenset(
    list(range(0x09, 0x0E)) + [0x20, 0x85, 0xA0, 0x1680] + list(range(0x2000, 0x200B))
    + [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)
_CLS_OTHER, _CLS_NUMBER, _CLS_LETTER, _CLS_PUNCT, _CLS_MARK, _CLS_SYMBOL = (
    "\xd0", "\xd1", "\xd2", "\xd3", "\xd4", "\xd5")
_CATEGORY_TO_CLS = {"N": _CLS_NUMBER, "L": _CLS_LETTER, "P": _CLS_PUNCT, "M": _CLS_MARK,
                    "S": _CLS_SYMBOL}


class _CollapseTable(dict):
    """str.translate table: code point -> class character (filled lazily)."""

    def __missing__(self, cp: int) -> str:
        if cp < 128:
            value = chr(cp)
        elif cp in _WHITESPACE:
            value = "\x0b"
        else:
            value = _CATEGORY_TO_CLS.get(unicodedata.category(chr(cp))[0], _CLS_OTHER)
        self[cp] = value
        return value


_COLLAPSE = _CollapseTable()

_WS_CHARS = "\\t\\n\\x0b\\x0c\\r "
_CLASS_CHARS = {
    "N": _CLS_NUMBER + "0-9",
    "L": _CLS_LETTER + "A-Za-z",
    "Lu": _CLS_LETTER + "A-Za-z",
    "Ll": _CLS_LETTER + "A-Za-z",
    "Lt": _CLS_LETTER + "A-Za-z",
    "Lm": _CLS_LETTER + "A-Za-z",
    "Lo": _CLS_LETTER + "A-Za-z",
    "P": _CLS_PUNCT + re.escape("!\"#%&'()*,-./:;?@[\\]_{}"),
    "M": _CLS_MARK,
    "S": _CLS_SYMBOL + re.escape("$+<=>^`|"),
}


def _translate_regex(expr: str) -> str:
    """Rewrite a llama.cpp pre-tokenizer expression to run on the collapsed string."""
    out: list[str] = []
    inside = False
    i = 0
    n = len(expr)
    while i < n:
        c = expr[i]
        if c == "\\" and i + 1 < n:
            nxt = expr[i + 1]
            if nxt == "p" and i + 2 < n and expr[i + 2] == "{":
                close = expr.index("}", i + 3)
                name = expr[i + 3:close]
                if name not in _CLASS_CHARS:
                    raise ValueError(f"unsupported unicode class \\p{{{name}}}")
                chars = _CLASS_CHARS[name]
                out.append(chars if inside else "[" + chars + "]")
                i = close + 1
                continue
            if nxt == "s":
                out.append(_WS_CHARS if inside else "[" + _WS_CHARS + "]")
                i += 2
                continue
            if nxt == "S":
                if inside:
                    raise ValueError("\\S inside a character class is not supported")
                out.append("[^" + _WS_CHARS + "]")
                i += 2
                continue
            if nxt == "d":
                out.append("0-9" if inside else "[0-9]")
                i += 2
                continue
            out.append(expr[i:i + 2])
            i += 2
            continue
        if c == "[" and not inside:
            inside = True
        elif c == "]" and inside:
            inside = False
        elif ord(c) >= 128:
            raise ValueError("non-ASCII characters in a pre-tokenizer expression")
        out.append(c)
        i += 1
    return "".join(out)


# llama.cpp's pre-tokenizer expressions (data from the upstream tokenizer.json files)
_RE_GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
# llama.cpp has a hand-written splitter for _RE_GPT2 that also takes \s+ where the
# lookahead fails; spelled out here so that the regex engine does the same
_RE_GPT2_CUSTOM = _RE_GPT2 + "|\\s+"
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RE_LLAMA3 = (_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
              "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_RE_QWEN2 = (_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
             "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_RE_QWEN35 = (_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}"
              "| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_RE_TEKKEN = (
    "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+"
    "|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*"
    "|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_RE_GPT4O = (
    "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?"
    "|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?"
    "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


class _Pre:
    def __init__(self, exprs: Sequence[str], *, clean_spaces: bool = True,
                 ignore_merges: bool = False, add_bos: bool = False, no_bos: bool = False):
        self.exprs = tuple(exprs)
        self.clean_spaces = clean_spaces
        self.ignore_merges = ignore_merges
        self.add_bos = add_bos
        self.no_bos = no_bos


_PRE_DEFAULT = _Pre(["[\\p{P}\\$\\+<=>\\^~\\|]+", _RE_GPT2_CUSTOM, "\\p{N}+", "[0-9][0-9][0-9]"])
_PRE_TYPES: dict[str, _Pre] = {"default": _PRE_DEFAULT}


def _register(names: Iterable[str], pre: _Pre) -> None:
    for name in names:
        _PRE_TYPES[name] = pre


_register(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
           "jina-v5-nano"], _Pre([_RE_LLAMA3], ignore_merges=True, add_bos=True))
_register(["dbrx", "smaug-bpe"], _Pre([_RE_LLAMA3]))
_register(["glm4", "chatglm-bpe"], _Pre([_RE_LLAMA3], no_bos=True))
_register(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
           "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais", "exaone4"],
          _Pre([_RE_GPT2_CUSTOM]))
_register(["trillion", "granite-docling"], _Pre([_RE_GPT2_CUSTOM], clean_spaces=False))
_register(["starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"],
          _Pre(["\\p{N}", _RE_GPT2_CUSTOM]))
_register(["smollm", "command-r"], _Pre(["\\p{N}", _RE_GPT2_CUSTOM], clean_spaces=False))
_register(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open"],
          _Pre([_RE_QWEN2], clean_spaces=False))
_register(["megrez", "stablelm2"], _Pre([_RE_QWEN2]))
_register(["qwen35"], _Pre([_RE_QWEN35], clean_spaces=False))
_register(["tekken"], _Pre([_RE_TEKKEN], clean_spaces=False, ignore_merges=True, add_bos=True))
_register(["gpt-4o", "llama4", "kanana2", "talkie"], _Pre([_RE_GPT4O], clean_spaces=False))
_register(["falcon"], _Pre(["[\\p{P}\\$\\+<=>\\^~\\|`]+", _RE_GPT2_CUSTOM, "[0-9][0-9][0-9]"]))

_COMPILED: dict[str, re.Pattern[str]] = {}


def _compiled(expr: str) -> re.Pattern[str]:
    pat = _COMPILED.get(expr)
    if pat is None:
        pat = re.compile(_translate_regex(expr), re.DOTALL)
        _COMPILED[expr] = pat
    return pat


def _isspace_c(ch: str) -> bool:
    return ch in " \t\n\x0b\x0c\r"


# --------------------------------------------------------------------------------------------
# metadata reading


def _field_value(field: Any) -> Any:
    import gguf  # noqa: PLC0415  (optional heavy import)

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
        if len(types) > 1 and types[1] == gguf.GGUFValueType.ARRAY:
            return field.contents()
        return [field.parts[i][0].item() for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "surrogateescape")
    return field.parts[field.data[0]][0].item()


def read_tokenizer_metadata(path: str | Path) -> dict[str, Any]:
    """The ``tokenizer.*`` (and ``general.name``/``general.architecture``) keys of a GGUF file."""
    import gguf  # noqa: PLC0415

    p = Path(path)
    if not p.is_file():
        raise InputFileError("no such file", p)
    from ..convert.ggufread import GGUFFile  # noqa: PLC0415
    GGUFFile(p).close()   # strict structure checks first: any malformed file is one InputFileError
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as exc:  # the reader raises ValueError/struct errors on corrupt files
        raise InputFileError(f"not a readable GGUF file ({exc})", p) from exc
    md: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.") or name in ("general.name", "general.architecture"):
            try:
                md[name] = _field_value(field)
            except Exception as exc:
                raise InputFileError(f"cannot read metadata key {name} ({exc})", p) from exc
    return md


def metadata_from_reader(reader: Any) -> dict[str, Any]:
    """Like :func:`read_tokenizer_metadata`, from an open ``gguf.GGUFReader``."""
    return {name: _field_value(field) for name, field in reader.fields.items()
            if name.startswith("tokenizer.") or name in ("general.name", "general.architecture")}


def _is_list(v: Any) -> bool:
    return isinstance(v, (list, tuple))


def _as_str(v: Any) -> str:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "surrogateescape")
    return str(v)


# --------------------------------------------------------------------------------------------


class Tokenizer:
    """llama.cpp-compatible tokenizer for SPM ("llama") and byte-level BPE ("gpt2") vocabularies."""

    def __init__(self, md: Mapping[str, Any], source: str | Path | None = None):
        self._source = source
        model = md.get("tokenizer.ggml.model")
        if model is None:
            raise InputFileError("no tokenizer in the metadata (tokenizer.ggml.model missing)", source)
        model = _as_str(model)
        if model == "llama":
            self.vocab_type = "spm"
        elif model == "gpt2":
            self.vocab_type = "bpe"
        else:
            raise QggufError(f"unsupported tokenizer model {model!r} (supported: llama, gpt2)", source)
        self.model = model

        tokens = md.get("tokenizer.ggml.tokens")
        if tokens is None or not _is_list(tokens) or len(tokens) == 0:
            raise InputFileError("tokenizer.ggml.tokens missing or empty (an array of strings is needed)", source)
        strs = (str, bytes, bytearray)
        for key, kind in (("tokenizer.ggml.tokens", strs), ("tokenizer.ggml.merges", strs),
                          ("tokenizer.ggml.scores", (int, float)), ("tokenizer.ggml.token_type", int)):
            v = md.get(key)
            if v is not None and (not _is_list(v) or not all(isinstance(x, kind) for x in v)):
                raise InputFileError(f"{key} must be an array of {'strings' if kind is strs else 'numbers'}",
                                     source)
        for key in ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id", "unknown_token_id",
                    "seperator_token_id", "padding_token_id", "mask_token_id"):
            v = md.get("tokenizer.ggml." + key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise InputFileError(f"tokenizer.ggml.{key} must be an integer, got {v!r}", source)
        for key in ("tokenizer.ggml.pre", "tokenizer.chat_template", "general.name"):
            v = md.get(key)
            if v is not None and not isinstance(v, (str, bytes, bytearray)):
                raise InputFileError(f"{key} must be a string, got {type(v).__name__}", source)
        self.tokens: list[str] = [_as_str(t) for t in tokens]
        n = len(self.tokens)
        for i, t in enumerate(self.tokens):
            if not t:
                self.tokens[i] = f"[EMPTY_{i}]"
        self.token_to_id: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            if t in self.token_to_id:
                raise InputFileError(
                    f"duplicate token in vocabulary: {t!r} has ids {self.token_to_id[t]} and {i}", source)
            self.token_to_id[t] = i

        scores = md.get("tokenizer.ggml.scores")
        if scores is not None and len(scores) < n:
            raise InputFileError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens", source)
        self.scores: list[float] = [float(s) for s in scores[:n]] if scores is not None else [0.0] * n
        types = md.get("tokenizer.ggml.token_type")
        if types is not None and len(types) < n:
            raise InputFileError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens", source)
        self.attrs: list[int] = ([_TYPE_TO_ATTR.get(int(t), ATTR_UNDEFINED) for t in types[:n]]
                                 if types is not None else [ATTR_NORMAL] * n)

        # ---- per-type defaults (llama_vocab::impl::load)
        pre_name = _as_str(md.get("tokenizer.ggml.pre", "") or "")
        self.pre_name = pre_name
        self._pre: _Pre | None = None
        self.bpe_ranks: dict[tuple[str, str], int] = {}
        ids: dict[str, int | None]
        if self.vocab_type == "spm":
            ids = {"bos": 1, "eos": 2, "unk": 0}
            self.add_space_prefix = True
            self.clean_spaces = False
            self.add_bos = True
            self.add_eos = False
            self.ignore_merges = False
        else:
            merges = md.get("tokenizer.ggml.merges")
            if merges is None:
                raise InputFileError("cannot find tokenizer merges (tokenizer.ggml.merges)", source)
            for rank, m in enumerate(merges):
                m = _as_str(m)
                pos = m.find(" ", 1)
                pair = (m[:pos], m[pos + 1:]) if pos >= 0 else ("", "")
                self.bpe_ranks.setdefault(pair, rank)
            ids = {"bos": 11, "eos": 11, "unk": None}
            pre = _PRE_TYPES.get(pre_name or "default")
            if pre is None:
                raise QggufError(
                    f"unknown or unsupported pre-tokenizer type {pre_name!r} (tokenizer.ggml.pre); "
                    f"supported: {', '.join(sorted(_PRE_TYPES))}", source)
            self._pre = pre
            self._pre_patterns = [_compiled(e) for e in pre.exprs]
            self.add_space_prefix = False
            self.clean_spaces = pre.clean_spaces
            self.add_bos = pre.add_bos
            self.add_eos = False
            self.ignore_merges = pre.ignore_merges
            if pre.no_bos:
                ids["bos"] = None
        if "tokenizer.ggml.add_space_prefix" in md:
            self.add_space_prefix = bool(md["tokenizer.ggml.add_space_prefix"])

        # ---- special token ids
        keys = {"bos": "bos_token_id", "eos": "eos_token_id", "eot": "eot_token_id",
                "eom": "eom_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id",
                "pad": "padding_token_id", "mask": "mask_token_id"}
        for k in keys:
            ids.setdefault(k, None)
        for k, key in keys.items():
            if ids[k] is not None and ids[k] >= n:
                ids[k] = None
            v = md.get("tokenizer.ggml." + key)
            if v is not None and 0 <= int(v) < n:
                ids[k] = int(v)
        if "tokenizer.ggml.add_bos_token" in md:
            self.add_bos = bool(md["tokenizer.ggml.add_bos_token"])
        if "tokenizer.ggml.add_eos_token" in md:
            self.add_eos = bool(md["tokenizer.ggml.add_eos_token"])
        if self.add_bos and ids["bos"] is None:
            raise InputFileError("tokenizer.ggml.add_bos_token is true, but no BOS token is set", source)
        if self.add_eos and ids["eos"] is None:
            raise InputFileError("tokenizer.ggml.add_eos_token is true, but no EOS token is set", source)

        # ---- auto-detected end-of-turn / end-of-generation tokens (marked as control)
        eot = ids["eot"]
        if eot is None:
            for text in _EOT_TEXTS:
                if text in self.token_to_id:
                    eot = self.token_to_id[text]
                    break
        eog: set[int] = set()
        for group in (_FIM_PAD_TEXTS, _FIM_REP_TEXTS, _FIM_SEP_TEXTS):
            for text in group:
                if text in self.token_to_id:
                    eog.add(self.token_to_id[text])
                    break
        for text in _EOG_TEXTS:
            tid = self.token_to_id.get(text)
            if tid is not None:
                eog.add(tid)
        for tid in list(eog) + ([eot] if eot is not None else []):
            self.attrs[tid] |= ATTR_CONTROL
        for i, t in enumerate(self.tokens):
            if self.attrs[i] & ATTR_CONTROL and "unused" in t:
                self.attrs[i] |= ATTR_UNUSED
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            tid = self.token_to_id.get(text)
            if tid is not None:
                self.attrs[tid] = ATTR_USER_DEFINED
        for extra in (ids["eos"], eot, ids["eom"]):
            if extra is not None:
                eog.add(extra)
        texts = {self.tokens[t]: t for t in eog}
        if "<|end|>" in texts and (("<|return|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts))
                                   or ("<|flush|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts))):
            eog.discard(texts["<|end|>"])
            self.attrs[texts["<|end|>"]] = ATTR_USER_DEFINED
        if "<|tool_response>" in texts and "</s>" in texts:
            eog.discard(texts["</s>"])
            self.attrs[texts["</s>"]] = ATTR_NORMAL
        self._ids = ids
        self._eot = eot
        self.eog_ids: frozenset[int] = frozenset(eog)

        # ---- special tokens, longest text first (tokenizer_st_partition order)
        special = [i for i in range(n) if self.attrs[i] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)]
        special.sort(key=lambda i: -len(self.tokens[i].encode("utf-8", "surrogateescape")))
        self._special_ids = special
        name = _as_str(md.get("general.name", "") or "").lower()
        if "phi-3" in name or "phi3" in name:  # llama.cpp's per-model attribute rule
            for i in special:
                self.attrs[i] |= ATTR_RSTRIP
            for text, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
                tid = self.token_to_id.get(text)
                if tid is not None:
                    self.attrs[tid] = (self.attrs[tid] | ATTR_RSTRIP) if on else (self.attrs[tid] & ~ATTR_RSTRIP)

        self.chat_template: str | None = (_as_str(md["tokenizer.chat_template"])
                                          if md.get("tokenizer.chat_template") else None)

        # ---- tokenizer caches
        self._cache: dict[str, tuple[int, ...]] = {}
        if self.vocab_type == "spm":
            pairs: set[str] = set()
            for t in self.tokens:
                for a, b in zip(t, t[1:]):
                    pairs.add(a + b)
            self._spm_pairs = frozenset(pairs)
            self._byte_tokens: list[int | None] = []
            for b in range(256):
                tid = self.token_to_id.get(f"<0x{b:02X}>")
                if tid is None and b < 128:
                    tid = self.token_to_id.get(chr(b))
                self._byte_tokens.append(tid)
        self._pieces: list[bytes] = [self._make_piece(i) for i in range(n)]

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> "Tokenizer":
        return cls(md)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        return cls(read_tokenizer_metadata(path), source=path)

    @classmethod
    def from_reader(cls, reader: Any) -> "Tokenizer":
        """From an already open ``gguf.GGUFReader`` (saves reading the file twice)."""
        return cls(metadata_from_reader(reader), source=getattr(reader, "path", None))

    # ---------------------------------------------------------------- properties
    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def eot_id(self) -> int | None:
        return self._eot

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk"]

    @property
    def pad_id(self) -> int | None:
        return self._ids["pad"]

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def is_control(self, token_id: int) -> bool:
        return bool(self.attrs[token_id] & ATTR_CONTROL)

    @property
    def bos_token(self) -> str:
        return self.tokens[self.bos_id] if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self.tokens[self.eos_id] if self.eos_id is not None else ""

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre_name!r}, n_vocab={self.n_vocab}, "
                f"bos={self.bos_id}, eos={self.eos_id}, add_bos={self.add_bos})")

    # ---------------------------------------------------------------- encoding
    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``, as ``llama_tokenize(text, add_special, parse_special)``."""
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "replace")
        fragments = self._partition(text, parse_special) if text else []
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self._ids["bos"])  # type: ignore[arg-type]
        if self.vocab_type == "spm":
            prev_special = True
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                self._spm_encode(frag.replace(" ", SPACE_MARK), out)
                prev_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._bpe_encode(frag, out)
        if add_special and self.add_eos:
            out.append(self._ids["eos"])  # type: ignore[arg-type]
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        frags: list[str | int] = [text]
        for sid in self._special_ids:
            attr = self.attrs[sid]
            if not parse_special and attr & (ATTR_CONTROL | ATTR_UNKNOWN):
                continue
            stext = self.tokens[sid]
            if not any(isinstance(f, str) and stext in f for f in frags):
                continue
            new: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or stext not in f:
                    new.append(f)
                    continue
                start = 0
                while True:
                    m = f.find(stext, start)
                    if m < 0:
                        if start < len(f):
                            new.append(f[start:])
                        break
                    end = m
                    if attr & ATTR_LSTRIP:
                        while end > start and _isspace_c(f[end - 1]):
                            end -= 1
                    if end > start:
                        new.append(f[start:end])
                    new.append(sid)
                    start = m + len(stext)
                    if attr & ATTR_RSTRIP:
                        while start < len(f) and _isspace_c(f[start]):
                            start += 1
            frags = new
        return frags

    # ---- SPM
    def _spm_encode(self, text: str, out: list[int]) -> None:
        if not text:
            return
        pairs = self._spm_pairs
        cache = self._cache
        start = 0
        prev = text[0]
        i = 0
        for i, c in enumerate(text):
            if i and (prev + c) not in pairs:
                chunk = text[start:i]
                ids = cache.get(chunk)
                if ids is None:
                    ids = cache[chunk] = self._spm_chunk(chunk)
                out.extend(ids)
                start = i
            prev = c
        chunk = text[start:]
        ids = cache.get(chunk)
        if ids is None:
            ids = cache[chunk] = self._spm_chunk(chunk)
        out.extend(ids)

    def _spm_chunk(self, text: str) -> tuple[int, ...]:
        if len(self._cache) > _CACHE_MAX:
            self._cache.clear()
        tok = self.token_to_id
        scores = self.scores
        n = len(text)
        syms = list(text)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            joined = syms[left] + syms[right]
            tid = tok.get(joined)
            if tid is not None:
                heap.append((-scores[tid], left, right, len(joined)))

        for i in range(n - 1):
            add(i, i + 1)
        heapq.heapify(heap)
        pop = heapq.heappop
        while heap:
            _, left, right, size = pop(heap)
            ls = syms[left]
            rs = syms[right]
            if not ls or not rs or len(ls) + len(rs) != size:
                continue
            syms[left] = ls + rs
            syms[right] = ""
            r_next = nxt[right]
            nxt[left] = r_next
            if r_next >= 0:
                prv[r_next] = left
            for a, b in ((prv[left], left), (left, r_next)):
                if a >= 0 and b >= 0:
                    joined = syms[a] + syms[b]
                    tid = tok.get(joined)
                    if tid is not None:
                        heapq.heappush(heap, (-scores[tid], a, b, len(joined)))
        out: list[int] = []
        i = 0
        while i != -1:
            s = syms[i]
            tid = tok.get(s)
            if tid is not None:
                out.append(tid)
            else:
                for b in s.encode("utf-8", "surrogatepass"):
                    bt = self._byte_tokens[b]
                    if bt is None:
                        raise QggufError(f"text needs byte 0x{b:02X}, which the vocabulary lacks "
                                         f"(no <0x{b:02X}> token)", self._source)
                    out.append(bt)
            i = nxt[i]
        return tuple(out)

    # ---- BPE
    def pre_tokenize(self, text: str) -> list[str]:
        """The words llama.cpp's pre-tokenizer splits ``text`` into (BPE vocabularies only)."""
        if self._pre is None:
            raise QggufError("pre_tokenize is only defined for BPE (gpt2) vocabularies", self._source)
        collapsed = text.translate(_COLLAPSE)
        spans = [(0, len(text))]
        for pat in self._pre_patterns:
            new: list[tuple[int, int]] = []
            append = new.append
            for a, b in spans:
                pos = a
                for m in pat.finditer(collapsed, a, b):
                    s, e = m.span()
                    if s > pos:
                        append((pos, s))
                    if e > s:
                        append((s, e))
                    pos = e
                if pos < b:
                    append((pos, b))
            spans = new
        return [text[a:b] for a, b in spans]

    def _bpe_encode(self, text: str, out: list[int]) -> None:
        cache = self._cache
        for word in self.pre_tokenize(text):
            ids = cache.get(word)
            if ids is None:
                if len(cache) > _CACHE_MAX:
                    cache.clear()
                ids = cache[word] = self._bpe_word(word)
            out.extend(ids)

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        mapped = word.encode("utf-8", "surrogatepass").decode("latin-1").translate(_LATIN1_TO_BYTECHAR)
        tok = self.token_to_id
        if self.ignore_merges:
            tid = tok.get(mapped)
            if tid is not None:
                return (tid,)
        syms = list(mapped)
        ranks = self.bpe_ranks
        while len(syms) > 1:
            best = None
            best_i = -1
            for i in range(len(syms) - 1):
                r = ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best is None or r < best):
                    best = r
                    best_i = i
            if best is None:
                break
            syms[best_i:best_i + 2] = [syms[best_i] + syms[best_i + 1]]
        out: list[int] = []
        for s in syms:
            tid = tok.get(s)
            if tid is not None:
                out.append(tid)
            else:  # llama.cpp looks up each byte of the piece alone; only ASCII can match
                for ch in s:
                    if ord(ch) < 128:
                        bt = tok.get(ch)
                        if bt is not None:
                            out.append(bt)
        return tuple(out)

    # ---------------------------------------------------------------- decoding
    def _make_piece(self, tid: int) -> bytes:
        text = self.tokens[tid]
        attr = self.attrs[tid]
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            return text.encode("utf-8", "surrogateescape")
        if attr & ATTR_NORMAL:
            if self.vocab_type == "spm":
                return text.replace(SPACE_MARK, " ").encode("utf-8", "surrogateescape")
            out = bytearray()
            for ch in text:
                b = _CHAR_TO_BYTE.get(ch)
                if b is not None:
                    out.append(b)
                else:
                    raw = ch.encode("utf-8", "surrogateescape")
                    out += b"[UNK_BYTE_0x" + raw.hex().encode() + text.encode("utf-8", "surrogateescape") + b"]"
            return bytes(out)
        if attr & ATTR_BYTE:
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                return b""
        return b""

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes llama.cpp renders for one token (``special=False`` hides control tokens)."""
        if not 0 <= token_id < len(self.tokens):
            raise QggufError(f"token id {token_id} is out of range (vocabulary of {len(self.tokens)})",
                             self._source)
        if not special and self.attrs[token_id] & (ATTR_UNKNOWN | ATTR_CONTROL):
            return b""
        return self._pieces[token_id]

    def decode_bytes(self, ids: Sequence[int], special: bool = False,
                     remove_special: bool = False) -> bytes:
        """``llama_detokenize(ids, remove_special, unparse_special=special)`` as bytes."""
        ids = list(ids)
        remove_space = self.add_space_prefix
        if remove_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if remove_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        parts: list[bytes] = []
        for i, tid in enumerate(ids):
            piece = self.token_to_piece(int(tid), special)
            if i == 0 and remove_space and piece[:1] == b" ":
                piece = piece[1:]
            parts.append(piece)
        data = b"".join(parts)
        if self.clean_spaces:
            data = _clean_spaces(data)
        return data

    def decode(self, ids: Sequence[int], special: bool = False, remove_special: bool = False,
               errors: str = "replace") -> str:
        return self.decode_bytes(ids, special, remove_special).decode("utf-8", errors)

    def stream_decoder(self, special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, special=special)

    # ---------------------------------------------------------------- chat templates
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            template: str | None = None, **kwargs: Any) -> str:
        """Render ``messages`` with the GGUF's chat template (ChatML when it has none)."""
        import jinja2  # noqa: PLC0415
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

        source = template if template is not None else (self.chat_template or CHATML_TEMPLATE)

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            import datetime  # noqa: PLC0415
            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        variables = {"messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt,
                     "bos_token": self.bos_token, "eos_token": self.eos_token}
        variables.update(kwargs)
        try:
            return env.from_string(source).render(**variables)
        except jinja2.exceptions.TemplateError as exc:
            raise QggufError(f"chat template failed: {exc}", self._source) from exc


def _clean_spaces(data: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces passes over the detokenized bytes."""
    if b" " not in data or not any(p in data for p in (b" ?", b" !", b" .", b" ,", b" '")):
        return data
    text = bytearray(data)
    # pass 1: " ?", " !", " .", " ,"
    total1 = len(text)
    total = 1 if total1 else 0
    for i in range(1, total1):
        x = text[i]
        if text[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        text[total] = x
        total += 1
    # pass 2: " ' " -> "'"
    total2 = total
    total = 1 if total2 else 0
    i = 1
    while i < total2:
        x = text[i]
        if x == 0x27 and i + 1 < total2 and text[i - 1] == 0x20 and text[i + 1] == 0x20:
            total -= 1
            i += 1
            text[i] = 0
        text[total] = x
        total += 1
        i += 1
    # pass 3: " 's", " 'm", " 're", " 've"
    total3 = total
    total = 1 if total3 else 0
    for i in range(1, total3):
        x = text[i]
        if text[i - 1] == 0x20 and x == 0x27 and i + 1 < total3:
            x1 = text[i + 1]
            if x1 in b"sm":
                total -= 1
            elif x1 not in b"td" and i + 2 < total3:
                x2 = text[i + 2]
                if (x1 == 0x72 and x2 == 0x65) or (x1 == 0x76 and x2 == 0x65):
                    total -= 1
        text[total] = x
        total += 1
    return bytes(text[:total])


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back incomplete UTF-8 sequences.

    ``push(id)`` returns the newly completed text (possibly ""), ``flush()`` the rest.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self.tokenizer.token_to_piece(int(token_id), self.special))

    def extend(self, ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in ids)

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)

    def reset(self) -> None:
        self._dec.reset()
