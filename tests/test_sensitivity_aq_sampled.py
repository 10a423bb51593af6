"""The sampled AQ search of the sensitivity measurement (issue 6's search cost): AQ candidates searched only in the
layers of the KL divergence measurements, the others' AQ layer errors predicted per role from a standard type."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qgguf.convert.mixed import is_block_linear
from qgguf.errors import OptionError
from qgguf.quantize.sensitivity import (AQ_CANDIDATES, STANDARD_CANDIDATES, TensorSensitivity, _check_layers,
                                        _spearman, candidate_types, measure, predict_aq_errors)

from _shared import one_torch_thread  # noqa: F401

STORIES = Path("/work/shared/models/stories260K.gguf")
if not STORIES.is_file():
    STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K.gguf"
C4 = STORIES.parents[1] / "data" / "c4-sample-1000.jsonl"
FAST_AQ = {"max_rounds": 1, "adam_steps": 4, "adam_later": 2, "kmeans_iters": 4, "kmeans_points": 4096}

# bytes of a 64 x 256 tensor: Q2_K 2.625 bpw, Q4_K 4.5, Q8_0 8.5; the AQ types 2.2 and 1.2 (made up, in between)
NBYTES = {"Q8_0": 17408, "Q4_K": 9216, "Q2_K": 5376, "aq-2x8-g8": 4500, "aq-1x8-g8": 2460}


def _synthetic(layers=7, roles=("attn_q", "ffn_down")):
    """Standard errors on every layer; the AQ errors of role k are e(Q2_K) * exp(a_k + b_k * layer) (log-linear
    in the layer index, so the prediction from layers 0, 3, 6 is exact)."""
    sens, keys_of, truth = {}, {}, {}
    rng = np.random.default_rng(0)
    for ir, k in enumerate(roles):
        for il in range(layers):
            n = f"blk.{il}.{k}.weight"
            base = float(np.exp(rng.normal()))
            err = {"Q8_0": 0.01 * base, "Q4_K": 0.2 * base, "Q2_K": 1.0 * base}
            for j, q in enumerate(("aq-2x8-g8", "aq-1x8-g8")):
                truth[(n, q)] = err["Q2_K"] * np.exp(0.3 * (j + 1) + (0.05 + 0.1 * ir) * il)
            sens[n] = TensorSensitivity(n, (64, 256), dict(NBYTES), err)
            keys_of[n] = (il, k)
    return sens, keys_of, truth


def test_prediction_exact_for_log_linear_ratios_per_role():
    sens, keys_of, truth = _synthetic()
    searched = (0, 3, 6)
    pending = {}
    for n, (il, k) in keys_of.items():
        if il in searched:
            sens[n].error.update({q: truth[(n, q)] for q in AQ_CANDIDATES if (n, q) in truth})
        else:
            pending[n] = ["aq-2x8-g8", "aq-1x8-g8"]
    predict_aq_errors(sens, keys_of, pending)
    for n, qs in pending.items():
        for q in qs:
            assert sens[n].error[q] == pytest.approx(truth[(n, q)], rel=1e-9)
            assert sens[n].predicted[q] == "Q2_K"          # nearest in bits per weight to both AQ types
    for n, (il, _) in keys_of.items():
        if il in searched:
            assert not sens[n].predicted                    # searched errors are left alone
            assert "aq_predicted_from" not in sens[n].to_json()
        else:
            assert sens[n].to_json()["aq_predicted_from"]["aq-2x8-g8"] == "Q2_K"


def test_reference_with_a_zero_error_is_not_used_and_unsearched_types_are_dropped():
    sens, keys_of, truth = _synthetic(roles=("attn_q",))
    sens["blk.4.attn_q.weight"].error["Q2_K"] = 0.0        # e.g. a source that lies on the type's grid
    pending = {}
    for n, (il, _) in keys_of.items():
        if il in (0, 3, 6):
            sens[n].error["aq-2x8-g8"] = truth[(n, "aq-2x8-g8")]   # aq-1x8-g8 never searched
        else:
            pending[n] = ["aq-2x8-g8", "aq-1x8-g8"]
    predict_aq_errors(sens, keys_of, pending)
    for n in pending:
        assert sens[n].predicted == {"aq-2x8-g8": "Q4_K"}   # the next nearest with positive errors everywhere
        assert "aq-1x8-g8" not in sens[n].error and "aq-1x8-g8" not in sens[n].nbytes
        assert sens[n].options().options   # still a valid table for the allocator
    # exact where the Q4_K ratio is log-linear too (it is here: Q4_K = 0.2 Q2_K except on layer 4)
    n = "blk.2.attn_q.weight"
    assert sens[n].error["aq-2x8-g8"] == pytest.approx(truth[(n, "aq-2x8-g8")], rel=1e-9)


def test_check_layers_are_unsearched_midpoints():
    assert _check_layers([0, 5, 10, 15, 20, 25, 29], 3) == [2, 12, 27]
    assert _check_layers([0, 1, 2], 3) == []
    assert _check_layers([0, 2, 4], 5) == [1, 3]


@pytest.mark.skipif(not STORIES.is_file() or not C4.is_file(), reason="shared test data missing")
@pytest.mark.usefixtures("one_torch_thread")
def test_sampled_search_against_full_search_on_stories():
    """stories260K, KL divergence layers 0, 2, 4 (alpha_stride 2): the sampled search searches AQ there only
    (identical errors to the full search), predicts layers 1 and 3 close to the full search's errors, checks them
    (held out) with ``check``. (Its cost is measured by tools/bench_mixed.py, not timed here: with the check the
    sampled search also searches the held-out layers, so on 5 layers it is not cheaper.)"""
    from qgguf.convert.sources import open_source
    src = open_source(STORIES)

    def types_for(n, s):
        return candidate_types(s, STANDARD_CANDIDATES + (AQ_CANDIDATES if is_block_linear(n) else ()))
    kw = dict(types_for=types_for, calib=str(C4), nsamples=8, seqlen=64, kld_samples=2, kld_seqlen=64,
              progress=False, alpha_stride=2, aq_options=FAST_AQ)
    full = measure(src, aq_search="full", **kw)
    samp = measure(src, aq_search="sampled", check=4, **kw)
    assert full.aq_search == "full" and samp.aq_search == "sampled"
    pred, exact = [], []
    n_pred = 0
    for n, ts in samp.tensors.items():
        f = full.tensors[n]
        assert set(ts.error) == set(f.error)
        aq = [q for q in ts.error if q.startswith("aq-")]
        if not aq:
            continue
        il = int(n.split(".")[1])
        if il in (0, 2, 4):
            assert not ts.predicted
            assert all(ts.error[q] == f.error[q] for q in aq)
        else:
            assert set(ts.predicted) == set(aq)
            n_pred += 1
            pred += [ts.error[q] for q in aq]
            exact += [f.error[q] for q in aq]
            assert ts.error["Q4_0"] == f.error["Q4_0"]      # standard types are measured everywhere
    assert n_pred >= 8
    assert _spearman(pred, exact) > 0.95
    ratio = np.asarray(exact) / np.asarray(pred)
    assert 0.6 < float(np.median(ratio)) < 1.6
    ap = samp.proxy_check["aq_prediction"]
    assert ap["layers"] == [1, 3] and ap["pairs"] == len(pred) and ap["spearman"] > 0.95
    # the check searches the held-out layers with the same seeds as the full search
    for it in ap["items"]:
        assert it["searched"] == pytest.approx(full.tensors[it["tensor"]].error[it["type"]], rel=1e-6)
    with pytest.raises(OptionError, match="AQ search"):
        measure(src, aq_search="some", **kw)


def test_cli_aq_search_reaches_the_sensitivity_options(monkeypatch, tmp_path):
    """``qgguf convert --aq-search full`` hands ``aq_search='full'`` to the measurement (default: not set, i.e.
    sampled); a bad value is refused by the parser."""
    from qgguf import cli
    from qgguf.convert import pipeline

    seen = []

    class _Rep:
        def summary(self):
            return ""

        def to_json(self):
            return "{}"

    def fake_convert(src, out, **kw):
        seen.append(kw.get("sensitivity"))
        return _Rep()

    monkeypatch.setattr(pipeline, "convert", fake_convert)
    base = ["convert", "in.gguf", "-o", str(tmp_path / "o.gguf"), "--method", "aq", "--compat", "any",
            "--target-size", "1000000", "-q"]
    cli.main(base + ["--aq-search", "full"])
    cli.main(base)
    assert seen[0]["aq_search"] == "full"
    assert "aq_search" not in seen[1]
    with pytest.raises(SystemExit):
        cli.main(base + ["--aq-search", "some"])
    # --kld-stride K: the single-tensor KL divergence layers (alpha_stride); not set: the measurement's default
    cli.main(base + ["--kld-stride", "1"])
    assert seen[-1]["alpha_stride"] == 1 and "alpha_stride" not in seen[1]
    n = len(seen)
    assert cli.main(base + ["--kld-stride", "0"]) == 2 and len(seen) == n


def test_measurement_search_damps_like_the_conversion():
    """The measurement's short AQ search uses the conversion's damping of H (its other options are shorter): an
    undamped measurement predicted other errors than the conversion makes (SmolLM2 blk.11.ffn_down)."""
    from qgguf.quantize.aq import METHOD_DEFAULTS
    from qgguf.quantize.sensitivity import AQ_MEASURE
    assert AQ_MEASURE["damp"] == METHOD_DEFAULTS["damp"] > 0
    assert AQ_MEASURE["max_rounds"] <= METHOD_DEFAULTS["max_rounds"]
