"""Mixed-precision conversions on stories260K: budgets, recipes, --dynamic, metadata, llama.cpp loading, and the
measured sensitivities against real KL divergence."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qgguf
from qgguf import gguf_types
from qgguf.convert.inspect import inspect_file
from qgguf.errors import OptionError

STORIES = Path("/work/shared/models/stories260K.gguf")
if not STORIES.is_file():
    STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K.gguf"
C4 = STORIES.parents[1] / "data" / "c4-sample-1000.jsonl"
WIKI = STORIES.parents[1] / "data" / "wikitext-2-raw-test.txt"
pytestmark = pytest.mark.skipif(not STORIES.is_file() or not C4.is_file(), reason="shared test data missing")

CAL = dict(method="imatrix", calib=str(C4), nsamples=8, seqlen=64, progress=False)
SENS = {"nsamples": 8, "seqlen": 64, "kld_samples": 4, "kld_seqlen": 64}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One measurement (with a proxy check), saved as a recipe; later conversions reuse it (--sens-from)."""
    d = tmp_path_factory.mktemp("mixed")
    rep = qgguf.convert(STORIES, d / "bpw8.gguf", target_bpw=8.0, save_recipe=d / "r8.json",
                        sensitivity=dict(SENS, check=12), **CAL)
    return d, rep, json.loads((d / "r8.json").read_text())


def _types(path) -> dict[str, str]:
    return {r["name"]: r["type"] for r in inspect_file(path)["tensors"]}


def test_measured_recipe_and_metadata(measured):
    d, rep, r = measured
    assert rep.bpw <= 8.0 + 1e-9
    assert rep.mixed["mode"] == "target-bpw"
    sens = {k: v for k, v in r["sensitivity"].items() if not k.startswith("_")}
    # every quantizable tensor measured; F16 (where possible) predicted far below the 4-bit types
    assert set(sens) == set(r["types"])
    for name, s in sens.items():
        c = s["candidates"]
        if set(c) == {"F16"}:   # rows of 172 (ffn_down): no quantized type fits
            assert s["ref"] == ""
            continue
        assert s["alpha"] > 0 and s["ref_kld"] > 0, name
        if "Q4_0" in c:
            assert c["F16"][2] < 0.01 * c["Q4_0"][2]
            assert c["Q8_0"][2] < c["Q4_0"][2]
    # the prediction ranks real single-tensor KL divergences (other types than the reference one)
    assert r["proxy_check"]["pairs"] == 12
    assert r["proxy_check"]["spearman"] > 0.5
    info = inspect_file(d / "bpw8.gguf")
    rc = info["recipe"]
    assert rc["mode"] == "target-bpw" and rc["compat"] == "llama.cpp"
    assert rc["predicted_kld"] == pytest.approx(r["predicted_kld"], rel=1e-5)
    assert {n: v["type"] for n, v in rc["tensors"].items()} == {n: r["types"][n] for n in rc["tensors"]}
    assert not info["needs_qgguf_runner"]


def test_target_size_exact_and_recipe_reuse(measured, tmp_path):
    d, _, _ = measured
    target = 280_000
    rep = qgguf.convert(STORIES, tmp_path / "a.gguf", target_size=target, save_recipe=tmp_path / "a.json",
                        sensitivity={"from": str(d / "r8.json")}, **CAL)
    size = (tmp_path / "a.gguf").stat().st_size
    assert size <= target and target - size < 2048, size
    assert rep.file_bytes == size
    # the recipe file reproduces the types (and, with the same method and calibration, the bytes)
    qgguf.convert(STORIES, tmp_path / "b.gguf", recipe_file=tmp_path / "a.json", **CAL)
    assert _types(tmp_path / "a.gguf") == _types(tmp_path / "b.gguf")
    # a smaller budget never predicts less damage
    r_small = json.loads((tmp_path / "a.json").read_text())
    assert r_small["predicted_kld"] >= json.loads((d / "r8.json").read_text())["predicted_kld"]


def test_mixed_beats_uniform_at_same_size(measured, tmp_path):
    """Real KL divergence (evaluator, WikiText-2) of the measured mix at the size of uniform Q4_0 is lower."""
    d, _, _ = measured
    from qgguf.runtime.evaluate import evaluate
    uni = qgguf.convert(STORIES, tmp_path / "q4.gguf", type="Q4_0", **CAL)
    qgguf.convert(STORIES, tmp_path / "mix.gguf", target_size=uni.file_bytes,
                  sensitivity={"from": str(d / "r8.json")}, **CAL)
    assert (tmp_path / "mix.gguf").stat().st_size <= uni.file_bytes
    k_uni = evaluate(tmp_path / "q4.gguf", WIKI, ctx=128, chunks=6, base=STORIES, progress=False)["kld"]
    k_mix = evaluate(tmp_path / "mix.gguf", WIKI, ctx=128, chunks=6, base=STORIES, progress=False)["kld"]
    assert k_mix < 0.9 * k_uni, (k_mix, k_uni)


def test_dynamic_upgrades_within_extra(measured, tmp_path):
    d, _, _ = measured
    base = qgguf.convert(STORIES, tmp_path / "base.gguf", type="Q4_0", **CAL)
    dyn = qgguf.convert(STORIES, tmp_path / "dyn.gguf", type="Q4_0", dynamic=True, dynamic_extra=0.10,
                        sensitivity={"from": str(d / "r8.json")}, **CAL)
    tb, td = _types(tmp_path / "base.gguf"), _types(tmp_path / "dyn.gguf")
    shapes = {t.name: t.shape for t in base.tensors}
    q_base = dyn.mixed["target"]["base_bytes"]   # the quantized tensors of the plan of --type, padded
    assert q_base <= base.tensor_bytes
    assert base.tensor_bytes < dyn.tensor_bytes <= base.tensor_bytes + 0.10 * q_base + 32
    changed = [n for n in tb if tb[n] != td[n]]
    assert changed
    for n in changed:   # only upgrades
        assert gguf_types.get(td[n]).nbytes(shapes[n]) > gguf_types.get(tb[n]).nbytes(shapes[n])
    assert dyn.mixed["mode"] == "dynamic"


def test_loads_in_llamacpp(measured):
    llama_cpp = pytest.importorskip("llama_cpp")
    d, _, _ = measured
    llm = llama_cpp.Llama(str(d / "bpw8.gguf"), verbose=False, n_ctx=64)
    out = llm("Once upon a time", max_tokens=8, temperature=0)
    assert out["choices"][0]["text"]


def test_errors(measured, tmp_path):
    d, _, _ = measured
    with pytest.raises(OptionError, match="below the smallest"):
        qgguf.convert(STORIES, tmp_path / "x.gguf", target_size="100k", sensitivity={"from": str(d / "r8.json")},
                      **CAL)
    with pytest.raises(OptionError, match="choose one"):
        qgguf.convert(STORIES, tmp_path / "x.gguf", target_size="1MB", dynamic=True, **CAL)
    with pytest.raises(OptionError, match="--compat"):
        qgguf.convert(STORIES, tmp_path / "x.gguf", target_size="1MB", compat="ollama", **CAL)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"types": {"blk.0.attn_q.weight": "Q4_K"}}))   # rows of 64: no Q4_K
    with pytest.raises(qgguf.errors.QggufError, match="do not divide"):
        qgguf.convert(STORIES, tmp_path / "x.gguf", recipe_file=bad, **CAL)
    assert not (tmp_path / "x.gguf").exists()


def test_cli_recipe_argument(tmp_path):
    """--recipe takes an AutoRound preset name or a recipe file; anything else is a one-line error (exit 2)."""
    r = subprocess.run([sys.executable, "-m", "qgguf", "convert", str(STORIES), "-o", str(tmp_path / "x.gguf"),
                        "--recipe", "fastest"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "AutoRound preset" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "qgguf", "convert", str(STORIES), "-o", str(tmp_path / "x.gguf"),
                        "--recipe", str(tmp_path / "none.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "no such recipe file" in r.stderr
