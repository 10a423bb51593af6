"""Mixed precision with qgguf's AQ types (issue 6, ``--compat any --method aq``): exact AQ sizes, the allocator
choosing AQ below the standard-only minimum, per-tensor AQ configurations honoured by the conversion (several in
one block, fine-tuned together), recipe metadata and reuse."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

import qgguf
from qgguf import gguf_types
from qgguf.convert.budget import file_bytes, padded
from qgguf.convert.inspect import inspect_file
from qgguf.convert.writer import OutputFile
from qgguf.errors import OptionError

from _shared import one_torch_thread, synthetic_tool  # noqa: F401

STORIES = Path("/work/shared/models/stories260K.gguf")
if not STORIES.is_file():
    STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K.gguf"
C4 = STORIES.parents[1] / "data" / "c4-sample-1000.jsonl"
WIKI = STORIES.parents[1] / "data" / "wikitext-2-raw-test.txt"
pytestmark = [pytest.mark.skipif(not STORIES.is_file() or not C4.is_file(), reason="shared test data missing"),
              pytest.mark.usefixtures("one_torch_thread")]

FAST_AQ = {"max_rounds": 1, "adam_steps": 4, "adam_later": 2, "kmeans_iters": 4, "kmeans_points": 4096,
           "ft_epochs": 1}
CAL = dict(method="aq", calib=str(C4), nsamples=8, seqlen=64, progress=False, method_options=FAST_AQ)
SENS = {"nsamples": 8, "seqlen": 64, "kld_samples": 2, "kld_seqlen": 64}


def _types(path) -> dict[str, str]:
    return {r["name"]: r["type"].lower() for r in inspect_file(path)["tensors"]}


def _write(path, tensors):
    of = OutputFile(path, "llama")
    for name, shape, qt in tensors:
        of.plan_qtensor(name, shape, qt)
    of.open()
    for name, shape, qt in tensors:
        if qt.name.startswith("aq-"):
            R, C = shape
            data = qt.pack({"codes": np.zeros((C // qt.g, qt.M, R), np.uint8),
                            "codebooks": np.zeros((qt.M, qt.K, qt.g), np.float16),
                            "scales": np.ones(R, np.float32)})
        else:
            data = np.zeros(qt.nbytes(shape), np.uint8)
        of.write_tensor(name, data)
    of.commit()


@pytest.mark.parametrize("cfg", ["aq-1x8-g8", "aq-3x8-g16", "aq-4x8-g8"])
def test_aq_candidate_bytes_are_the_written_bytes(tmp_path, cfg):
    """file_bytes(AQ) - file_bytes(Q8_0) is what storing the tensor in AQ instead of Q8_0 adds to a real file
    (the data of every companion exactly; the header within its 32-byte alignment)."""
    shape = (192, 576)
    aq, q8, f32 = gguf_types.get(cfg), gguf_types.get("Q8_0"), gguf_types.get("F32")
    other = ("blk.0.attn_norm.weight", (576,), f32)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    _write(a, [("blk.0.attn_k.weight", shape, q8), other])
    _write(b, [("blk.0.attn_k.weight", shape, aq), other])
    r = GGUFReader(b)
    data = sum(padded(int(t.n_bytes)) for t in r.tensors if t.name.startswith("blk.0.attn_k.weight"))
    assert data == sum(padded(c.nbytes) for c in aq.companion_specs(shape))
    want = file_bytes("blk.0.attn_k.weight", shape, aq) - file_bytes("blk.0.attn_k.weight", shape, q8)
    version_kv = 8 + len("qgguf.version") + 4 + 4            # written once per file with codebook tensors
    # exactly, with the header unpadded (the header's padding to 32 bytes is per file, in the 1 KiB margin)
    got = (_unpadded(b) + _data(b)) - (_unpadded(a) + _data(a)) - version_kv
    assert got == want, (got, want)
    assert abs(b.stat().st_size - a.stat().st_size - version_kv - want) < 32
    assert want > aq.nbytes(shape) - q8.nbytes(shape)        # the header records and keys are counted


def _unpadded(path) -> int:
    """Bytes of the GGUF header up to the end of its last tensor-info record."""
    r = GGUFReader(path)
    return max(t.field.offset + sum(p.nbytes for p in t.field.parts) for t in r.tensors)


def _data(path) -> int:
    r = GGUFReader(path)
    return path.stat().st_size - r.data_offset


def _mid_model(tmp_path) -> Path:
    """A random llama of dim 256 (2 layers, ffn 512), where AQ is smaller than any standard type."""
    mod = synthetic_tool()
    mod.SHAPES["mid-aq"] = mod.Shape(256, 2, 4, 2, 512, 10000.0, True, 512, 512)
    p = tmp_path / "mid.gguf"
    mod.write_synthetic(p, shape="mid-aq", type="F32")
    return p


def test_allocator_picks_aq_below_standard_minimum_and_recipe_reuse(tmp_path):
    src = _mid_model(tmp_path)
    sens = dict(SENS, types=["Q8_0", "Q4_0", "aq-2x8-g8", "aq-1x8-g8"])
    # the standard-only minimum: every block linear in Q4_0, the tied embedding in Q4_0
    std = qgguf.convert(src, tmp_path / "q4.gguf", method="imatrix", type="Q4_0", token_embedding_type="Q4_0",
                        output_tensor_type="Q4_0", calib=str(C4), nsamples=8, seqlen=64, progress=False)
    with pytest.raises(OptionError, match="below the smallest"):
        qgguf.convert(src, tmp_path / "x.gguf", target_size=std.file_bytes - 20_000, compat="llama.cpp",
                      sensitivity=dict(sens, types=["Q8_0", "Q4_0"]), **CAL)
    target = std.file_bytes - 20_000
    rep = qgguf.convert(src, tmp_path / "mix.gguf", target_size=target, save_recipe=tmp_path / "r.json",
                        sensitivity=sens, **CAL)
    size = (tmp_path / "mix.gguf").stat().st_size
    r = json.loads((tmp_path / "r.json").read_text())
    assert size <= target and size == rep.file_bytes
    assert r["sensitivity"]["_calibration"]["planned_file_bytes"] == size   # sizes exact, header included
    assert r["compat"] == "any"
    aq = {n: t for n, t in r["types"].items() if t.startswith("aq-")}
    assert aq, r["types"]          # below the standard-only minimum: only AQ makes it fit
    assert rep.needs_qgguf_runner and rep.codebook_types
    got = _types(tmp_path / "mix.gguf")
    assert {n: got[n] for n in r["types"]} == {n: t.lower() for n, t in r["types"].items()}
    info = inspect_file(tmp_path / "mix.gguf")
    assert info["needs_qgguf_runner"] and info["recipe"]["compat"] == "any"
    assert "needs the qgguf runner" in rep.summary()
    # the AQ candidates were measured, through H, with their exact sizes
    s = r["sensitivity"]["blk.0.ffn_up.weight"]["candidates"]
    # (their bytes count the AQ method's sparse outliers, 0.2 % of the weights by default, which the file has)
    assert r["sensitivity"]["_calibration"]["aq_outliers"] == 0.002
    assert s["aq-1x8-g8"][0] == file_bytes("blk.0.ffn_up.weight", (512, 256), gguf_types.get("aq-1x8-g8"), 0.002)
    assert s["aq-1x8-g8"][0] > file_bytes("blk.0.ffn_up.weight", (512, 256), gguf_types.get("aq-1x8-g8"))
    assert rep.outliers and set(rep.outliers) == set(aq)
    assert s["aq-2x8-g8"][1] < s["aq-1x8-g8"][1]
    # --recipe reproduces the file byte for byte (the recipe's outlier share with it)
    qgguf.convert(src, tmp_path / "again.gguf", recipe_file=tmp_path / "r.json", **CAL)
    assert (tmp_path / "again.gguf").read_bytes() == (tmp_path / "mix.gguf").read_bytes()
    # another budget from the same sensitivities needs the outlier share they were measured with
    with pytest.raises(OptionError, match="outliers=0.002"):
        qgguf.convert(src, tmp_path / "x.gguf", target_size=target - 10_000, sensitivity={"from": str(tmp_path / "r.json")},
                      **{**CAL, "method_options": {**FAST_AQ, "outliers": 0.0}})
    assert not (tmp_path / "x.gguf").exists()
    # without outliers the same tensors are smaller: a plan at the same budget has room for more (or larger) AQ
    rep0 = qgguf.convert(src, tmp_path / "o0.gguf", target_size=target, save_recipe=tmp_path / "r0.json",
                         sensitivity=sens, **{**CAL, "method_options": {**FAST_AQ, "outliers": 0.0}})
    r0 = json.loads((tmp_path / "r0.json").read_text())
    assert r0["sensitivity"]["_calibration"]["aq_outliers"] == 0.0 and not rep0.outliers
    assert (tmp_path / "o0.gguf").stat().st_size == r0["sensitivity"]["_calibration"]["planned_file_bytes"] <= target
    from qgguf.runtime.evaluate import evaluate
    res = evaluate(tmp_path / "mix.gguf", WIKI, ctx=64, chunks=2, base=src, progress=False)
    assert np.isfinite(res["kld"]) and res["kld"] >= 0


def test_recipe_with_several_aq_configs_in_a_block(tmp_path):
    """A hand-written recipe: three AQ configurations and standard types in the same blocks of stories260K;
    the conversion honours each one (fine-tuning the block's codebooks together) and the runner loads it."""
    from qgguf.convert.sources import open_source
    src = open_source(STORIES)
    shapes = {t.name: tuple(t.shape) for t in src.tensors}
    src.close()
    types = {}
    for il in range(5):
        types.update({f"blk.{il}.attn_q.weight": "aq-2x8-g8", f"blk.{il}.attn_k.weight": "aq-1x8-g8",
                      f"blk.{il}.attn_v.weight": "aq-1x8-g16", f"blk.{il}.attn_output.weight": "Q4_0",
                      f"blk.{il}.ffn_gate.weight": "aq-2x8-g16", f"blk.{il}.ffn_up.weight": "Q8_0",
                      f"blk.{il}.ffn_down.weight": "F16"})
    types.update({"token_embd.weight": "Q4_0", "output.weight": "Q8_0"})
    assert set(types) <= set(shapes)
    (tmp_path / "r.json").write_text(json.dumps({"types": types, "mode": "target-size", "compat": "any"}))
    rep = qgguf.convert(STORIES, tmp_path / "m.gguf", recipe_file=tmp_path / "r.json", **CAL)
    assert _types(tmp_path / "m.gguf") == {**{n: t.lower() for n, t in types.items()},
                                             **{n: "f32" for n in shapes if n not in types}}
    assert set(rep.codebook_types) == {"aq-2x8-g8", "aq-1x8-g8", "aq-1x8-g16", "aq-2x8-g16"}
    assert rep.needs_qgguf_runner
    from qgguf.runtime.evaluate import evaluate
    res = evaluate(tmp_path / "m.gguf", WIKI, ctx=64, chunks=2, base=STORIES, progress=False)
    assert np.isfinite(res["kld"]) and 0 <= res["kld"] < 1.0
    # a codebook type on a tensor that is neither a block linear nor the embedding/output matrix, or without
    # --method aq: one-line errors
    bad = dict(types, **{"output_norm.weight": "aq-2x8-g8"})
    (tmp_path / "bad.json").write_text(json.dumps({"types": bad}))
    with pytest.raises(qgguf.errors.QggufError, match="only block linears"):
        qgguf.convert(STORIES, tmp_path / "x.gguf", recipe_file=tmp_path / "bad.json", **CAL)
    with pytest.raises(OptionError, match="--method aq"):
        qgguf.convert(STORIES, tmp_path / "x.gguf", recipe_file=tmp_path / "r.json", method="imatrix",
                      calib=str(C4), nsamples=8, seqlen=64, progress=False)
    with pytest.raises(OptionError, match="takes --method aq alone"):
        qgguf.convert(STORIES, tmp_path / "x.gguf", recipe_file=tmp_path / "r.json", aq_config="aq-2x8-g8", **CAL)
    assert not (tmp_path / "x.gguf").exists()


def test_aq_only_candidates_still_get_a_measured_propagation_factor(tmp_path):
    """``--mix-types`` with AQ configurations only (e.g. AQ on ffn_down alone, everything else pinned): the
    single-tensor KL divergence is still measured, with a standard reference type that is not a candidate, so the
    predictions are not all zero (before, every prediction was 0 and the allocator took the smallest type)."""
    src = _mid_model(tmp_path)
    pin = [r"^(token_embd|output|blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up)))\.weight$=Q8_0"]
    sens = dict(SENS, types=["aq-1x8-g8", "aq-2x8-g8", "aq-3x8-g8"], alpha_stride=1, aq_search="full")
    q8 = qgguf.convert(src, tmp_path / "q8.gguf", type="Q8_0", pure=True, progress=False)
    target = q8.file_bytes - 60_000
    qgguf.convert(src, tmp_path / "mix.gguf", target_size=target, tensor_types=pin, type="Q8_0", pure=True,
                  save_recipe=tmp_path / "r.json", sensitivity=sens, **CAL)
    r = json.loads((tmp_path / "r.json").read_text())
    free = {n: v for n, v in r["sensitivity"].items() if not n.startswith("_")}
    assert sorted(free) == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    for n, v in free.items():
        assert v["ref"] and not v["ref"].startswith("aq-") and v["ref"] not in v["candidates"], v
        assert v["alpha"] > 0 and v["ref_kld"] > 0 and v["ref_error"] > 0
        kld = {q: c[2] for q, c in v["candidates"].items()}
        assert kld["aq-1x8-g8"] > kld["aq-2x8-g8"] > kld["aq-3x8-g8"] > 0
    assert r["predicted_kld"] > 0
    assert all(t.startswith("aq-") for n, t in r["types"].items() if n in free)
    assert all(t == "Q8_0" for n, t in r["types"].items() if n not in free)
    assert (tmp_path / "mix.gguf").stat().st_size <= target


def test_mix_types_takes_any_valid_aq_configuration(tmp_path):
    """``--mix-types`` may name an AQ configuration beyond the offered ones (``aq-6x8-g16``: 3 bits in groups of 16,
    session 22): it is measured and offered like them (exact bytes); an invalid one is refused by name, before any
    work."""
    src = _mid_model(tmp_path)
    pin = [r"^(token_embd|output|blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up)))\.weight$=Q8_0"]
    with pytest.raises(OptionError, match="aq-9x8-g8"):
        qgguf.convert(src, tmp_path / "x.gguf", target_size=10**6, tensor_types=pin, type="Q8_0", pure=True,
                      sensitivity=dict(SENS, types=["aq-2x8-g8", "aq-9x8-g8"]), **CAL)
    assert not (tmp_path / "x.gguf").exists()
    sens = dict(SENS, types=["aq-2x8-g8", "aq-6x8-g16"], alpha_stride=1, aq_search="full")
    q8 = qgguf.convert(src, tmp_path / "q8.gguf", type="Q8_0", pure=True, progress=False)
    qgguf.convert(src, tmp_path / "mix.gguf", target_size=q8.file_bytes - 40_000, tensor_types=pin, type="Q8_0",
                  pure=True, save_recipe=tmp_path / "r.json", sensitivity=sens, **CAL)
    r = json.loads((tmp_path / "r.json").read_text())
    free = {n: v for n, v in r["sensitivity"].items() if not n.startswith("_")}
    assert sorted(free) == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    for n, v in free.items():
        c = v["candidates"]
        assert sorted(c) == ["aq-2x8-g8", "aq-6x8-g16"], c
        assert c["aq-6x8-g16"][0] == file_bytes(n, (256, 512), gguf_types.get("aq-6x8-g16"), 0.002)
        assert c["aq-6x8-g16"][1] < c["aq-2x8-g8"][1]   # 3 bits per weight fit better than 2
    written = _types(tmp_path / "mix.gguf")
    assert {n: written[n] for n in free} == {n: r["types"][n] for n in free}
    assert "aq-6x8-g16" in set(written.values())   # at this budget the 3-bit configuration is chosen (and written)
    from qgguf.runtime.evaluate import evaluate
    res = evaluate(tmp_path / "mix.gguf", WIKI, ctx=64, chunks=2, base=src, progress=False)
    assert np.isfinite(res["kld"]) and 0 <= res["kld"] < 0.5


def test_bits_plan_tensor_spends_the_bits_budget_per_tensor(tmp_path):
    """``--bits B --bits-plan tensor``: the allocator gets the file that ``--bits B`` makes with its block linears at
    exactly B bits per weight (every byte counted) and fills it per tensor from measured KL divergences; the
    file stays within it and spends it (up to the granularity of the types); the one-configuration-per-role file
    stays under B."""
    from qgguf.convert.mixed import bits_budget
    from qgguf.convert.sources import open_source
    from qgguf.quantize.aq import plan_aq
    src = _mid_model(tmp_path)
    role = qgguf.convert(src, tmp_path / "role.gguf", bits=3, bits_plan="role", **CAL)
    s = open_source(src)
    try:
        aqp = plan_aq([(t.name, t.shape) for t in s.tensors], bits=3, outliers=0.002)
        budget = bits_budget(s, tmp_path / "role.gguf", aqp, 3, pure=False, has_imatrix=True, outliers=0.002)
        n_lin = sum(int(np.prod(t.shape)) for t in s.tensors if t.name in set(aqp.tensors))
    finally:
        s.close()
    # the --bits file with its AQ tensors' bytes (outliers included) replaced by 3 bits per weight
    role_lin = sum(t.nbytes for t in role.tensors if t.name in set(aqp.tensors))
    assert role_lin < 3 * n_lin / 8
    assert abs(budget - (role.file_bytes - role_lin + 3 * n_lin / 8)) < 32 * (len(aqp.tensors) * 5 + 2)
    # the default plan (auto) for the whole model is the per-tensor one
    rep = qgguf.convert(src, tmp_path / "tensor.gguf", bits=3, save_recipe=tmp_path / "r.json",
                        sensitivity=SENS, **CAL)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["mode"] == "target-size" and r["target"]["file_bytes"] == budget
    # (it spends the budget: on this small model within the granularity of its types; it is not always larger
    # than the role file, which stays under B bits per weight by a few hundred bytes here)
    assert 0.99 * budget < rep.file_bytes <= budget and role.file_bytes <= budget
    assert any(t.startswith("aq-") for t in r["types"].values())
    got = _types(tmp_path / "tensor.gguf")
    assert {n: got[n] for n in r["types"]} == {n: t.lower() for n, t in r["types"].items()}
    for bad in (dict(aq_config="aq-2x8-g8"), dict(tensor_methods=["ffn_down=aq"]), dict(target_size=10**6)):
        with pytest.raises(OptionError, match="bits-plan"):
            qgguf.convert(src, tmp_path / "x.gguf", bits=3, bits_plan="tensor", **bad, **CAL)
    with pytest.raises(OptionError, match="bits-plan"):
        qgguf.convert(src, tmp_path / "x.gguf", bits=3, bits_plan="layer", **CAL)
    assert not (tmp_path / "x.gguf").exists()


def test_bits_plan_resume_reuses_the_measurement(tmp_path, monkeypatch):
    """A ``--bits`` per-tensor conversion interrupted after its measurement keeps it beside the block checkpoints
    (``OUT.qgguf-resume/sensitivity.json``); ``--resume`` plans from it without measuring again, to the same types."""
    import qgguf.quantize.blockwise as blockwise
    import qgguf.quantize.sensitivity as sensitivity
    src = _mid_model(tmp_path)
    out = tmp_path / "t.gguf"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    kept = tmp_path / "t.gguf.qgguf-resume" / "sensitivity.json"
    kept.parent.mkdir()
    kept.write_text("{}")   # an earlier run's: a run without --resume does not leave it for a later --resume
    with monkeypatch.context() as mp:
        mp.setattr(sensitivity, "measure", interrupted)
        with pytest.raises(KeyboardInterrupt):
            qgguf.convert(src, out, bits=3, sensitivity=SENS, **CAL)
    assert not kept.exists()
    with monkeypatch.context() as mp:
        mp.setattr(blockwise, "run_blocks", interrupted)
        with pytest.raises(KeyboardInterrupt):
            qgguf.convert(src, out, bits=3, save_recipe=tmp_path / "first.json", sensitivity=SENS, **CAL)
    assert kept.is_file() and not out.exists()

    def no_measurement(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(sensitivity, "measure", no_measurement)
    qgguf.convert(src, out, bits=3, resume=True, save_recipe=tmp_path / "again.json", sensitivity=SENS, **CAL)
    first, again = (json.loads((tmp_path / f).read_text()) for f in ("first.json", "again.json"))
    assert again["types"] == first["types"]
    got = _types(out)
    assert {n: got[n] for n in first["types"]} == {n: t.lower() for n, t in first["types"].items()}
    assert not kept.parent.exists()   # removed with the checkpoints once the file is written
