"""The Python API mirrors the CLI: convert, load, generate, perplexity, kl_divergence."""
from pathlib import Path

import pytest

import qgguf

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K.gguf"
WIKI = SHARED / "data" / "wikitext-2-raw-test.txt"


def test_convert_load_generate_eval(tmp_path):
    out = tmp_path / "s-q8.gguf"
    report = qgguf.convert(STORIES, out, type="Q8_0", progress=False)
    assert out.is_file() and report is not None
    model = qgguf.load(out)
    text = "".join(model.generate("", n_predict=24, temp=0))
    assert text.strip().startswith("Once upon a time, there was a little girl named Lily")
    ppl = model.perplexity(WIKI, ctx=128, chunks=4)
    assert ppl["chunks"] == 4 and 1 < ppl["ppl"] < 1e4
    kl = model.kl_divergence(STORIES, WIKI, ctx=128, chunks=4)
    assert 0 <= kl["kld"] < 0.05 and kl["same_top"] > 0.9
    # the same model against itself: no divergence at all
    assert model.kl_divergence(model, WIKI, ctx=128, chunks=2)["kld"] == pytest.approx(0, abs=1e-9)


def test_load_missing_file_is_a_qgguf_error(tmp_path):
    with pytest.raises(qgguf.QggufError) as e:
        qgguf.load(tmp_path / "nope.gguf")
    assert "nope.gguf" in str(e.value)


def test_convert_stays_callable_after_submodule_imports(tmp_path):
    import qgguf.convert.pipeline  # noqa: F401  (rebinds the qgguf.convert attribute to the package)

    out = tmp_path / "s.gguf"
    qgguf.convert(STORIES, out, type="Q4_0", progress=False)
    assert out.is_file()
