"""AQ codebook tensors: the type (pack/unpack/dequantize, sizes), the file format (companions + qgguf.* keys,
readable by gguf.GGUFReader), inspect rows, and the runner (AQ linears equal to their dequantized weights)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from qgguf import gguf_types
from qgguf.errors import QggufError
from qgguf.gguf_types.codebook import AQ_CODEBOOKS, AQ_CODES, AQ_SCALES, CodebookType, Companions

ROOT = Path(__file__).resolve().parents[1]


from _shared import rewrite_gguf as _rewrite  # noqa: E402
from _shared import synthetic_tool as _synthetic  # noqa: E402


@pytest.mark.parametrize("name,M,B,g", [("aq-2x8-g8", 2, 8, 8), ("aq-1x16-g8", 1, 16, 8), ("aq-1x8-g8", 1, 8, 8),
                                        ("aq-4x8-g8", 4, 8, 8), ("aq-2x8-g16", 2, 8, 16), ("AQ-3x8-g4", 3, 8, 4),
                                        ("aq-8x16-g32", 8, 16, 32), ("aq-2x8-g8-s16", 2, 8, 8)])
def test_parse_and_sizes(name, M, B, g):
    qt = gguf_types.get(name)
    assert isinstance(qt, CodebookType) and not qt.standard and qt.ggml_type is None
    assert (qt.M, qt.B, qt.g) == (M, B, g) and qt.name == name.lower()
    R, C = 96, 256
    sbytes = 2 if name.endswith("-s16") else 4
    want = (C // g) * M * R * (B // 8) + M * (1 << B) * g * 2 + R * sbytes
    assert qt.nbytes((R, C)) == want
    assert qt.bits_per_weight((R, C)) == pytest.approx(8.0 * want / (R * C))
    assert qt.bpw == M * B / g
    comps = qt.companions((R, C))
    assert [c[0] for c in comps] == [AQ_CODES, AQ_CODEBOOKS, AQ_SCALES]
    assert comps[0][1] == (24 if B == 8 else 25) and comps[1][1] == 1 and comps[2][1] == (1 if sbytes == 2 else 0)
    assert comps[0][2] == (R, M, C // g) and comps[1][2] == (g, 1 << B, M) and comps[2][2] == (R,)


def test_bad_names():
    for bad in ("aq-9x8-g8", "aq-2x12-g8", "aq-2x8-g5", "aq-0x8-g8"):
        with pytest.raises(QggufError):
            gguf_types.get(bad)
    from qgguf.convert.presets import normalize_type
    assert normalize_type("aq-3x8-g16") == "AQ-3X8-G16"


@pytest.mark.parametrize("name", ["aq-2x8-g8", "aq-1x16-g8", "aq-2x8-g16", "aq-3x8-g4", "aq-2x8-g8-s16"])
def test_pack_unpack_dequantize(name):
    qt = gguf_types.get(name)
    rng = np.random.default_rng(1)
    R, C = 40, 64
    f = qt.random_fields((R, C), rng)
    packed = qt.pack(f)
    assert isinstance(packed, Companions) and list(packed) == [AQ_CODES, AQ_CODEBOOKS, AQ_SCALES]
    assert packed.nbytes == qt.nbytes((R, C))
    blob = np.asarray(packed)
    assert blob.dtype == np.uint8 and blob.size == qt.nbytes((R, C))
    for data, shape in ((packed, None), (blob, (R, C)), (dict(packed), None)):
        u = qt.unpack(data, shape)
        assert np.array_equal(u["codes"], f["codes"])
        assert np.array_equal(u["codebooks"], f["codebooks"].astype(np.float16))
        assert np.array_equal(u["scales"].astype(np.float32), f["scales"].astype(np.float32))
    w = qt.dequantize(blob, (R, C))
    # reference: W[r, j*g:(j+1)*g] = s[r] * sum_m cb[m][codes[j, m, r]]
    cb = f["codebooks"].astype(np.float32)
    ref = np.zeros((R, C), np.float64)
    for r in range(R):
        for j in range(C // qt.g):
            v = sum(cb[m][int(f["codes"][j, m, r])] for m in range(qt.M))
            ref[r, j * qt.g:(j + 1) * qt.g] = float(f["scales"][r]) * v
    np.testing.assert_allclose(w, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(qt.dequantize(packed), w)
    from qgguf import native
    if native.available() and qt.g in (8, 16):
        t = native.AQTensor(packed[AQ_CODES], packed[AQ_CODEBOOKS], packed[AQ_SCALES], M=qt.M, B=qt.B, g=qt.g,
                            R=R, C=C)
        np.testing.assert_array_equal(t.dequantize(), w)   # bit-exact, the native definition


def test_pack_rejects_bad_fields():
    qt = gguf_types.get("aq-2x8-g8")
    f = qt.random_fields((8, 16))
    with pytest.raises(QggufError):
        qt.pack({**f, "codes": f["codes"][:, :1]})
    with pytest.raises(QggufError):
        qt.pack({**f, "codebooks": f["codebooks"][:, :100]})
    with pytest.raises(QggufError):
        qt.pack({**f, "scales": f["scales"][:3]})
    with pytest.raises(QggufError):
        qt.pack({k: v for k, v in f.items() if k != "scales"})
    with pytest.raises(QggufError):
        qt.pack({**f, "codes": f["codes"].astype(np.int32) + 300})
    with pytest.raises(QggufError):
        qt.dequantize(np.zeros(10, np.uint8), (8, 16))
    with pytest.raises(QggufError):
        qt.quantize(np.zeros((8, 16), np.float32))


def test_metadata_keys():
    qt = gguf_types.get("aq-2x8-g8")
    md = qt.metadata("blk.0.ffn_down.weight", (64, 128))
    p = "qgguf.tensor.blk.0.ffn_down.weight."
    assert md[p + "type"].value == "aq" and md[p + "config"].value == "aq-2x8-g8"
    assert md[p + "shape"].value == [128, 64]
    assert md[p + "companions"].value == [AQ_CODES, AQ_CODEBOOKS, AQ_SCALES]
    assert md[p + "aq.num_codebooks"].value == 2 and md[p + "aq.code_bits"].value == 8
    assert md[p + "aq.group_size"].value == 8


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("aq")
    syn = _synthetic()
    out = {}
    for t in ("aq-2x8-g8", "aq-2x8-g4", "aq-1x16-g8", "F32"):
        p = d / f"tiny-{t}.gguf"
        syn.write_synthetic(p, "tiny", t, seed=5)
        out[t] = p
    return out


def test_file_readable_by_gguf_reader(tiny_files):
    import gguf
    r = gguf.GGUFReader(str(tiny_files["aq-2x8-g8"]))
    names = {t.name: t for t in r.tensors}
    assert "blk.0.attn_q.weight" not in names
    c = names["blk.0.attn_q.weight.aq_codes"]
    assert int(c.tensor_type) == 24 and [int(v) for v in c.shape] == [64, 2, 8]
    assert int(names["blk.0.attn_q.weight.aq_codebooks"].tensor_type) == 1
    assert int(names["blk.0.attn_q.weight.aq_scales"].tensor_type) == 0
    assert r.fields["qgguf.version"].contents() == 1
    assert r.fields["qgguf.tensor.blk.0.attn_q.weight.config"].contents() == "aq-2x8-g8"
    assert list(r.fields["qgguf.tensor.blk.0.attn_q.weight.shape"].contents()) == [64, 64]
    # the ffn_down rows (172) do not divide into groups of 8: F16 fallback, a plain tensor
    assert int(names["blk.0.ffn_down.weight"].tensor_type) == 1
    # a file of standard types only carries no qgguf keys
    r2 = gguf.GGUFReader(str(tiny_files["F32"]))
    assert not any(k.startswith("qgguf.") for k in r2.fields)


def test_inspect_rows(tiny_files):
    from qgguf.convert.inspect import format_table, inspect_file
    info = inspect_file(tiny_files["aq-2x8-g8"])
    rows = {r["name"]: r for r in info["tensors"]}
    assert not any(n.endswith((AQ_CODES, AQ_CODEBOOKS, AQ_SCALES)) for n in rows)
    r = rows["blk.0.ffn_gate.weight"]
    qt = gguf_types.get("aq-2x8-g8")
    assert r["type"] == "aq-2x8-g8" and r["shape"] == [64, 172] and r["params"] == 64 * 172
    assert r["bytes"] == qt.nbytes((172, 64))
    assert r["bpw"] == pytest.approx(qt.bits_per_weight((172, 64)))
    assert info["bytes_per_type"]["aq-2x8-g8"]["tensors"] == 30   # q, k, v, o, gate, up of 5 layers
    assert info["needs_qgguf_runner"]
    assert info["tensor_bytes"] == sum(r["bytes"] for r in info["tensors"])
    assert info["tensor_bytes"] <= info["file_bytes"]
    assert "aq-2x8-g8" in format_table(info)


def _dequantized_reference(path):
    """The same model with every AQ weight dequantized to float32 (numpy, through the type registry)."""
    import gguf
    import torch
    from qgguf.runtime.linear import codebook_companions, dequantize_tensor
    from qgguf.runtime.model import LlamaModel, read_metadata
    r = gguf.GGUFReader(str(path))
    md = read_metadata(r)
    tensors = {t.name: t for t in r.tensors}

    def fn(name):
        got = codebook_companions(name, tensors, md)
        if got is not None:
            qt, shape, comp = got
            return qt.dequantize(comp, shape)
        t = tensors.get(name)
        if t is None:
            return None
        shape = tuple(int(v) for v in reversed([int(x) for x in t.shape]))
        return dequantize_tensor(name, int(t.tensor_type), shape, np.asarray(t.data).view(np.uint8).reshape(-1))
    torch.set_num_threads(1)
    return LlamaModel.from_tensors(md, fn)


@pytest.mark.parametrize("t", ["aq-2x8-g8", "aq-2x8-g4", "aq-1x16-g8"])
def test_runner_logits_equal_dequantized(tiny_files, t):
    import torch
    from qgguf.runtime.linear import AQLinear, load_llama
    m = load_llama(tiny_files[t], threads=1)
    assert isinstance(m.layers[0].wq, AQLinear) and isinstance(m.output, AQLinear) is False
    from qgguf import native
    if native.available():   # every group size the kernels take (4, 8, 16) runs compressed through them
        aq = [lin for lin in m.layers[0].modules() if isinstance(lin, AQLinear)]
        assert len(aq) >= 4 and all(lin.native is not None for lin in aq)
    ref = _dequantized_reference(tiny_files[t])
    toks = [1, 40, 200, 7, 99, 300, 12, 5]
    lp = m.logits(toks)            # prompt: matmul
    lr = ref.logits(toks)
    torch.testing.assert_close(lp, lr, rtol=1e-3, atol=2e-3)
    # decode one token at a time: matvec (8-bit tables on the AVX-512 path: 2.2 % of the logits' spread on this
    # tiny random-code model; on SmolLM2's 3-bit file they add 0.001 to a KLD of 0.175, docs/BENCHMARKS.md)
    m.reset()
    m.forward(toks[:5], 0)
    outs = torch.cat([m.forward([tok], 5 + i) for i, tok in enumerate(toks[5:])])
    if _one_token_tables_8bit(t):
        err = float((outs - lr[5:]).norm() / (lr[5:] - lr[5:].mean()).norm())
        assert err < 4e-2, err
        assert (outs.argmax(-1) == lr[5:].argmax(-1)).all()
    else:
        torch.testing.assert_close(outs, lr[5:], rtol=1e-3, atol=2e-3)


def _one_token_tables_8bit(t: str) -> bool:
    from qgguf import native
    return native.available() and native.table_bits(1, 16 if "x16" in t else 8) == 8


def test_runner_fallback_equals_native(tiny_files):
    import torch
    from qgguf import native
    from qgguf.runtime.linear import AQLinear, load_llama
    if not native.available():
        pytest.skip("native kernels not built")
    m = load_llama(tiny_files["aq-2x8-g8"], threads=1)
    lin = m.layers[1].w_gate
    fb = AQLinear(lin.name, lin.qt, (lin.out_features, lin.in_features),
                  lin.qt.pack({"codes": lin.native._codes.reshape(-1, 2, lin.out_features),
                               "codebooks": _cb16(lin), "scales": lin.native._scales}), native_ok=False)
    x = torch.randn(3, lin.in_features)
    torch.testing.assert_close(fb(x), lin(x), rtol=2e-3, atol=1e-3)  # the AVX-512 LUT is 16-bit
    if _one_token_tables_8bit("aq-2x8-g8"):  # one token: 8-bit tables
        assert float((fb(x[:1]) - lin(x[:1])).norm() / fb(x[:1]).norm()) < 1.5e-2
    else:
        torch.testing.assert_close(fb(x[:1]), lin(x[:1]), rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(fb.dense_weight(), lin.dense_weight())
    torch.testing.assert_close(fb.embed(torch.tensor([3, 0])), lin.dense_weight()[[3, 0]])


def _cb16(lin):
    return lin.native._cb32.astype(np.float16)


def test_bad_companions_raise(tiny_files, tmp_path):
    from qgguf.runtime.linear import load_llama
    src = tiny_files["aq-2x8-g8"]
    bad = tmp_path / "bad_scales.gguf"
    _rewrite(src, bad, lambda n, a: a[:-1] if n == "blk.1.attn_k.weight.aq_scales" else a)
    with pytest.raises(QggufError, match="aq_scales"):
        load_llama(bad)
    bad2 = tmp_path / "bad_codes.gguf"
    _rewrite(src, bad2, lambda n, a: a.astype(np.int16) if n == "blk.2.ffn_up.weight.aq_codes" else a)
    with pytest.raises(QggufError, match="aq_codes"):
        load_llama(bad2)
    bad3 = tmp_path / "missing.gguf"
    _rewrite(src, bad3, lambda n, a: None if n == "blk.0.attn_v.weight.aq_codebooks" else a)
    with pytest.raises(QggufError, match="missing"):
        load_llama(bad3)


def test_writer_plans_and_checks(tmp_path):
    from qgguf.convert.writer import OutputFile
    qt = gguf_types.get("aq-1x8-g8")
    of = OutputFile(tmp_path / "x.gguf", "llama")
    nb = of.plan_qtensor("w", (16, 32), qt)
    assert nb == qt.nbytes((16, 32)) and of.needs_qgguf_runner
    assert [p[0] for p in of.plan] == ["w.aq_codes", "w.aq_codebooks", "w.aq_scales"]
    with pytest.raises(RuntimeError):
        of.plan_tensor("v", (16, 32), None, 10)
    plain = OutputFile(tmp_path / "y.gguf", "llama")
    plain.plan_qtensor("w", (16, 32), gguf_types.get("Q8_0"))
    assert not plain.needs_qgguf_runner
    with of:
        of.open()
        f = qt.random_fields((16, 32))
        with pytest.raises(QggufError):
            of.write_tensor("w", {**qt.pack(f), ".aq_scales": np.zeros(3, np.float32)})


def test_synthetic_standard_file_loads_in_llamacpp(tiny_files):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(tiny_files["F32"]), n_ctx=64, n_threads=1, verbose=False)
    assert llm.n_vocab() == 512
    llm.eval([1, 40, 41])
    with pytest.raises(ValueError):      # an AQ file is not a llama.cpp file
        llama_cpp.Llama(str(tiny_files["aq-2x8-g8"]), n_ctx=64, n_threads=1, verbose=False)


def test_api_and_eval_cli_load_aq_files(tiny_files, tmp_path):
    """qgguf.load and `qgguf eval` run AQ files through the same loader as `qgguf run`."""
    import json
    import subprocess

    import qgguf
    from qgguf.runtime.linear import AQLinear

    path = tiny_files["aq-2x8-g8"]
    model = qgguf.load(path)
    assert isinstance(model.model.layers[0].wq, AQLinear)
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little girl. " * 40)
    res = model.perplexity(text, ctx=64, chunks=2)
    assert res["chunks"] == 2 and np.isfinite(res["ppl"])
    out = subprocess.run([sys.executable, "-m", "qgguf", "eval", str(path), "--text", str(text), "--ctx", "64",
                          "--chunks", "2", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["ppl"] == pytest.approx(res["ppl"], rel=1e-6)
