"""The llama-perplexity protocol and its statistics, checked against direct computations."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qgguf.errors import OptionError
from qgguf.runtime.evaluate import EvalStats, percentile, plan_chunks, run_protocol

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K.gguf"
WIKI = SHARED / "data" / "wikitext-2-raw-test.txt"

torch.set_num_threads(1)


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _fake_logits(seed, vocab):
    """A deterministic 'model': logits depend on the chunk prefix; records the chunks it is given."""
    seen = []

    def fn(chunk, first):
        seen.append((list(chunk), first))
        out = []
        for pos in range(first, len(chunk)):
            rng = np.random.default_rng([seed, pos, sum(chunk[: pos + 1]) % 1000])
            out.append(rng.normal(0, 2.0, vocab))
        return np.array(out, np.float32)

    return fn, seen


def test_protocol_and_statistics_match_direct_computation():
    vocab, ctx, n_chunk = 13, 16, 3
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, vocab, 60).tolist()
    model, seen = _fake_logits(1, vocab)
    base, _ = _fake_logits(2, vocab)
    stats = run_protocol(tokens, ctx, n_chunk, add_bos=True, bos_id=1, model_logits=model, base_logits=base,
                         progress=False)
    res = stats.result()
    # chunks: BOS replaces the first token, the rest untouched; second half scored
    assert len(seen) == n_chunk
    for i, (chunk, first) in enumerate(seen):
        assert first == ctx // 2 and chunk[0] == 1 and chunk[1:] == tokens[i * ctx + 1:(i + 1) * ctx]
    nll, kld, same = [], [], []
    for i in range(n_chunk):
        chunk = [1] + tokens[i * ctx + 1:(i + 1) * ctx]
        lm, lb = model(chunk, ctx // 2), base(chunk, ctx // 2)
        for j in range(ctx // 2, ctx - 1):
            pm, pb = _softmax(lm[j - ctx // 2]), _softmax(lb[j - ctx // 2])
            nll.append(-math.log(pm[tokens[i * ctx + j + 1]]))
            kld.append(float((pb * np.log(pb / pm)).sum()))
            same.append(int(np.argmax(pm) == np.argmax(pb)))
    n = len(nll)
    assert n == res["scored"] == n_chunk * (ctx - 1 - ctx // 2)
    nll, kld = np.array(nll), np.array(kld)
    ppl = math.exp(nll.mean())
    assert res["ppl"] == pytest.approx(ppl, rel=1e-6)
    assert res["ppl_err"] == pytest.approx(ppl * nll.std() / math.sqrt(n - 1), rel=1e-5)
    assert res["kld"] == pytest.approx(kld.mean(), rel=1e-6)
    assert res["kld_err"] == pytest.approx(kld.std() / math.sqrt(n - 1), rel=1e-4)
    assert res["kld_p99"] == pytest.approx(np.percentile(kld, 99), rel=1e-5)
    assert res["kld_percentiles"]["median"] == pytest.approx(np.median(kld), rel=1e-5)
    assert res["kld_percentiles"]["max"] == pytest.approx(kld.max(), rel=1e-6)
    p = np.mean(same)
    assert res["same_top"] == pytest.approx(p)
    assert res["same_top_err"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))


def test_no_bos_replacement_and_identical_models():
    vocab, ctx = 11, 8
    tokens = list(range(2, 10)) * 4
    model, seen = _fake_logits(5, vocab)
    stats = run_protocol(tokens, ctx, 3, add_bos=False, bos_id=1, model_logits=model, base_logits=model,
                         progress=False)
    res = stats.result()
    assert seen[0][0] == tokens[:8] and seen[2][0] == tokens[16:24]
    assert res["kld"] == pytest.approx(0.0, abs=1e-12) and res["same_top"] == 1.0
    assert res["ln_ppl_ratio"] == pytest.approx(0.0, abs=1e-12)


def test_percentile_and_chunk_plan():
    v = np.sort(np.random.default_rng(3).random(101))
    for f in (0.0, 0.01, 0.5, 0.9, 0.99, 1.0):
        assert percentile(v, f) == pytest.approx(np.percentile(v, 100 * f))
    assert plan_chunks(1000, 100, None) == 10
    assert plan_chunks(1000, 100, 4) == 4
    assert plan_chunks(1000, 100, 40) == 10
    with pytest.raises(OptionError, match="needs at least"):
        plan_chunks(150, 100, None)
    with pytest.raises(OptionError):
        plan_chunks(1000, 100, 0)


@pytest.mark.skipif(not (STORIES.exists() and WIKI.exists()), reason="shared data missing")
def test_evaluate_stories_end_to_end(tmp_path):
    pytest.importorskip("qgguf.runtime.tokenizer")
    from qgguf.runtime.evaluate import evaluate
    from qgguf.runtime.model import LlamaModel
    from qgguf.runtime.tokenizer import Tokenizer

    text = WIKI.read_text(encoding="utf-8")[:6000]
    tp = tmp_path / "wiki.txt"
    tp.write_text(text, encoding="utf-8")
    ctx, chunks = 64, 3
    res = evaluate(STORIES, tp, ctx=ctx, chunks=chunks, base=STORIES, progress=False)
    assert res["chunks"] == chunks and res["ctx"] == ctx
    assert res["kld"] == pytest.approx(0.0, abs=1e-9) and res["same_top"] == 1.0
    # direct computation with the full forward pass
    tok = Tokenizer.from_gguf(STORIES)
    ids = tok.encode(text, add_special=True)
    assert res["tokens"] == len(ids) and ids[0] == tok.bos_id
    m = LlamaModel.from_gguf(STORIES)
    nll = []
    for i in range(chunks):
        chunk = [tok.bos_id] + ids[i * ctx + 1:(i + 1) * ctx]
        lp = torch.log_softmax(m.logits(chunk).double(), -1)
        for j in range(ctx // 2, ctx - 1):
            nll.append(-float(lp[j, chunk[j + 1]]))
    assert res["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    assert json.dumps(res)  # serializable


@pytest.mark.skipif(not (STORIES.exists() and WIKI.exists()), reason="shared data missing")
def test_base_logit_cache_gives_the_same_result_without_the_base_model(tmp_path, monkeypatch):
    from qgguf.convert.pipeline import convert
    from qgguf.runtime import model as model_mod
    from qgguf.runtime.evaluate import evaluate

    tp = tmp_path / "wiki.txt"
    tp.write_text(WIKI.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    q = tmp_path / "q4_0.gguf"
    convert(STORIES, q, type="Q4_0", pure=True, progress=False)
    cache = tmp_path / "base.npy"
    kw = dict(ctx=64, chunks=3, base=STORIES, progress=False)
    plain = evaluate(q, tp, **kw)
    first = evaluate(q, tp, base_cache=cache, **kw)          # makes the cache
    assert cache.is_file() and (tmp_path / "base.npy.json").is_file()
    assert not list(tmp_path.glob("base.npy.tmp*"))
    assert first == plain and 0 < plain["kld"]
    loads = []
    real = model_mod.LlamaModel.from_gguf
    monkeypatch.setattr(model_mod.LlamaModel, "from_gguf",
                        classmethod(lambda cls, p, **k: (loads.append(str(p)), real(p, **k))[1]))
    again = evaluate(q, tp, base_cache=cache, **kw)          # reads it: the base model is not loaded
    assert again == plain and loads == [str(q)]
    other = evaluate(q, tp, base_cache=cache, **dict(kw, chunks=2))   # another key: made again
    assert other["chunks"] == 2 and len(loads) == 3
    assert np.load(cache, mmap_mode="r").shape[0] == 2
