"""Issue 7: malformed inputs through the real command line (``qgguf.cli.main``, the console script's entry point).

Every case builds one bad input from a valid tiny model (a one-layer llama GGUF that `qgguf run` loads, an HF
folder that `qgguf convert` converts: both checked by the control tests below) and asserts what a user sees:
exit code 2, exactly one stderr line ``qgguf: error: <file>: <problem>`` naming the bad file and the problem, and
no output file. Three cases also go through a separate ``python -m qgguf`` process.
"""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _shared import ROOT, one_torch_thread  # noqa: F401 - fixture

sys.path.insert(0, str(ROOT / "tools"))
import fuzz  # noqa: E402  (tools/fuzz.py: the GGUF writer for any field values)

from qgguf import cli  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402

TEXT = "Once upon a time there was a little girl. She liked to play in the park.\n" * 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/_shared.py


# ------------------------------------------------------------------------------------------------
# valid bases

def base_doc() -> fuzz.Doc:
    return fuzz.tiny_llama_doc(np.random.default_rng(0))


def aq_doc() -> fuzz.Doc:
    from qgguf import gguf_types
    d = base_doc()
    qt = gguf_types.get("aq-2x8-g8")
    kvs, ts = fuzz.codebook_tensors_for(qt, "blk.0.attn_q.weight", (32, 32), np.random.default_rng(1))
    d.kvs += [fuzz.KV("qgguf.version", int(V.UINT32), 1)] + kvs
    d.tensors = [t for t in d.tensors if t.name != "blk.0.attn_q.weight"] + ts
    return d


def kv(doc: fuzz.Doc, key: str) -> fuzz.KV:
    return next(k for k in doc.kvs if k.key == key)


def tensor(doc: fuzz.Doc, name: str) -> fuzz.RawTensor:
    return next(t for t in doc.tensors if t.name == name)


def st_bytes(tensors: dict[str, np.ndarray], header_extra: dict | None = None) -> bytes:
    """A safetensors file (F32 tensors)."""
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header.update(header_extra or {})
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def hf_tensors(E=32, F=64, KV=16, V_=258) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    r = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": r(V_, E), "model.norm.weight": np.ones(E, np.float32)}
    p = "model.layers.0."
    t.update({p + "input_layernorm.weight": np.ones(E, np.float32),
              p + "post_attention_layernorm.weight": np.ones(E, np.float32),
              p + "self_attn.q_proj.weight": r(E, E), p + "self_attn.k_proj.weight": r(KV, E),
              p + "self_attn.v_proj.weight": r(KV, E), p + "self_attn.o_proj.weight": r(E, E),
              p + "mlp.gate_proj.weight": r(F, E), p + "mlp.up_proj.weight": r(F, E),
              p + "mlp.down_proj.weight": r(E, F)})
    return t


HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 258,
             "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "tie_word_embeddings": True}


def hf_tokenizer() -> dict:
    from qgguf.runtime.tokenizer import _byte_to_char_table
    vocab = {c: i for i, c in enumerate(_byte_to_char_table())}
    vocab["Ġt"] = 256
    return {"model": {"type": "BPE", "vocab": vocab, "merges": ["Ġ t"]},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "added_tokens": [{"id": 257, "content": "<|endoftext|>", "special": True}]}


def make_hf(d: Path, config=None, tokenizer="default", st: bytes | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if tokenizer == "default":
        tokenizer = hf_tokenizer()
    if tokenizer is not None:
        (d / "tokenizer.json").write_text(tokenizer if isinstance(tokenizer, str) else json.dumps(tokenizer))
    (d / "model.safetensors").write_bytes(st if st is not None else st_bytes(hf_tensors()))
    return d


# ------------------------------------------------------------------------------------------------
# the malformed inputs: id -> builder(tmp_path) -> (command, bad path, words the message must contain)

def _gguf(tmp, data: bytes | fuzz.Doc, name="bad.gguf") -> Path:
    p = tmp / name
    p.write_bytes(fuzz.gguf_bytes(data) if isinstance(data, fuzz.Doc) else data)
    return p


def _patch(data: bytes, pos: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, pos, value)
    return bytes(b)


def _doc(edit) -> fuzz.Doc:
    d = base_doc()
    edit(d)
    return d


BASE = None


def _base_bytes() -> bytes:
    global BASE
    if BASE is None:
        BASE = fuzz.gguf_bytes(base_doc())
    return BASE


def _first_tensor_info_pos(data: bytes) -> int:
    """Byte offset of the first tensor info's name length (after all metadata)."""
    fields = fuzz.header_fields(data)
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    pos = 24
    for _ in range(n_kv):
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
        vt = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        pos = _skip_value(data, pos, vt)
    assert any(p == pos for p, _ in fields)
    return pos


def _skip_value(data, pos, vt):
    if vt == V.STRING:
        return pos + 8 + struct.unpack_from("<Q", data, pos)[0]
    if vt == V.ARRAY:
        sub, n = struct.unpack_from("<IQ", data, pos)
        pos += 12
        for _ in range(n):
            pos = _skip_value(data, pos, sub)
        return pos
    return pos + struct.calcsize(fuzz._FMT[V(vt)])


def _set(d: fuzz.Doc, key: str, vtype, value, sub=None):
    d.kvs = [k for k in d.kvs if k.key != key] + [fuzz.KV(key, int(vtype), value, sub)]


def _drop(d: fuzz.Doc, prefix: str):
    d.kvs = [k for k in d.kvs if not k.key.startswith(prefix)]


def c_empty(t):
    p = _gguf(t, b"")
    return ["convert", p], p, "not a GGUF file"


def c_truncated_header(t):
    p = _gguf(t, _base_bytes()[:300])
    return ["inspect", p], p, "truncated"


def c_truncated_data(t):
    p = _gguf(t, _base_bytes()[:-600])
    return ["run", p, "-p", "hi", "-n", "2"], p, "past the end of the file"


def c_wrong_magic(t):
    p = _gguf(t, b"GGML" + _base_bytes()[4:])
    return ["convert", p], p, "magic"


def c_version(t):
    p = _gguf(t, _patch(_base_bytes(), 4, "<I", 99))
    return ["inspect", p], p, "version 99"


def c_huge_tensor_count(t):
    p = _gguf(t, _patch(_base_bytes(), 8, "<Q", 1 << 60))
    return ["convert", p, "--type", "Q8_0"], p, "corrupt GGUF header"


def c_huge_kv_count(t):
    p = _gguf(t, _patch(_base_bytes(), 16, "<Q", 1 << 62))
    return ["run", p, "-p", "hi"], p, "metadata keys"


def c_huge_string(t):
    p = _gguf(t, _patch(_base_bytes(), 24, "<Q", 1 << 62))
    return ["inspect", p], p, "truncated"


def c_unknown_value_type(t):
    key = base_doc().kvs[0].key
    p = _gguf(t, _patch(_base_bytes(), 24 + 8 + len(key), "<I", 99))
    return ["convert", p], p, "unknown value type 99"


def c_unknown_tensor_type(t):
    p = _gguf(t, _doc(lambda d: setattr(tensor(d, "blk.0.ffn_up.weight"), "ggml_type", 999)))
    return ["run", p, "-p", "hi"], p, "unknown type id 999"


def c_offset_past_end(t):
    p = _gguf(t, _doc(lambda d: setattr(d.tensors[-1], "offset", 1 << 40)))
    return ["convert", p], p, "past the end"


def c_misaligned(t):
    p = _gguf(t, _doc(lambda d: setattr(d.tensors[1], "offset", 8)))
    return ["inspect", p], p, "not a multiple of the alignment"


def c_overlap(t):
    p = _gguf(t, _doc(lambda d: setattr(d.tensors[2], "offset", 0)))
    return ["convert", p], p, "overlap"


def c_duplicate_tensor(t):
    def e(d):
        d.tensors[2].name = d.tensors[1].name
    p = _gguf(t, _doc(e))
    return ["run", p, "-p", "hi"], p, "appears twice"


def c_duplicate_key(t):
    p = _gguf(t, _doc(lambda d: d.kvs.append(fuzz.KV("llama.block_count", int(V.UINT32), 2))))
    return ["run", p, "-p", "hi"], p, "appears twice"


def c_too_many_dims(t):
    p = _gguf(t, _doc(lambda d: setattr(tensor(d, "output_norm.weight"), "ne", (32, 1, 1, 1, 1))))
    return ["inspect", p], p, "5 dimensions"


def c_dims_overflow(t):
    p = _gguf(t, _doc(lambda d: setattr(tensor(d, "output_norm.weight"), "ne", (1 << 40, 1 << 40))))
    return ["convert", p], p, "impossible dimensions"


def c_bad_alignment(t):
    d = base_doc()
    _set(d, "general.alignment", V.UINT32, 3)
    p = _gguf(t, d)
    return ["run", p, "-p", "hi"], p, "general.alignment"


def c_unsupported_arch_gguf(t):
    p = _gguf(t, _doc(lambda d: _set(d, "general.architecture", V.STRING, "mamba")))
    return ["convert", p], p, "'mamba' is not supported"


def c_missing_hparam(t):
    p = _gguf(t, _doc(lambda d: _drop(d, "llama.block_count")))
    return ["convert", p, "--type", "Q8_0"], p, "llama.block_count"


def c_hparam_type(t):
    p = _gguf(t, _doc(lambda d: _set(d, "llama.embedding_length", V.STRING, "wide")))
    return ["run", p, "-p", "hi"], p, "embedding_length"


def c_embedding_shape(t):
    p = _gguf(t, _doc(lambda d: _set(d, "llama.embedding_length", V.UINT32, 64)))
    return ["convert", p, "--type", "Q8_0"], p, "token_embd.weight"


def c_linear_shape(t):
    def e(d):
        tt = tensor(d, "blk.0.attn_q.weight")
        tt.ne, tt.data = (32, 16), tt.data[:32 * 16 * 2]
    p = _gguf(t, _doc(e))
    return ["run", p, "-p", "hi"], p, "blk.0.attn_q.weight has shape"


def c_nan_weights(t):
    def e(d):
        tt = tensor(d, "blk.0.ffn_up.weight")
        w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
        w[3, 5] = np.nan
        tt.ggml_type, tt.data = 0, w.tobytes()
    p = _gguf(t, _doc(e))
    return ["convert", p, "--type", "Q4_0"], p, "NaN"


def c_missing_tokenizer(t):
    p = _gguf(t, _doc(lambda d: _drop(d, "tokenizer.")))
    return ["run", p, "-p", "hi"], p, "tokenizer"


def c_tokenizer_kind(t):
    p = _gguf(t, _doc(lambda d: _set(d, "tokenizer.ggml.tokens", V.STRING, "abc")))
    return ["run", p, "-p", "hi"], p, "tokenizer.ggml.tokens"


def c_aq_missing_companion(t):
    d = aq_doc()
    d.tensors = [x for x in d.tensors if not x.name.endswith(".aq_scales")]
    p = _gguf(t, d)
    return ["run", p, "-p", "hi"], p, "aq_scales is missing"


def c_aq_shape(t):
    d = aq_doc()
    _set(d, "qgguf.tensor.blk.0.attn_q.weight.shape", V.ARRAY, [32, 16], int(V.UINT64))
    p = _gguf(t, d)
    return ["inspect", p], p, "companion"


def c_aq_unknown_type(t):
    d = aq_doc()
    _set(d, "qgguf.tensor.blk.0.attn_q.weight.config", V.STRING, "aq-9x8-g8")
    p = _gguf(t, d)
    return ["run", p, "-p", "hi"], p, "M=9"


def c_eval_truncated(t):
    p = _gguf(t, _base_bytes()[:-600])
    txt = t / "text.txt"
    txt.write_text(TEXT)
    return ["eval", p, "--text", txt, "--ctx", "16"], p, "past the end"


def c_tokenize_bad(t):
    p = _gguf(t, _doc(lambda d: _set(d, "tokenizer.ggml.scores", V.ARRAY, ["x"] * 260, int(V.STRING))))
    return ["tokenize", p, "-p", "hi"], p, "tokenizer.ggml.scores"


def c_imatrix_corrupt(t):
    good = _gguf(t, _base_bytes(), "good.gguf")
    bad = t / "bad.dat"
    bad.write_bytes(struct.pack("<ii", 1, -5) + b"x" * 20)
    return ["convert", good, "--method", "imatrix", "--imatrix", bad, "--type", "Q4_0"], bad, "not an imatrix file"


def c_hf_no_config(t):
    d = make_hf(t / "hf", config=None)
    return ["convert", d], d, "config.json"


def c_hf_config_not_json(t):
    d = make_hf(t / "hf", config="{ not json")
    return ["convert", d], d / "config.json", "cannot parse"


def c_hf_unsupported_arch(t):
    d = make_hf(t / "hf", config=dict(HF_CONFIG, architectures=["GPTNeoXForCausalLM"]))
    return ["convert", d], d / "config.json", "GPTNeoXForCausalLM"


def c_hf_config_value(t):
    d = make_hf(t / "hf", config=dict(HF_CONFIG, hidden_size="big"))
    return ["convert", d], d / "config.json", "hidden_size"


def c_hf_missing_tokenizer(t):
    d = make_hf(t / "hf", config=HF_CONFIG, tokenizer=None)
    return ["convert", d], d, "tokenizer"


def c_hf_tokenizer_vocab(t):
    tj = hf_tokenizer()
    tj["model"]["vocab"]["Ġt"] = 1 << 40
    d = make_hf(t / "hf", config=HF_CONFIG, tokenizer=tj)
    return ["convert", d], d / "tokenizer.json", "model.vocab"


def c_st_truncated(t):
    d = make_hf(t / "hf", config=HF_CONFIG, st=st_bytes(hf_tensors())[:-100])
    return ["convert", d], d / "model.safetensors", "truncated"


def c_st_header_length(t):
    d = make_hf(t / "hf", config=HF_CONFIG, st=struct.pack("<Q", 1 << 62) + b"{}")
    return ["convert", d], d / "model.safetensors", "header length"


def c_st_dtype(t):
    raw = st_bytes(hf_tensors())
    n = struct.unpack_from("<Q", raw)[0]
    h = json.loads(raw[8:8 + n])
    h["model.norm.weight"]["dtype"] = "Q4"
    hb = json.dumps(h).encode()
    d = make_hf(t / "hf", config=HF_CONFIG, st=struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
    return ["convert", d], d / "model.safetensors", "unknown dtype"


def c_st_overlap(t):
    raw = st_bytes(hf_tensors())
    n = struct.unpack_from("<Q", raw)[0]
    h = json.loads(raw[8:8 + n])
    a, b = h["model.layers.0.self_attn.k_proj.weight"], h["model.layers.0.self_attn.v_proj.weight"]
    b["data_offsets"] = list(a["data_offsets"])
    hb = json.dumps(h).encode()
    d = make_hf(t / "hf", config=HF_CONFIG, st=struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
    return ["convert", d], d / "model.safetensors", "overlap"


def c_st_shape_vs_config(t):
    ts = hf_tensors()
    ts["model.layers.0.mlp.up_proj.weight"] = ts["model.layers.0.mlp.up_proj.weight"][:48]
    d = make_hf(t / "hf", config=HF_CONFIG, st=st_bytes(ts))
    return ["convert", d], d, "up_proj.weight' has shape [48, 32]"


def c_hf_missing_layer_tensor(t):
    ts = hf_tensors()
    del ts["model.layers.0.mlp.down_proj.weight"]
    d = make_hf(t / "hf", config=HF_CONFIG, st=st_bytes(ts))
    return ["convert", d], d, "ffn_down.weight"


def c_hf_token_id_beyond_embedding(t):
    tj = hf_tokenizer()
    tj["added_tokens"].append({"id": 5000, "content": "<big>", "special": True})
    d = make_hf(t / "hf", config=HF_CONFIG, tokenizer=tj)
    return ["convert", d], d / "tokenizer.json", "token id 5000"


def c_vq_payload_index(t):
    """A codebook payload index outside its table (VQ permutation entry 30000 of 32 columns)."""
    p = t / "bad.gguf"
    p.write_bytes((fuzz.CORPUS / "found" / "vq-perm-out-of-range.gguf").read_bytes())
    return ["run", p, "-p", "hi"], p, "perm"

CASES = {name[2:].replace("_", "-"): fn for name, fn in dict(globals()).items() if name.startswith("c_")}


def _run_cli(argv, capsys):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("case", sorted(CASES), ids=sorted(CASES))
def test_malformed_input(case, tmp_path, capsys, monkeypatch):
    work = tmp_path / "in"
    work.mkdir()
    argv, bad, needle = CASES[case](work)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    if argv[0] == "convert":
        argv = argv[:2] + ["-o", out / "x.gguf", "-q"] + argv[2:]
    rc, err = _run_cli(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"qgguf: error: {bad}: "), lines[0]
    assert needle in lines[0], lines[0]
    assert not list(out.iterdir()), list(out.iterdir())


def test_there_are_twenty_kinds():
    assert len(CASES) >= 20


# ------------------------------------------------------------------------------------------------
# controls: the valid bases work, so each case above fails for its own defect


def test_control_gguf_base_works(tmp_path, capsys):
    p = _gguf(tmp_path, _base_bytes(), "good.gguf")
    txt = tmp_path / "text.txt"
    txt.write_text(TEXT)
    for argv in (["inspect", p], ["run", p, "-p", "hi", "-n", "2"], ["tokenize", p, "-p", "hi"],
                 ["eval", p, "--text", txt, "--ctx", "16"],
                 ["convert", p, "-o", tmp_path / "q.gguf", "-q", "--type", "Q4_0"]):
        rc, err = _run_cli(argv, capsys)
        assert rc == 0, (argv, err)
    a = _gguf(tmp_path, aq_doc(), "aq.gguf")
    for argv in (["inspect", a], ["run", a, "-p", "hi", "-n", "2"]):
        rc, err = _run_cli(argv, capsys)
        assert rc == 0, (argv, err)


def test_control_hf_base_converts(tmp_path, capsys):
    d = make_hf(tmp_path / "hf", config=HF_CONFIG)
    rc, err = _run_cli(["convert", d, "-o", tmp_path / "x.gguf", "-q", "--type", "Q8_0"], capsys)
    assert rc == 0, err
    rc, err = _run_cli(["run", tmp_path / "x.gguf", "-p", "the", "-n", "2"], capsys)
    assert rc == 0, err


@pytest.mark.parametrize("case", ["truncated-data", "wrong-magic", "hf-no-config"])
def test_malformed_input_subprocess(case, tmp_path):
    """The same through a separate process (``python -m qgguf``): stderr is still one line, exit code 2."""
    argv, bad, needle = CASES[case](tmp_path)
    if argv[0] == "convert":
        argv = argv[:2] + ["-o", tmp_path / "o" / "x.gguf", "-q"] + argv[2:]
        (tmp_path / "o").mkdir()
    r = subprocess.run([sys.executable, "-m", "qgguf", *map(str, argv)], capture_output=True, text=True,
                       cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"qgguf: error: {bad}: ") and needle in lines[0], lines[0]
    if argv[0] == "convert":
        assert not list((tmp_path / "o").iterdir())


def test_invalid_utf8_strings_convert_byte_for_byte(tmp_path, capsys):
    """GGUF strings that are not UTF-8 are no error (vocabularies may hold such bytes): convert writes them back
    unchanged instead of failing in the writer."""
    from qgguf.convert.ggufread import GGUFFile
    d = base_doc()
    d.kvs.append(fuzz.KV("general.description", int(V.STRING), b"bad \xff\xfe utf8"))
    p = _gguf(tmp_path, d, "odd.gguf")
    rc, err = _run_cli(["convert", p, "-o", tmp_path / "q.gguf", "-q", "--type", "Q8_0"], capsys)
    assert rc == 0, err
    with GGUFFile(tmp_path / "q.gguf") as g:
        assert g.get("general.description").encode("utf-8", "surrogateescape") == b"bad \xff\xfe utf8"
