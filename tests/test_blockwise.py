"""The block-wise calibration pipeline: functional block forward, true-sequential Grams, block methods end
to end (GPTQ, a trivial RTN block method), resume, sparse-outlier files in the runner."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qgguf import gguf_types
from qgguf.convert.ggufread import GGUFFile
from qgguf.convert.pipeline import convert
from qgguf.errors import OptionError
from qgguf.quantize import base
from qgguf.quantize.blockwise import RESUME_SUFFIX, Block, BlockMethod, chunk_samples, sequential_quantize
from qgguf.runtime import model as rm
from qgguf.runtime.model import LlamaHParams, LlamaModel

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K.gguf"
C4 = SHARED / "data" / "c4-sample-1000.jsonl"
needs_data = pytest.mark.skipif(not (STORIES.is_file() and C4.is_file()), reason="shared test data not available")
CAL = dict(calib=C4, nsamples=8, seqlen=64, progress=False)

torch.set_num_threads(1)


class RTNBlock(BlockMethod):
    """Per-linear round to nearest through the block pipeline: must equal --method rtn byte for byte."""
    name = "test-rtn-block"
    needs_fp_inputs = False

    def quantize_linear(self, name, w, qtype, H, importance, ctx):
        return qtype.quantize(w)

    def quantize_tensor(self, name, w, qtype, ctx):
        return qtype.quantize(w)


class Boom(Exception):
    pass


def _interrupting(inner: str, after: int):
    """A method that delegates to ``inner`` and raises when it reaches block ``after``."""
    class Stop(BlockMethod):
        name = inner
        needs_fp_inputs = False

        def __init__(self, **kw):
            from qgguf.quantize.blockwise import as_block_method
            self.m = as_block_method(base.get_method(inner, **kw))

        def describe(self):
            return self.m.describe()

        def quantize_block(self, block, ctx):
            if block.index == after:
                raise Boom(f"killed at block {after}")
            return self.m.quantize_block(block, ctx)
    return Stop


@pytest.fixture
def registered():
    added = []

    def reg(name, cls):
        base.register(name, cls)
        added.append(name)
    yield reg
    for n in added:
        base.METHODS.pop(n, None)


# ------------------------------------------------------------------------------------------------
# the functional forward


@needs_data
def test_block_forward_equals_model_layers():
    m = LlamaModel.from_gguf(STORIES)
    m.kv_f16 = False   # the runner's default fp16 KV cache (as llama.cpp's) is not part of the block math
    hp = m.hp
    torch.manual_seed(0)
    ids = torch.randint(0, hp.n_vocab, (3, 37))
    x = rm.embed(m.tok_embd.dense_weight(), ids)
    outs = [x]
    for il in range(hp.n_layer):
        outs.append(rm.block_forward(hp, m.block_weights(il), outs[-1]))
    for b in range(3):
        seen = {}
        with m.capture_linear_inputs(lambda n, t: seen.setdefault(n, t.clone())):
            ref_logits = m.logits(ids[b].tolist())
        for il in range(1, hp.n_layer):
            # the model's input to layer il's q/k/v is attn_norm(output of layer il-1)
            mine = rm.rms_norm(outs[il][b], m.layers[il].attn_norm, hp.norm_eps)
            torch.testing.assert_close(mine, seen[f"blk.{il}.attn_q.weight"], rtol=1e-5, atol=1e-5)
        logits = rm.lm_head(m.output.dense_weight(), rm.final_norm(hp, m.output_norm, outs[-1][b]))
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-4)


@needs_data
def test_block_forward_differentiable_and_from_tensors():
    from qgguf.convert.sources import open_source
    m = LlamaModel.from_gguf(STORIES)
    src = open_source(STORIES)
    names = {t.name for t in src.tensors}
    md = {k: v.value for k, v in src.metadata.items()}
    md["general.architecture"] = src.arch
    m2 = LlamaModel.from_tensors(md, lambda n: src.load(n) if n in names else None)
    toks = [1, 5, 77, 300, 2, 9]
    torch.testing.assert_close(m.logits(toks), m2.logits(toks), rtol=0, atol=0)
    w = {k: v.clone().requires_grad_(True) for k, v in m.block_weights(0).items()}
    x = torch.randn(2, 16, m.hp.n_embd)
    rm.block_forward(m.hp, w, x).pow(2).sum().backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in w.values())


def _toy_hp(ff=48):
    return LlamaHParams(n_vocab=10, n_embd=32, n_layer=1, n_head=4, n_head_kv=2, n_ff=ff, head_dim_k=8,
                        head_dim_v=8, n_rot=8, norm_eps=1e-5)


def test_true_sequential_grams_direct():
    hp = _toy_hp(ff=64)
    g = torch.Generator().manual_seed(1)
    E, F = hp.n_embd, hp.n_ff
    shapes = {"attn_q": (32, E), "attn_k": (16, E), "attn_v": (16, E), "attn_output": (E, 32),
              "ffn_gate": (F, E), "ffn_up": (F, E), "ffn_down": (E, F)}
    w = {k: 0.3 * torch.randn(s, generator=g) for k, s in shapes.items()}
    w["attn_norm"] = 1 + 0.2 * torch.randn(E, generator=g)
    w["ffn_norm"] = 1 + 0.2 * torch.randn(E, generator=g)
    x = torch.randn(5, 12, E, generator=g)
    q4 = gguf_types.get("Q4_0")
    blk = Block(index=0, hp=hp, weights=w, qtypes={k: q4 for k in shapes}, names={k: f"blk.0.{k}.weight" for k in w},
                x_q=x, chunk=2)
    grams = {}
    from qgguf.quantize.base import QuantContext
    packed = sequential_quantize(blk, QuantContext(), lambda n, ww, qt, H, imp, ctx: qt.quantize(ww), grams)

    # direct: quantize everything by RTN, then each Gram from a forward with the earlier linears quantized
    deq = {k: torch.from_numpy(q4.dequantize(q4.quantize(w[k].numpy()), shapes[k])) for k in shapes}
    for k in shapes:
        assert np.array_equal(packed[k], q4.quantize(w[k].numpy())), k
    X = x.reshape(-1, E).double()
    n = rm.rms_norm(x, w["attn_norm"], hp.norm_eps)
    wq = {**w, **{k: deq[k] for k in ("attn_q", "attn_k", "attn_v")}}
    a = rm.attention(hp, wq, n)
    x1 = x + a @ deq["attn_output"].T
    mm = rm.rms_norm(x1, w["ffn_norm"], hp.norm_eps)
    h = torch.nn.functional.silu(mm @ deq["ffn_gate"].T) * (mm @ deq["ffn_up"].T)
    want = {"attn_q": n, "attn_k": n, "attn_v": n, "attn_output": a, "ffn_gate": mm, "ffn_up": mm, "ffn_down": h}
    for k, t in want.items():
        t2 = t.reshape(-1, t.shape[-1]).double()
        np.testing.assert_allclose(grams[k], (t2.T @ t2).numpy(), rtol=1e-4, atol=1e-4 * float(t2.pow(2).sum(1).mean()))
    # the block output the driver leaves equals block_forward with all weights quantized
    torch.testing.assert_close(blk.x_out, rm.block_forward(hp, {**w, **deq}, x), rtol=1e-5, atol=1e-5)
    assert X.shape[0] == blk.ntokens and chunk_samples(512) == 32


# ------------------------------------------------------------------------------------------------
# the pipeline


@needs_data
@pytest.mark.parametrize("preset", ["Q4_0", "Q4_K_M"])
def test_rtn_block_method_equals_rtn(tmp_path, registered, preset):
    registered("test-rtn-block", RTNBlock)
    a, b = tmp_path / "rtn.gguf", tmp_path / "blk.gguf"
    convert(STORIES, a, method="rtn", type=preset, progress=False)
    rep = convert(STORIES, b, method="test-rtn-block", type=preset, **CAL)
    assert a.read_bytes() == b.read_bytes()
    assert rep.layer_errors and all(0 <= v < 0.1 for v in rep.layer_errors.values())
    assert not (tmp_path / ("blk.gguf" + RESUME_SUFFIX)).exists()


@needs_data
def test_gptq_end_to_end(tmp_path):
    out = tmp_path / "gptq.gguf"
    rep = convert(STORIES, out, method="gptq", type="Q4_0", method_options={"actorder": True}, **CAL)
    assert "gptq" in rep.method and "actorder=True" in rep.method
    rtn = convert(STORIES, tmp_path / "rtn.gguf", method="rtn", type="Q4_0", progress=False)
    assert rtn.tensor_bytes == rep.tensor_bytes
    with GGUFFile(out) as g:
        assert not [k for k in g.metadata if k.startswith("qgguf.")]
    # GPTQ's layer error is below plain rounding's on the calibration data
    from qgguf.runtime.evaluate import evaluate_loaded  # noqa: F401  (runner importable)
    ref = LlamaModel.from_gguf(STORIES)
    q = LlamaModel.from_gguf(out)
    r = LlamaModel.from_gguf(tmp_path / "rtn.gguf")
    from qgguf.quantize.calib import load_texts, text_sequences
    from qgguf.runtime.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(STORIES)
    seqs = text_sequences(tok, load_texts(C4)[::-1], 4, 128, seed=5, add_bos=True, bos_id=1)

    def kld(m):
        tot = 0.0
        for s in seqs:
            p = torch.log_softmax(ref.logits(s), -1)
            qq = torch.log_softmax(m.logits(s), -1)
            tot += float((p.exp() * (p - qq)).sum(-1).mean())
        return tot / len(seqs)
    assert kld(q) < kld(r)


@needs_data
@pytest.mark.llamacpp
def test_gptq_file_loads_in_llamacpp(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "g.gguf"
    convert(STORIES, out, method="gptq", type="Q4_K_M", **CAL)
    llm = llama_cpp.Llama(str(out), verbose=False, n_ctx=64)
    assert isinstance(llm("Once upon a time", max_tokens=4, temperature=0)["choices"][0]["text"], str)


@needs_data
@pytest.mark.parametrize("method,opts", [("gptq", {}), ("quantease", {"passes": 2, "outliers": 0.01})])
def test_resume_byte_identical(tmp_path, registered, method, opts):
    full = tmp_path / "full.gguf"
    convert(STORIES, full, method=method, type="Q4_0", method_options=opts, **CAL)
    out = tmp_path / "part.gguf"
    registered("test-stop", _interrupting(method, after=3))
    with pytest.raises(Boom):
        convert(STORIES, out, method="test-stop", type="Q4_0", method_options=opts, **CAL)
    ck = tmp_path / ("part.gguf" + RESUME_SUFFIX)
    assert not out.exists()
    assert sorted(p.name for p in ck.glob("blk.*.npz")) == [f"blk.{i}.npz" for i in range(3)]
    # other settings: refused
    with pytest.raises(OptionError, match="other settings"):
        convert(STORIES, out, method=method, type="Q4_0", method_options=opts, resume=True, seed=1,
                **CAL)
    rep = convert(STORIES, out, method=method, type="Q4_0", method_options=opts, resume=True, **CAL)
    assert rep.resumed_blocks == 3
    assert out.read_bytes() == full.read_bytes()
    assert not ck.exists()


@needs_data
def test_outlier_file_round_trip(tmp_path):
    out = tmp_path / "qe.gguf"
    rep = convert(STORIES, out, method="quantease", type="Q4_0", method_options={"passes": 2, "outliers": 0.01},
                  **CAL)
    assert rep.needs_qgguf_runner and rep.outliers
    assert "qgguf runner" in rep.summary()
    name = "blk.1.ffn_up.weight"
    with GGUFFile(out) as g:
        assert g.get("qgguf.version") == 1
        k = g.get(f"qgguf.tensor.{name}.outliers")
        assert k == rep.outliers[name] > 0
        t = {x.name: x for x in g.tensors}
        idx = g.raw(t[name + ".outlier_idx"]).view(np.int32)
        val = g.raw(t[name + ".outlier_val"]).view(np.float16)
        assert idx.size == val.size == k and np.all(np.diff(idx) > 0)
        qt = gguf_types.by_ggml(t[name].ggml_type)
        shape = tuple(reversed(t[name].ne))
        dense = qt.dequantize(g.raw(t[name]), shape)
    want = dense.copy().reshape(-1)
    want[idx] += val.astype(np.float32)
    m = LlamaModel.from_gguf(out)
    got = m.layers[1].w_up.dense_weight().numpy()
    np.testing.assert_array_equal(got.reshape(-1), want)
    assert torch.isfinite(m.logits([1, 2, 3])).all()
    # inspect shows it
    from qgguf.cli import main
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["inspect", str(out)]) == 0
    text = buf.getvalue()
    assert "outliers" in text and "qgguf runner" in text
    assert "weight.outlier_idx" not in text   # companions are folded into their tensor's row


@needs_data
def test_self_calibration_deterministic():
    from qgguf.quantize.calib import self_sequences
    m = LlamaModel.from_gguf(STORIES)
    a = self_sequences(m, 5, 24, seed=3, bos_id=1, batch=4)
    b = self_sequences(m, 5, 24, seed=3, bos_id=1, batch=4)
    c = self_sequences(m, 5, 24, seed=4, bos_id=1, batch=4)
    assert a == b and a != c
    assert all(len(s) == 24 and s[0] == 1 for s in a)
    # the text is the model's: its own log-likelihood is far above random tokens'
    s = torch.tensor(a[0])
    lp = torch.log_softmax(m.logits(a[0]), -1)[:-1].gather(1, s[1:, None]).mean()
    assert float(lp) > -4.0


def test_dataset_name_without_datasets(monkeypatch):
    import builtins
    from qgguf.quantize.calib import calibration_sequences
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("no datasets")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(OptionError, match="datasets"):
        calibration_sequences("allenai/c4", None, object(), {}, 2, 8, 0)


@needs_data
def test_cli_method_options(tmp_path):
    from qgguf.cli import build_parser
    from qgguf.convert.commands import method_options
    args = build_parser().parse_args(["convert", str(STORIES), "--method", "gptq", "--damp", "0.05", "--actorder",
                                      "-O", "blocksize=256", "-O", "foo=bar", "--resume"])
    assert method_options(args) == {"damp": 0.05, "actorder": True, "blocksize": 256, "foo": "bar"}
    assert args.resume
    with pytest.raises(OptionError, match="resume"):
        convert(STORIES, tmp_path / "x.gguf", method="rtn", type="Q8_0", resume=True, progress=False)
