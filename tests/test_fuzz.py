"""Issue 7: the fuzz harness (tools/fuzz.py), briefly: the saved corpus replays clean, a few seconds of mutation
fuzzing per target find nothing, and hypothesis drives the header, codebook-metadata and safetensors checks.
``make fuzz`` runs the long version (100,000 inputs per target)."""
from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from _shared import ROOT, one_torch_thread  # noqa: F401 - fixture

sys.path.insert(0, str(ROOT / "tools"))
import fuzz  # noqa: E402

from gguf import GGUFValueType as V  # noqa: E402

from qgguf.errors import InputFileError, QggufError  # noqa: E402

np.seterr(all="ignore")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/_shared.py


def test_corpus_replays_clean():
    files = fuzz.corpus_files()
    assert any("seeds" in str(f) for f in files) and any("found" in str(f) for f in files)
    for f in files:
        for target, (outcome, exc) in fuzz.replay(f).items():
            assert outcome in ("ok", "rejected"), f"{f.name} [{target}]: {outcome} {fuzz._where(exc)}"
            if outcome == "rejected":
                assert exc.path == str(f), (f.name, target, str(exc))    # errors name the file


def test_seeds_are_valid_inputs():
    """The seeds must get past the checks (else the fuzzer mutates files that are rejected anyway)."""
    for f in fuzz.corpus_files():
        if "seeds" in str(f) and "vq" not in f.name:
            outcome, exc = fuzz.replay(f)["gguf"]
            assert outcome == "ok", (f.name, exc)


def test_every_codebook_type_decodes_its_generated_seed():
    """The types target seeds every codebook type of the registry (AQ, VQ, ... as they register)."""
    types = fuzz.codebook_types()
    assert any(qt.family == "aq" for qt in types)
    rng = np.random.default_rng(0)
    for qt in types:
        kvs, ts = fuzz.codebook_tensors_for(qt, "w", fuzz.codebook_shape_for(qt), rng)
        fuzz.run_types(fuzz.Doc(kvs=kvs, tensors=ts))


@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_fuzz_brief(target):
    rep = fuzz.fuzz(target, n=100_000, seed=20261122, budget=3.0)
    print(rep.line())
    assert rep.inputs > 50
    assert rep.rejected > 0 and rep.accepted > 0
    assert not rep.findings, "\n".join(f"iteration {f.iteration}: {f.kind} {f.where}\n{f.trace}" for f in rep.findings)


def test_hang_is_detected():
    import time
    out, exc, dt = fuzz._guarded(lambda: time.sleep(5), 0.2)
    assert out == "hang" and dt < 2


# ------------------------------------------------------------------------------------------------
# hypothesis: structured inputs

_vtypes = st.sampled_from([int(t) for t in V] + [13, 99, 1 << 31])


@st.composite
def gguf_headers(draw):
    d = fuzz.tiny_llama_doc(np.random.default_rng(0)) if draw(st.booleans()) else fuzz.Doc()
    n = len(d.kvs)
    i = draw(st.integers(0, n)) if n else 0
    key = draw(st.one_of(st.text(max_size=12), st.sampled_from(["general.alignment", "general.architecture",
                                                                "llama.block_count", "qgguf.tensor.x.config"])))
    vt = draw(st.sampled_from([int(V.UINT32), int(V.STRING), int(V.INT64), int(V.FLOAT32), int(V.BOOL)]))
    val = {int(V.UINT32): draw(st.integers(0, (1 << 32) - 1)), int(V.STRING): draw(st.text(max_size=8)),
           int(V.INT64): draw(st.integers(-(1 << 63), (1 << 63) - 1)), int(V.FLOAT32): draw(st.floats(width=32)),
           int(V.BOOL): draw(st.booleans())}[vt]
    d.kvs.insert(i, fuzz.KV(key, vt, val))
    data = bytearray(fuzz.gguf_bytes(d))
    fields = fuzz.header_fields(bytes(data))
    for _ in range(draw(st.integers(0, 3))):
        if fields:
            p, sz = draw(st.sampled_from(fields))
            data[p:p + sz] = draw(st.integers(0, (1 << (8 * sz)) - 1)).to_bytes(sz, "little")
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return bytes(data[:cut] if cut is not None else data)


@SETTINGS
@given(gguf_headers())
def test_hypothesis_gguf_reader(tmp_path_factory, data):
    from qgguf.convert.ggufread import GGUFFile
    p = tmp_path_factory.mktemp("h") / "x.gguf"
    p.write_bytes(data)
    try:
        with GGUFFile(p) as g:
            for t in g.tensors:
                assert g.raw(t).size == t.nbytes and t.offset + t.nbytes <= g.size
    except InputFileError as e:
        assert str(p) in str(e)


_shapes = st.one_of(st.lists(st.integers(-2, 1 << 33), max_size=3), st.text(max_size=3), st.integers(),
                    st.just([32, 32]), st.just([32, 16]), st.just([16, 32]))


@SETTINGS
@given(config=st.one_of(st.sampled_from(["aq-2x8-g8", "aq-1x16-g8", "aq-9x8-g8", "aq-2x8-g3", "q4_0", "", "vq"]),
                        st.text(max_size=12), st.integers()),
       shape=_shapes, family=st.one_of(st.none(), st.sampled_from(["aq", "vq", ""])),
       companions=st.one_of(st.none(), st.lists(st.sampled_from([".aq_codes", ".aq_codebooks", ".aq_scales"]),
                                                 max_size=4), st.integers()),
       drop=st.one_of(st.none(), st.sampled_from([".aq_codes", ".aq_codebooks", ".aq_scales"])),
       retype=st.one_of(st.none(), st.sampled_from([0, 1, 24, 25, 26, 2])))
def test_hypothesis_codebook_layout(config, shape, family, companions, drop, retype):
    from qgguf import gguf_types
    from qgguf.gguf_types.codebook import check_codebook_layout
    qt = gguf_types.get("aq-2x8-g8")
    md = {k: mv.value for k, mv in qt.metadata("w", (32, 32)).items()}
    md["qgguf.tensor.w.config"] = config
    md["qgguf.tensor.w.shape"] = shape
    if family is not None:
        md["qgguf.tensor.w.type"] = family
    if companions is not None:
        md["qgguf.tensor.w.companions"] = companions
    tensors = {"w" + c.suffix: (c.ggml_type, c.gguf_shape) for c in qt.companion_specs((32, 32))}
    if drop:
        tensors.pop("w" + drop)
    if retype is not None:
        tensors["w.aq_scales"] = (retype, (32,))
    try:
        out = check_codebook_layout(md, tensors, "f.gguf")
    except InputFileError as e:
        assert e.path == "f.gguf"
        return
    (qt2, shape2), = out.values()
    assert qt2.name == "aq-2x8-g8" and shape2 == (32, 32)


_json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2, 1 << 41), st.text(max_size=6),
                                      st.floats(allow_nan=False)),
                            lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c,
                                                                                        max_size=3)), max_leaves=8)


@SETTINGS
@given(entry=st.fixed_dictionaries({}, optional={"dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I8",
                                                                                    "Q4"]), _json_values),
                                                 "shape": st.one_of(st.lists(st.integers(-1, 40), max_size=3),
                                                                    _json_values),
                                                 "data_offsets": st.one_of(st.lists(st.integers(-1, 200), min_size=2,
                                                                                    max_size=2), _json_values)}),
       extra=st.dictionaries(st.text(max_size=4), _json_values, max_size=2), pad=st.integers(0, 200),
       header_len=st.one_of(st.none(), st.integers(0, (1 << 64) - 1)))
def test_hypothesis_safetensors_header(tmp_path_factory, entry, extra, pad, header_len):
    from qgguf.convert.sources import _SafetensorsIndex
    h = json.dumps(dict(extra, w=entry)).encode()
    p = tmp_path_factory.mktemp("st") / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(h) if header_len is None else header_len) + h + bytes(pad))
    try:
        idx = _SafetensorsIndex([p])
    except InputFileError as e:
        assert e.path == str(p)
        return
    for name, (_f, dt, shape, off, nb) in idx.entries.items():
        assert off + nb <= p.stat().st_size
        if dt in idx._DT:
            try:
                a = idx.load(name)
            except QggufError:
                continue
            assert a.shape == shape
