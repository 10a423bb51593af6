"""quantize.autoround: the STE quantizer equals the types' own dequantization, packed codes in range, and the
tuned block beats RTN and the importance-weighted start (random block and stories260K's first block)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qgguf.errors import OptionError
from qgguf.gguf_types import get
from qgguf.quantize.autoround import (RECIPES, SUPPORTED, AutoRound, TypeQuantizer, autoround_block, f16_ste,
                                      make_recipe, round_ste)
from qgguf.runtime.model import LlamaHParams, block_forward

STORIES = Path("/work/shared/models/stories260K.gguf")
FIELD_RANGE = {"Q8_0": (-128, 127), "Q4_0": (0, 15), "Q4_1": (0, 15), "Q5_0": (0, 31), "Q5_1": (0, 31),
               "IQ4_NL": (0, 15), "Q2_K": (0, 3), "Q3_K": (0, 7), "Q4_K": (0, 15), "Q5_K": (0, 31),
               "Q6_K": (0, 63)}
SCALE_RANGE = {"Q2_K": (0, 15), "Q3_K": (0, 63), "Q4_K": (0, 63), "Q5_K": (0, 63), "Q6_K": (-128, 127)}
KQ = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _matrix(rows=16, n=512, seed=0, zeros=True):
    rng = np.random.default_rng(seed)
    W = (0.05 * rng.standard_normal((rows, n))).astype(np.float32)
    W[rng.random(W.shape) < 0.01] *= 8
    W[1] = np.abs(W[1])          # an all-positive row (min > 0)
    if zeros:
        W[2, :64] = 0.0          # all-zero groups
    imp = (rng.random(n) * 2 + 0.05).astype(np.float32)
    return W, imp


def _perturbed(tq: TypeQuantizer, seed: int, tune_super: bool):
    g = torch.Generator().manual_seed(seed)
    p = tq.init_params(True, tune_super)
    p["V"] = torch.rand(p["V"].shape, generator=g) - 0.5
    p["alpha"] = 0.5 + torch.rand(p["alpha"].shape, generator=g)
    if "beta" in p:
        p["beta"] = 0.5 + torch.rand(p["beta"].shape, generator=g)
    for k in ("gd", "gm"):
        if k in p:
            p[k] = 0.8 + 0.4 * torch.rand(p[k].shape, generator=g)
    return p


# ------------------------------------------------------------------------------------------------
# the STE quantizer
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("use_imp", [False, True])
def test_ste_forward_equals_type_dequantize(name, use_imp):
    qt = get(name)
    W, imp = _matrix()
    tq = TypeQuantizer(qt, W, imp if use_imp else None)
    for seed, tune_super in ((1, False), (2, True), (3, True)):
        p = _perturbed(tq, seed, tune_super)
        with torch.no_grad():
            wq, f = tq.qdq(p, want_fields=True)
        data = qt.pack(f)
        deq = qt.dequantize(data)
        assert np.array_equal(deq, wq.numpy()), name
        # every field in range, and the bytes hold exactly these fields
        u = qt.unpack(data)
        lo, hi = FIELD_RANGE[name]
        assert int(u["q"].min()) >= lo and int(u["q"].max()) <= hi
        assert np.array_equal(u["q"].astype(np.int64), f["q"].astype(np.int64))
        if name in SCALE_RANGE:
            lo, hi = SCALE_RANGE[name]
            assert int(u["scales"].min()) >= lo and int(u["scales"].max()) <= hi
            assert np.array_equal(u["scales"].astype(np.int64), f["scales"].astype(np.int64))
            if "mins" in u:
                assert int(u["mins"].min()) >= 0 and int(u["mins"].max()) <= hi
        for k in ("d", "dmin", "m"):
            if k in u:
                assert np.array_equal(u[k].view(np.uint16), f[k].astype(np.float16).view(np.uint16))
        # pack() checks the same equality itself
        data2, deq2 = tq.pack(p)
        assert np.array_equal(data2, data) and np.array_equal(deq2, deq)


@pytest.mark.parametrize("name", KQ)
@pytest.mark.parametrize("use_imp", [False, True])
def test_kquant_start_is_llamacpp_exactly(name, use_imp):
    """At V=0, alpha=beta=1 the k-quant grid and codes are llama.cpp's own (imatrix) quantization (the
    same bytes; with all-zero groups the same values: the code under a zero scale is arbitrary)."""
    qt = get(name)
    for zeros in (False, True):
        W, imp = _matrix(seed=4, zeros=zeros)
        tq = TypeQuantizer(qt, W, imp if use_imp else None)
        data, deq = tq.pack(tq.init_params(True, True))
        ref = qt.quantize(W, imp if use_imp else None)
        assert np.array_equal(deq, qt.dequantize(ref))
        if not zeros:
            assert np.array_equal(data, ref)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"])
def test_legacy_start_is_at_least_as_close(name):
    """Legacy types: same scales as llama.cpp, codes re-rounded to the nearest value of the fp16 grid."""
    qt = get(name)
    W, imp = _matrix(seed=5)
    tq = TypeQuantizer(qt, W, imp)
    _, deq = tq.pack(tq.init_params())
    ref = qt.dequantize(qt.quantize(W, imp))
    assert np.abs(deq - W).sum() <= np.abs(ref - W).sum() + 1e-6
    assert np.mean(deq == ref) > 0.99


def test_ste_gradients_flow():
    qt = get("Q4_K")
    W, imp = _matrix()
    tq = TypeQuantizer(qt, W, imp)
    p = tq.init_params(True, True)
    for v in p.values():
        v.requires_grad_(True)
    target = torch.from_numpy(W) * 1.01
    loss = ((tq.qdq(p) - target) ** 2).sum()
    loss.backward()
    for k, v in p.items():
        assert v.grad is not None and torch.isfinite(v.grad).all() and (v.grad != 0).any(), k


def test_ste_helpers():
    x = torch.tensor([0.4, 0.5, 1.5, -2.6, 70000.0], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 0.0, 2.0, -3.0, 70000.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 5
    z = f16_ste(torch.tensor([1.0 / 3, 1e-8, 1e6]))
    assert z.tolist() == [np.float32(np.float16(1.0 / 3)), np.float32(np.float16(1e-8)), 65504.0]


# ------------------------------------------------------------------------------------------------
# whole blocks
# ------------------------------------------------------------------------------------------------
def _random_block(seed=0, dim=256, ff=512):
    rng = np.random.default_rng(seed)
    hp = LlamaHParams(n_vocab=10, n_embd=dim, n_layer=1, n_head=4, n_head_kv=2, n_ff=ff, head_dim_k=dim // 4,
                      head_dim_v=dim // 4, n_rot=dim // 4)
    kv = 2 * dim // 4
    shapes = {"attn_q": (dim, dim), "attn_k": (kv, dim), "attn_v": (kv, dim), "attn_output": (dim, dim),
              "ffn_gate": (ff, dim), "ffn_up": (ff, dim), "ffn_down": (dim, ff)}
    w = {k: (rng.standard_normal(s) / np.sqrt(s[1])).astype(np.float32) for k, s in shapes.items()}
    w["attn_norm"] = (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
    w["ffn_norm"] = (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
    x = rng.standard_normal((8, 32, dim)).astype(np.float32)
    x[..., :4] *= 6              # a few outlier channels, as in real activations
    return hp, w, x


def _importance(hp, w, x):
    from qgguf.runtime.model import attention, ffn_hidden, rms_norm
    wt = {k: torch.from_numpy(v) for k, v in w.items()}
    x = torch.from_numpy(x)
    with torch.no_grad():
        n = rms_norm(x, wt["attn_norm"], hp.norm_eps)
        a = attention(hp, wt, n)
        h = x + torch.nn.functional.linear(a, wt["attn_output"])
        m = rms_norm(h, wt["ffn_norm"], hp.norm_eps)
        f = ffn_hidden(wt, m)
    out = {}
    for k, inp in (("attn_q", n), ("attn_k", n), ("attn_v", n), ("attn_output", a), ("ffn_gate", m),
                   ("ffn_up", m), ("ffn_down", f)):
        out[k] = (inp.reshape(-1, inp.shape[-1]) ** 2).mean(0).numpy()
    return out


def _check_result(res, hp, w, qtypes, xq, xfp):
    # the packed bytes dequantize to the weights the reported loss was computed with
    for k, qt in qtypes.items():
        assert np.array_equal(qt.dequantize(res.packed[k], w[k].shape), res.weights[k]), k
    wd = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in w.items()}
    wq = {**wd, **{k: torch.from_numpy(res.weights[k]) for k in qtypes}}
    with torch.no_grad():
        y = block_forward(hp, wq, torch.from_numpy(xq))
        t = block_forward(hp, wd, torch.from_numpy(xfp))
    assert float(((y - t) ** 2).mean()) == pytest.approx(res.loss, rel=1e-4)


@pytest.mark.parametrize("types", [
    {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K", "ffn_gate": "Q4_K",
     "ffn_up": "Q4_K", "ffn_down": "Q6_K"},
    {"attn_q": "Q2_K", "attn_k": "Q2_K", "attn_v": "Q3_K", "attn_output": "Q3_K", "ffn_gate": "Q2_K",
     "ffn_up": "Q2_K", "ffn_down": "Q3_K"},
    {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q5_0", "attn_output": "Q5_1", "ffn_gate": "IQ4_NL",
     "ffn_up": "Q4_0", "ffn_down": "Q5_K"},
])
def test_random_block_beats_rtn_and_imatrix(types):
    hp, w, x = _random_block()
    rng = np.random.default_rng(1)
    xq = (x + 0.02 * rng.standard_normal(x.shape)).astype(np.float32)   # upstream quantization error
    qtypes = {k: get(v) for k, v in types.items()}
    imp = _importance(hp, w, x)
    r = make_recipe("light", iters=40, nsamples=8, seqlen=32, batch_size=2)
    res = autoround_block(hp, w, qtypes, xq, x, imp, r, forward=block_forward)
    assert set(res.losses) == {"tuned", "imatrix", "rtn"}
    assert res.loss <= res.losses["imatrix"] and res.loss <= res.losses["rtn"]
    # the tuning itself (not the fallback) improves on the importance-weighted start
    assert res.losses["tuned"] < res.losses["imatrix"]
    assert res.chosen == "tuned"
    _check_result(res, hp, w, qtypes, xq, x)
    # deterministic for a fixed seed
    res2 = autoround_block(hp, w, qtypes, xq, x, imp, r, forward=block_forward)
    assert all(np.array_equal(res.packed[k], res2.packed[k]) for k in qtypes)
    assert res2.loss == res.loss


def test_zero_iters_is_the_imatrix_start():
    hp, w, x = _random_block(seed=3)
    qtypes = {k: get("Q4_K") for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                      "ffn_down")}
    imp = _importance(hp, w, x)
    res = autoround_block(hp, w, qtypes, x, x, imp, make_recipe("light", iters=0, nsamples=8, seqlen=32),
                          forward=block_forward)
    assert res.losses["tuned"] == res.losses["imatrix"]
    for k, qt in qtypes.items():
        assert np.array_equal(res.packed[k], qt.quantize(w[k], imp[k]))


@pytest.mark.skipif(not STORIES.is_file(), reason="stories260K not available")
def test_stories260k_first_block():
    from qgguf.runtime.model import LlamaModel, embed
    m = LlamaModel.from_gguf(STORIES)
    hp = m.hp
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, hp.n_vocab, (8, 48)))
    with torch.no_grad():
        x = embed(m.tok_embd.dense_weight(), ids).numpy()
    w = {k: v.numpy() for k, v in m.block_weights(0).items()}
    # ffn_down rows are 172 long: no 32-blocks; it stays F16 (the non-tuned path)
    qtypes = {"attn_q": get("Q4_0"), "attn_k": get("Q4_0"), "attn_v": get("Q5_1"), "attn_output": get("Q4_1"),
              "ffn_gate": get("IQ4_NL"), "ffn_up": get("Q4_0"), "ffn_down": get("F16")}
    imp = _importance(hp, w, x)
    r = make_recipe("light", iters=40, nsamples=8, seqlen=48, batch_size=2)
    res = autoround_block(hp, w, qtypes, x, x, imp, r, forward=block_forward)
    assert res.loss <= res.losses["imatrix"] and res.loss <= res.losses["rtn"]
    assert res.losses["tuned"] < res.losses["imatrix"]
    _check_result(res, hp, w, qtypes, x, x)


# ------------------------------------------------------------------------------------------------
# recipes and the method object
# ------------------------------------------------------------------------------------------------
def test_recipes():
    assert set(RECIPES) == {"light", "default", "best"}
    r = make_recipe("default")
    assert r.lr_value == pytest.approx(1.0 / r.iters) and r.minmax_lr_value == pytest.approx(r.lr_value / 10)
    assert not r.enable_minmax and r.batch_size == 2
    r = make_recipe("light", iters="20", lr=None, scale_bounds="0.6,1.2", tune_super="true", unknown=3)
    assert r.iters == 20 and r.scale_bounds == (0.6, 1.2) and r.tune_super is True
    for bad in ({"iters": -1}, {"batch_size": 0}, {"lr": -1}, {"scale_bounds": "1.2,1.5"}):
        with pytest.raises(OptionError):
            make_recipe("default", **bad)
    with pytest.raises(OptionError):
        make_recipe("fastest")
    m = AutoRound(recipe="best", iters=7)
    assert m.recipe.iters == 7 and m.nsamples == RECIPES["best"].nsamples
    assert "autoround" in m.describe()


# ------------------------------------------------------------------------------------------------
# through the block pipeline
# ------------------------------------------------------------------------------------------------
C4 = Path("/work/shared/data/c4-sample-1000.jsonl")


@pytest.mark.skipif(not (STORIES.is_file() and C4.is_file()), reason="shared test data not available")
def test_convert_end_to_end(tmp_path):
    from qgguf.convert.pipeline import convert
    from qgguf.runtime.model import LlamaModel
    out = tmp_path / "ar.gguf"
    opts = {"recipe": "light", "iters": 8, "batch_size": 2}
    rep = convert(STORIES, out, method="autoround", type="Q4_0", calib=C4, nsamples=8, seqlen=64,
                  progress=False, method_options=opts)
    assert "autoround" in rep.method
    m = LlamaModel.from_gguf(out)
    assert torch.isfinite(m.logits([1, 2, 3, 4])).all()
    # same settings, same bytes
    out2 = tmp_path / "ar2.gguf"
    convert(STORIES, out2, method="autoround", type="Q4_0", calib=C4, nsamples=8, seqlen=64, progress=False,
            method_options=opts)
    assert out.read_bytes() == out2.read_bytes()


# ------------------------------------------------------------------------------------------------
# init="gptq": the tuning starts from GPTQ's codes (which error feedback moves off nearest rounding)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q6_K"])
def test_start_from_codes_reproduces_a_moved_start_exactly(name):
    from qgguf.quantize.gptq import gptq_quantize
    qt = get(name)
    W, _ = _matrix(rows=8, n=512, seed=4, zeros=False)
    rng = np.random.default_rng(5)
    X = rng.standard_normal((2048, 512)).astype(np.float32)
    X[:, :8] *= 5
    H = (X.T.astype(np.float64) @ X)
    packed = gptq_quantize(W, H, qt, None).pack()
    tq = TypeQuantizer(qt, W, None, start_fields=qt.unpack(packed))
    moved = tq.start_from_codes()
    assert moved > 0          # GPTQ's codes are not nearest rounding under its own scales
    with torch.no_grad():
        wq = tq.qdq(tq.init_params(False)).numpy()
    assert np.array_equal(wq, qt.dequantize(packed, W.shape))
    data, _ = tq.pack(tq.init_params(False))
    assert np.array_equal(np.asarray(data).view(np.uint8).reshape(-1), np.asarray(packed).view(np.uint8).reshape(-1))


def test_block_with_gptq_start():
    hp, w, x = _random_block(seed=2)
    rng = np.random.default_rng(1)
    xq = (x + 0.02 * rng.standard_normal(x.shape)).astype(np.float32)
    qtypes = {k: get("Q4_0") for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")}
    qtypes["ffn_down"] = get("Q2_K")
    imp = _importance(hp, w, x)
    # a start whose codes differ from nearest rounding: the imatrix result with some codes stepped by one
    start = {}
    for k, qt in qtypes.items():
        f = qt.unpack(qt.quantize(w[k], imp[k]))
        q = np.asarray(f["q"]).astype(np.int64)
        lo, hi = (0, 3) if qt.name.upper() == "Q2_K" else (0, 15)
        step = rng.integers(-1, 2, q.shape) * (rng.random(q.shape) < 0.2)
        f["q"] = np.clip(q + step, lo, hi).astype(np.asarray(f["q"]).dtype)
        start[k] = qt.pack(f)
    r0 = make_recipe("light", iters=0, nsamples=8, seqlen=32)
    res0 = autoround_block(hp, w, qtypes, xq, x, imp, r0, forward=block_forward, start=start)
    assert set(res0.losses) == {"tuned", "imatrix", "rtn", "start"}    # "start": named by recipe.init if set
    assert res0.losses["tuned"] == res0.losses["start"]       # 0 iterations: exactly the start
    rq = make_recipe("light", iters=0, nsamples=8, seqlen=32, init="quantease")
    assert set(autoround_block(hp, w, qtypes, xq, x, imp, rq, forward=block_forward, start=start).losses) == \
        {"tuned", "imatrix", "rtn", "quantease"}
    r = make_recipe("light", iters=30, nsamples=8, seqlen=32, batch_size=2)
    res = autoround_block(hp, w, qtypes, xq, x, imp, r, forward=block_forward, start=start)
    assert res.losses["tuned"] < res.losses["start"]         # the tuning improves on its start
    assert res.loss == min(res.losses.values())
    _check_result(res, hp, w, qtypes, xq, x)


@pytest.mark.skipif(not (STORIES.is_file() and C4.is_file()), reason="shared test data not available")
@pytest.mark.parametrize("init", ["gptq", "quantease"])
def test_convert_with_error_feedback_start(tmp_path, init):
    from qgguf.convert.pipeline import convert
    out = tmp_path / f"ar-{init}.gguf"
    opts = {"recipe": "light", "iters": 8, "batch_size": 2, "init": init}
    rep = convert(STORIES, out, method="autoround", type="Q4_0", calib=C4, nsamples=8, seqlen=64,
                  progress=False, method_options=opts)
    assert f"init={init}" in rep.method
    with pytest.raises(OptionError):
        make_recipe("default", init="magic")
