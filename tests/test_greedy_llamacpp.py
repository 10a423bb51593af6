"""Files qgguf writes, run by qgguf's runner and by llama.cpp: the same greedy text from BOS.

The runner rounds activations as llama.cpp does (Q8_0 activations for Q8_0 weights, fp16 KV cache), so the
logits agree to ~1e-5 until a value lands within float-summation-order distance of a rounding boundary; after
that the two trajectories differ by ~0.1 logit. On the Q8_0 stories260K file that first happens at position 25,
and at token 72 llama.cpp's own top-2 margin is only 0.015, so the texts part there. The test covers the first
64 tokens (the story's opening paragraph) and checks the logits themselves on the exact stretch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import qgguf

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K.gguf"
N_TOKENS = 64


def _llamacpp_greedy(path: Path, n: int) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                          n_threads=2)
    llm.eval([llm.token_bos()])
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


@pytest.mark.parametrize("type_name", ["F32", "Q8_0"])
def test_greedy_text_equals_llamacpp(tmp_path, type_name):
    out = tmp_path / f"stories-{type_name}.gguf"
    qgguf.convert(STORIES, out, type=type_name, progress=False)
    model = qgguf.load(out)
    ours = model.tokenize("")  # BOS only, as llama.cpp starts
    assert ours == [model.tokenizer.bos_id]
    m = model.model
    m.reset()
    logits = m.forward(ours, 0, logits_from=-1)
    ids = []
    for pos in range(1, N_TOKENS + 1):
        t = int(logits[-1].argmax())
        ids.append(t)
        logits = m.forward([t], pos)
    assert ids == _llamacpp_greedy(out, N_TOKENS)
    text = model.tokenizer.decode(ids)
    assert "Once upon a time" in text


def test_q8_0_logits_agree_with_llamacpp(tmp_path):
    """Before any rounding-boundary flip, our Q8_0 logits equal llama.cpp's to float32 noise: this fails
    without the activation rounding of runtime/actquant.py (then they differ by ~0.1 from the first token)."""
    out = tmp_path / "stories-Q8_0.gguf"
    qgguf.convert(STORIES, out, type="Q8_0", progress=False)
    ids = [1] + _llamacpp_greedy(out, 20)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                          n_threads=2)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    model = qgguf.load(out).model
    ours = model.logits(ids).numpy()
    assert np.abs(ours - theirs).max() < 1e-4
