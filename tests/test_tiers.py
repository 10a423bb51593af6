"""Row-tiered tensors (gguf_types/tiers.py): names, quantization order, layout, conversion and loading."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qgguf import gguf_types
from qgguf.errors import OptionError, QggufError
from qgguf.gguf_types.tiers import TIER_ROWS, TieredType

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K.gguf"
C4 = SHARED / "data" / "c4-sample-1000.jsonl"
needs_data = pytest.mark.skipif(not (STORIES.is_file() and C4.is_file()), reason="shared test data not available")


def test_names():
    qt = gguf_types.get("tiers-q8_0@64-q5_0@100-iq4_nl")
    assert isinstance(qt, TieredType) and qt.name == "tiers-Q8_0@64-Q5_0@100-IQ4_NL"
    assert [(t.name, n) for t, n in qt.tiers] == [("Q8_0", 64), ("Q5_0", 100), ("IQ4_NL", 0)]
    assert gguf_types.get(qt.name) is qt
    for bad in ("tiers-Q8_0@0-Q4_0", "tiers-aq-2x8-g8@8-Q4_0", "tiers-Q8_0@8-aq-2x8-g8", "tiers-Q8_0", "tiers-XX@3-Q4_0"):
        with pytest.raises(QggufError):
            gguf_types.get(bad)


def test_sizes_and_layout():
    qt = gguf_types.get("tiers-Q8_0@10-Q5_0@5-Q4_0")
    specs = qt.companion_specs((50, 64))
    assert [(s.suffix, s.container, s.gguf_shape) for s in specs] == [
        (TIER_ROWS, "I32", (15,)), (".tier0", "Q8_0", (64, 10)), (".tier1", "Q5_0", (64, 5)), (".tier2", "Q4_0", (64, 35))]
    assert qt.nbytes((50, 64)) == 15 * 4 + 10 * 2 * 34 + 5 * 2 * 22 + 35 * 2 * 18
    with pytest.raises(QggufError, match="too small"):
        qt.companion_specs((15, 64))
    with pytest.raises(QggufError, match="blocks"):
        qt.companion_specs((50, 40))


def test_rows_ranked_by_weight():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 64)).astype(np.float32)
    w = rng.random(300)
    qt = gguf_types.get("tiers-Q8_0@40-Q4_0")
    comp = qt.quantize(x, None, row_weights=w)
    top = np.sort(np.argsort(-w)[:40])
    np.testing.assert_array_equal(comp[TIER_ROWS], top)        # the listed rows, ascending
    y = qt.dequantize(np.asarray(comp), (300, 64))      # the flat blob, as checkpoints and the writer pass it
    q8 = gguf_types.get("Q8_0").dequantize(gguf_types.get("Q8_0").quantize(x[top]), (40, 64))
    rest = np.setdiff1d(np.arange(300), top)
    q4 = gguf_types.get("Q4_0").dequantize(gguf_types.get("Q4_0").quantize(x[rest]), (260, 64))
    np.testing.assert_array_equal(y[top], q8)
    np.testing.assert_array_equal(y[rest], q4)
    assert np.asarray(comp).size == qt.nbytes((300, 64))
    # no weights: the first rows
    np.testing.assert_array_equal(qt.quantize(x)[TIER_ROWS], np.arange(40))
    # a corrupt row list is an error, not wrong rows
    for bad_rows, msg in ((np.r_[top[:-1], top[0]], "ascending"), (np.r_[top[:-1], 300], "outside"),
                          (top[:-1], "listed rows")):
        bad = dict(comp)
        bad[TIER_ROWS] = bad_rows.astype(np.int32)
        with pytest.raises(QggufError, match=msg):
            qt.dequantize(bad, (300, 64)) if msg != "listed rows" else qt.dequantize_fields(
                {"tier_rows": bad[TIER_ROWS], "tier0": comp[".tier0"], "tier1": comp[".tier1"]})
    three = gguf_types.get("tiers-Q8_0@10-Q5_0@20-Q4_0")
    c3 = three.quantize(x, None, row_weights=w)
    o = np.argsort(-w, kind="stable")
    np.testing.assert_array_equal(c3[TIER_ROWS], np.r_[np.sort(o[:10]), np.sort(o[10:30])])
    dup = dict(c3)
    dup[TIER_ROWS] = np.r_[np.sort(o[:10]), np.sort(np.r_[o[10:29], o[0]])].astype(np.int32)
    with pytest.raises(QggufError, match="two tiers"):
        three.dequantize(dup, (300, 64))


def _convert(out, **kw):
    from qgguf.convert.pipeline import convert
    return convert(STORIES, out, calib=C4, nsamples=8, seqlen=64, seed=0, progress=False, **kw)


@needs_data
def test_aq_conversion_ranks_by_token_probability(tmp_path, monkeypatch):
    """--method aq with a tiered embedding: the rows are ranked by the mean token probabilities that the
    block pass computed, the file reads back with gguf-py and in the runner (float32 rows in token order),
    and inspect shows the type."""
    import gguf

    from qgguf.convert.ggufread import GGUFFile
    from qgguf.convert.inspect import qgguf_rows
    from qgguf.runtime.linear import DenseLinear, load_llama

    seen = {}
    real = TieredType.quantize

    def spy(self, x, importance=None, row_weights=None):
        seen["w"] = None if row_weights is None else np.array(row_weights)
        return real(self, x, importance, row_weights)
    monkeypatch.setattr(TieredType, "quantize", spy)
    out = tmp_path / "t.gguf"
    rep = _convert(out, method="aq", aq_config="aq-2x8-g8", tensor_types=["token_embd.weight=tiers-Q8_0@64-Q4_0"],
                   method_options=dict(beam=1, max_rounds=1, adam_steps=5, kmeans_iters=4, ft_epochs=1,
                                       e2e_epochs=1, e2e_nsamples=8))
    assert gguf_types.get({t.name: t.type for t in rep.tensors}["token_embd.weight"]).name == "tiers-Q8_0@64-Q4_0"
    w = seen["w"]
    assert w is not None and w.shape == (512,) and abs(w.sum() - 1.0) < 1e-6
    r = gguf.GGUFReader(out)
    by = {t.name: t for t in r.tensors}
    assert "token_embd.weight" not in by
    rows = np.asarray(by["token_embd.weight" + TIER_ROWS].data).reshape(-1)
    np.testing.assert_array_equal(rows, np.sort(np.argsort(-w, kind="stable")[:64]))
    assert by["token_embd.weight.tier0"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert by["token_embd.weight.tier1"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    with GGUFFile(out) as g:
        row = {x["name"]: x for x in qgguf_rows(g)}["token_embd.weight"]
    qt = gguf_types.get("tiers-Q8_0@64-Q4_0")
    assert row["type"] == qt.name and row["bytes"] == qt.nbytes((512, 64))
    model = load_llama(out, threads=1)
    assert isinstance(model.tok_embd, DenseLinear)
    comp = {s: np.asarray(by["token_embd.weight" + s].data) for s in qt.suffixes()}
    want = qt.dequantize(comp, (512, 64))
    np.testing.assert_array_equal(model.tok_embd.dense_weight().numpy(), want)


@needs_data
def test_plain_method_keeps_token_order(tmp_path):
    import gguf
    out = tmp_path / "t.gguf"
    _convert(out, method="rtn", type="Q8_0", tensor_types=["token_embd.weight=tiers-Q8_0@100-Q4_0"])
    by = {t.name: t for t in gguf.GGUFReader(out).tensors}
    np.testing.assert_array_equal(np.asarray(by["token_embd.weight" + TIER_ROWS].data).reshape(-1), np.arange(100))


@needs_data
def test_tiers_only_for_the_embedding_and_output(tmp_path):
    with pytest.raises(OptionError, match="row tiers"):
        _convert(tmp_path / "t.gguf", method="rtn", type="Q8_0", tensor_types=["attn_q=tiers-Q8_0@16-Q4_0"])
    assert not list(tmp_path.iterdir())


def test_weighted_head_error_is_the_probability_weighted_layer_error(monkeypatch):
    """The allocator's head error: sum_v R p_v d_v^T H d_v / N over the rows, a tiered type's rows in their tier's
    type by rank; exact with every row measured, a close estimate with the rare rows sampled."""
    import torch

    from qgguf.quantize import sensitivity as S
    rng = np.random.default_rng(1)
    R, C, N = 700, 64, 256
    w = torch.from_numpy(rng.standard_normal((R, C)).astype(np.float32))
    X = torch.from_numpy(rng.standard_normal((N, C)).astype(np.float32))
    H = X.T @ X
    p = rng.dirichlet(np.full(R, 0.2))
    imp = np.ones(C, np.float32)
    types = ["Q8_0", "Q4_0", "tiers-Q8_0@100-Q4_0", "tiers-Q8_0@50-Q5_0@200-Q4_0"]

    def exact(q):
        wq = S._quantized(gguf_types.get(q), w.numpy(), imp, p)
        d = wq - w
        return float((torch.from_numpy(R * p) * ((d @ H) * d).sum(1).double()).sum()) / N

    ts = S.TensorSensitivity("token_embd.weight", (R, C), {}, {})
    S._weighted_head(ts, types, w, p, imp, H, float(N))
    for q in types:
        assert ts.error[q] == pytest.approx(exact(q), rel=1e-5)
        assert ts.nbytes[q] == S.file_bytes("token_embd.weight", (R, C), gguf_types.get(q))
    assert ts.error["Q8_0"] < ts.error["tiers-Q8_0@100-Q4_0"] < ts.error["Q4_0"]
    monkeypatch.setattr(S, "HEAD_EXACT_ROWS", 150)
    monkeypatch.setattr(S, "MAX_ERROR_ROWS", 200)
    ts2 = S.TensorSensitivity("token_embd.weight", (R, C), {}, {})
    S._weighted_head(ts2, types, w, p, imp, H, float(N))
    for q in types:
        assert ts2.error[q] == pytest.approx(exact(q), rel=0.1)


def test_tier_candidates():
    from qgguf.quantize.sensitivity import STANDARD_CANDIDATES, tier_candidates
    c = tier_candidates((49152, 576), STANDARD_CANDIDATES)
    assert "tiers-Q8_0@1024-IQ4_NL" in c and "tiers-Q8_0@512-Q5_0@8192-IQ4_NL" in c
    assert all(gguf_types.get(q).nbytes((49152, 576)) for q in c)
    assert not any("Q4_K" in q or "Q2_K" in q for q in c)          # rows of 576: no 256-blocks
    small = tier_candidates((512, 64), ("Q8_0", "Q4_0"))
    assert small == ["tiers-Q8_0@256-Q4_0"]


@needs_data
def test_allocator_offers_and_writes_tiered_heads(tmp_path):
    """--method aq --compat any: the embedding and output matrix get row-tiered candidates measured by the
    probability-weighted error; a plan with one is written at its planned size and loads."""
    import json

    import qgguf
    from qgguf.convert.inspect import inspect_file
    fast = {"max_rounds": 1, "adam_steps": 4, "adam_later": 2, "kmeans_iters": 4, "kmeans_points": 4096,
            "ft_epochs": 1, "e2e_epochs": 1, "e2e_nsamples": 8}
    cal = dict(method="aq", calib=str(C4), nsamples=8, seqlen=64, progress=False, method_options=fast)
    sens = {"nsamples": 8, "seqlen": 64, "kld_samples": 2, "kld_seqlen": 64, "types": ["F16", "Q8_0", "Q4_0", "aq-2x8-g8"]}
    # most block linears pinned: the budget goes to the head, where tiers are the steps between Q4_0 and Q8_0
    pin = [r"blk\.[1-4]\.=Q4_0"]
    lo = qgguf.convert(STORIES, tmp_path / "lo.gguf", tensor_types=pin, aq_config="aq-2x8-g8",
                       token_embedding_type="Q4_0", output_tensor_type="Q4_0", **cal).file_bytes
    rep = qgguf.convert(STORIES, tmp_path / "mix.gguf", target_size=lo + 14_000, tensor_types=pin,
                        save_recipe=tmp_path / "r.json", sensitivity=sens, **cal)
    r = json.loads((tmp_path / "r.json").read_text())
    for n in ("token_embd.weight", "output.weight"):
        cand = r["sensitivity"][n]["candidates"]
        assert "tiers-Q8_0@256-Q4_0" in cand, cand
        assert cand["Q8_0"][1] < cand["tiers-Q8_0@256-Q4_0"][1] < cand["Q4_0"][1]
        d = r["sensitivity"][n]          # the tiers' own factor, from a real KL divergence of one of them
        assert d["tier_ref"] == "tiers-Q8_0@256-Q4_0" and d["tier_alpha"] > 0
        assert cand["tiers-Q8_0@256-Q4_0"][2] == pytest.approx(d["tier_alpha"] * cand["tiers-Q8_0@256-Q4_0"][1])
    tiered = {n: t for n, t in r["types"].items() if t.lower().startswith("tiers-")}
    assert tiered, r["types"]
    size = (tmp_path / "mix.gguf").stat().st_size
    assert size == rep.file_bytes == r["sensitivity"]["_calibration"]["planned_file_bytes"]
    got = {x["name"]: x["type"].lower() for x in inspect_file(tmp_path / "mix.gguf")["tensors"]}
    assert all(got[n] == t.lower() for n, t in tiered.items())
    from qgguf.runtime.evaluate import evaluate
    res = evaluate(tmp_path / "mix.gguf", SHARED / "data" / "wikitext-2-raw-test.txt",
                   ctx=64, chunks=2, base=STORIES, progress=False)
    assert np.isfinite(res["kld"])


@needs_data
def test_corrupt_row_list_is_a_clear_error(tmp_path):
    from _shared import rewrite_gguf

    from qgguf.runtime.linear import load_llama
    src = tmp_path / "t.gguf"
    _convert(src, method="rtn", type="Q8_0", tensor_types=["token_embd.weight=tiers-Q8_0@100-Q4_0"])
    bad = tmp_path / "bad.gguf"

    def dup(name, a):           # a row twice
        if name != "token_embd.weight" + TIER_ROWS:
            return a
        a = a.copy()
        a[1] = a[0]
        return a
    rewrite_gguf(src, bad, dup)
    with pytest.raises(QggufError, match=r"bad\.gguf: tensor token_embd\.weight: .*not ascending"):
        load_llama(bad)
