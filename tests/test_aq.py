"""--method aq: residual k-means, beam search against H (vs brute force), Adam on codebooks/scales, the file
fields, the configuration choice (--bits, every byte counted), and stories260K end to end (loads in the runner,
beats RTN, 172-wide rows fall back, deterministic, resumable)."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from qgguf import gguf_types
from qgguf.errors import OptionError
from qgguf.quantize import aq_core as C
from qgguf.quantize.aq import AQ, choose_config, config_bpw, head_types, plan_aq

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K.gguf"
C4 = SHARED / "data" / "c4-sample-1000.jsonl"
WIKI = SHARED / "data" / "wikitext-2-raw-test.txt"
needs_data = pytest.mark.skipif(not (STORIES.is_file() and C4.is_file()), reason="shared test data not available")

torch.set_num_threads(1)


def _problem(R=48, C_=32, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(R, C_, generator=g) * 0.05
    X = torch.randn(n, C_, generator=g) * (0.2 + 2 * torch.rand(C_, generator=g))
    X = X @ (torch.eye(C_) + 0.3 * torch.randn(C_, C_, generator=g))
    return W, C.prepare_gram((X.T @ X).double())


def _loss(W, H, codes, books, scales):
    return C.row_losses(W - C.dequantize(codes, books, scales), H)


# ------------------------------------------------------------------------------------------------ algorithm


def test_residual_kmeans_monotone_in_M():
    W, _ = _problem(R=64, C_=64)
    cfg = C.AQConfig(4, 8, 8)
    codes, books, scales = C.residual_kmeans_init(W, cfg, torch.Generator().manual_seed(1), iters=10,
                                                  max_points=None)
    Wn = W / scales[:, None]
    errs = [float(Wn.pow(2).sum())]
    for m in range(1, cfg.M + 1):
        rec = C.dequantize(codes[:, :, :m], books[:m], torch.ones(W.shape[0]))
        errs.append(float((Wn - rec).pow(2).sum()))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.5 * errs[1]


def test_kmeans_deterministic_and_handles_few_points():
    x = torch.randn(10, 4)
    c1, a1 = C.kmeans(x, 16, 5, torch.Generator().manual_seed(3))
    c2, a2 = C.kmeans(x, 16, 5, torch.Generator().manual_seed(3))
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    assert torch.allclose(c1[a1], x, atol=1e-2)     # fewer points than centroids: every point is a centroid


@pytest.mark.parametrize("beam", [1, 2, 4])
def test_beam_search_never_increases_error(beam):
    W, H = _problem(R=96, C_=64)
    cfg = C.AQConfig(2, 8, 8)
    gen = torch.Generator().manual_seed(2)
    codes, books, scales = C.residual_kmeans_init(W, cfg, gen)
    start = torch.randint(0, cfg.K, codes.shape, generator=gen)      # a poor start, and the k-means one
    for c0 in (start, codes):
        before = _loss(W, H, c0, books, scales)
        new = C.beam_search(W, H, books, scales, c0, beam=beam, gen=gen)
        after = _loss(W, H, new, books, scales)
        assert bool((after <= before).all())
    assert float(_loss(W, H, C.beam_search(W, H, books, scales, start, beam=beam), books, scales).sum()) \
        < 0.7 * float(_loss(W, H, start, books, scales).sum())


def _brute(W, H, books, scales, J, M):
    K = books.shape[1]
    best = []
    for r in range(W.shape[0]):
        combos = torch.tensor(list(itertools.product(range(K), repeat=J * M))).reshape(-1, J, M)
        rec = C.dequantize(combos, books, scales[r].expand(combos.shape[0]))
        d = (W[r][None, :] - rec).double()
        best.append(float(((d @ H.double()) * d).sum(1).min()))
    return torch.tensor(best, dtype=torch.float64)


@pytest.mark.parametrize("J", [1, 2])
def test_beam_search_matches_brute_force(J):
    """M=2 codebooks of 2^3 entries over groups of 2: a beam that holds every combination (8^(J*M)), or for
    one group a beam of K (all pairs are scored at the second code), finds the exact optimum of every row."""
    g, M, B = 2, 2, 3
    cfg = C.AQConfig(M, B, g)
    W, H = _problem(R=12, C_=J * g, n=50, seed=J)
    gen = torch.Generator().manual_seed(5)
    books = torch.randn(M, cfg.K, g, generator=gen) * 0.05       # not fitted: no exact representation
    scales = 0.5 + torch.rand(W.shape[0], generator=gen)
    start = torch.randint(0, cfg.K, (W.shape[0], J, M), generator=gen)
    ref = _brute(W, H, books, scales, J, M)
    beam = cfg.K if J == 1 else cfg.K ** (J * M)
    got = _loss(W, H, C.beam_search(W, H, books, scales, start, beam=beam), books, scales)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-9), (got, ref)


def test_adam_step_decreases_objective():
    W, H = _problem(R=128, C_=64)
    cfg = C.AQConfig(1, 8, 8)
    codes, books, scales = C.residual_kmeans_init(W, cfg, torch.Generator().manual_seed(0))
    e0 = C.relative_error(W, C.dequantize(codes, books, scales), H)
    b1, s1, e1 = C.adam_refine(W, H, codes, books, scales, steps=1, lr=1e-3, round_f16=False)
    assert e1 < e0
    assert abs(e1 - C.relative_error(W, C.dequantize(codes, b1, s1), H)) < 1e-9
    b2, s2, e2 = C.adam_refine(W, H, codes, books, scales, steps=30, lr=5e-3)
    assert e2 < e1 and torch.equal(b2, b2.half().float())            # stored precision: float16 codebooks


def test_quantize_matrix_improves_on_init_and_is_deterministic():
    W, H = _problem(R=64, C_=64)
    cfg = C.AQConfig(2, 8, 8)
    opts = C.AQOptions(beam=2, max_rounds=2, adam_steps=10, kmeans_iters=5)
    r1 = C.quantize_matrix(W, H, cfg, opts, seed=7)
    r2 = C.quantize_matrix(W, H, cfg, opts, seed=7)
    assert r1.rel_err < r1.history[0][1]
    assert torch.equal(r1.codes, r2.codes) and torch.equal(r1.codebooks, r2.codebooks)
    assert abs(r1.rel_err - C.relative_error(W, C.dequantize(r1.codes, r1.codebooks, r1.scales), H)) < 1e-9


def test_fields_round_trip_through_the_codebook_type():
    W, H = _problem(R=40, C_=32)
    for name in ("aq-2x8-g8", "aq-1x16-g8", "aq-2x8-g16"):
        cfg = C.parse_config(name)
        res = C.quantize_matrix(W, H, cfg, C.AQOptions(max_rounds=1, adam_steps=2, kmeans_iters=2), seed=1)
        f = C.to_fields(res.codes, res.codebooks, res.scales, cfg)
        assert f["codes"].shape == (32 // cfg.g, cfg.M, 40) and f["codes"].dtype == cfg.code_dtype
        assert f["codebooks"].dtype == np.float16 and f["scales"].dtype == np.float32
        qt = gguf_types.get(name)
        blob = np.asarray(qt.pack(f))
        assert blob.size == qt.nbytes((40, 32)) == cfg.nbytes(40, 32)
        wq = qt.dequantize(blob, (40, 32))
        assert np.array_equal(wq, C.dequantize(res.codes, res.codebooks, res.scales).numpy())


# ------------------------------------------------------------------------------------------------ configuration

SMOL = [(f"blk.{i}.{k}.weight", s) for i in range(30) for k, s in
        (("attn_q", (576, 576)), ("attn_k", (192, 576)), ("attn_v", (192, 576)), ("attn_output", (576, 576)),
         ("ffn_gate", (1536, 576)), ("ffn_up", (1536, 576)), ("ffn_down", (576, 1536)))] + \
    [("token_embd.weight", (49152, 576)), ("output_norm.weight", (576,))]


def test_bits_choice_counts_every_byte():
    shapes = [s for n, s in SMOL if n.startswith("blk.")]
    # a 1x16 codebook (2^16 x 8 float16 = 1 MiB per matrix) costs more than its codes on a 135M model
    assert config_bpw(C.parse_config("aq-1x16-g8"), shapes) > 4
    c2, c3 = choose_config(shapes, 2.0), choose_config(shapes, 3.0)
    assert config_bpw(c2, shapes) <= 2.0 and config_bpw(c3, shapes) <= 3.0
    assert (c2.name, c3.name) == ("aq-3x8-g16", "aq-2x8-g8")
    with pytest.raises(OptionError):
        choose_config(shapes, 0.5)


def test_plan_aq_tensor_methods_and_heads():
    p = plan_aq(SMOL, type="Q8_0", bits=2, tensor_methods=["ffn_down=aq"])
    assert all(".ffn_down." in n for n in p.tensors) and len(p.tensors) == 30
    assert p.bpw <= 2.0
    assert p.output_tensor_type == "Q8_0"           # tied embeddings, rows of 576: Q6_K does not fit
    p = plan_aq(SMOL, aq_config="aq-2x8-g8")
    assert len(p.tensors) == 210 and p.config.name == "aq-2x8-g8"
    assert p.output_tensor_type == "Q8_0"           # no bit budget: the head keeps 8 bits
    with pytest.raises(OptionError):
        plan_aq(SMOL, tensor_methods=["nothing_matches=aq"])


def test_bits_upgrades_roles_within_the_budget():
    # one configuration for all matrices would leave --bits 3 at 2.18 bits (every 3-codebook configuration costs
    # more than 3 bits on the 576 x 576 matrices); per-role upgrades use the budget and never exceed it
    for bits in (1.5, 2, 2.5, 3, 4):
        p = plan_aq(SMOL, bits=bits)
        assert bits - 0.25 < p.bpw <= bits + 1e-9
        types = dict((n.replace("\\", ""), t) for n, t in p.tensor_types)
        assert len(types) == 210
        roles = {}
        for n, t in types.items():
            roles.setdefault(n.split(".")[2], set()).add(t)
        assert all(len(ts) == 1 for ts in roles.values())      # a role has one configuration in every block
    types = dict((n.replace("\\", ""), t) for n, t in plan_aq(SMOL, bits=3).tensor_types)
    assert types["blk.0.ffn_down.weight"] == "AQ-3X8-G8" and types["blk.0.attn_q.weight"] == "AQ-2X8-G8"
    # an explicit configuration is not upgraded
    p = plan_aq(SMOL, aq_config="aq-2x8-g8", bits=3)
    assert {t for _n, t in p.tensor_types} == {"AQ-2X8-G8"}


def test_head_types_follow_the_bit_budget():
    # the whole model under --bits: the head gets the smallest type of at least bits + 2.5 bits per weight
    assert plan_aq(SMOL, bits=2).output_tensor_type == "IQ4_NL"
    assert plan_aq(SMOL, bits=3).output_tensor_type == "Q5_0"
    assert plan_aq(SMOL, bits=4).output_tensor_type == "Q8_0"    # no 6-bit type for rows of 32-blocks
    wide = {"token_embd.weight": (1000, 2048), "output.weight": (1000, 2048)}
    assert head_types(wide, None, None, 2) == ("Q4_K", "Q4_K")
    assert head_types(wide, None, None, 3) == ("Q5_K", "Q5_K")
    assert head_types(wide, None, None, 4) == ("Q6_K", "Q6_K")
    assert head_types(wide, None, None) == ("Q6_K", "Q6_K")
    assert head_types(wide, "Q8_0", None, 2) == ("Q8_0", "Q4_K")   # given types win
    # AQ on some tensors only (--tensor-method): the rest of the file, heads included, is --type's business
    assert plan_aq(SMOL, type="Q8_0", bits=2, tensor_methods=["ffn_down=aq"]).output_tensor_type == "Q8_0"


def test_method_options():
    m = AQ(beam="2", finetune="no", ft_target="fp", e2e="no", other="rtn")
    assert m.aq.beam == 2 and not m.ft.finetune and m.other == "rtn" and not m.needs_fp_inputs
    assert AQ(finetune="no").needs_fp_inputs    # the end-to-end stage's teacher: the float model's activations
    with pytest.raises(OptionError):
        AQ(bogus=1)
    with pytest.raises(OptionError, match="e2e_batch"):
        AQ(e2e_batch=0)
    assert "e2e=1 epochs lr=0.001" in AQ().describe() and "nsamples=256" in AQ().describe() and "e2e" not in AQ(e2e="no").describe()
    assert AQ(e2e_lr="5e-4").ft.e2e_lr == 5e-4


# ------------------------------------------------------------------------------------------------ end to end

FAST = dict(beam=1, max_rounds=2, adam_steps=10, kmeans_iters=8, ft_epochs=2)


def _convert(out, **kw):
    from qgguf.convert.pipeline import convert
    opts = dict(FAST)
    opts.update(kw.pop("opts", {}))
    kw.setdefault("aq_config", "aq-2x8-g8")
    return convert(STORIES, out, method=kw.pop("method", "aq"), calib=C4, nsamples=kw.pop("nsamples", 16),
                   seqlen=kw.pop("seqlen", 128), seed=kw.pop("seed", 0), progress=False, method_options=opts, **kw)


def _kld(path, chunks=6):
    from qgguf.runtime.evaluate import evaluate_loaded, load_tokenizer
    from qgguf.runtime.linear import load_llama
    from qgguf.runtime.model import LlamaModel
    r = evaluate_loaded(load_llama(path, threads=1), load_tokenizer(path), WIKI, ctx=128, chunks=chunks,
                        base_model=LlamaModel.from_gguf(STORIES, threads=1), progress=False)
    return r["kld"]


@needs_data
def test_stories_end_to_end(tmp_path):
    from qgguf.convert.pipeline import convert
    out = tmp_path / "aq.gguf"
    rep = _convert(out, aq_config="aq-3x8-g8")
    types = {t.name: t.type for t in rep.tensors}
    assert types["blk.0.attn_q.weight"].lower() == "aq-3x8-g8"
    assert types["blk.0.ffn_gate.weight"].lower() == "aq-3x8-g8"
    # rows of 172 do not divide into groups of 8: a standard type (Q8_0 does not fit either: F16)
    assert types["blk.0.ffn_down.weight"] == "F16"
    assert types["token_embd.weight"] == "Q8_0"
    # the report says the file needs the qgguf runner, and why
    assert rep.needs_qgguf_runner and rep.codebook_types == ["aq-3x8-g8"]
    assert "codebook tensors" in rep.summary() and "needs the qgguf runner" in rep.summary()
    # the fine-tuned norms were written (they differ from the source's)
    from qgguf.convert.ggufread import GGUFFile
    with GGUFFile(out) as f, GGUFFile(STORIES) as s:
        changed = [n for n in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight")
                   if not np.array_equal(np.asarray(f.raw(n)), np.asarray(s.raw(n)))]
    assert changed
    # loads in the runner, and is more accurate than RTN with more bits: Q4_0 (4.5 bits per weight) against
    # 3 bits of codes per weight. (On stories260K's 64-wide matrices the codebooks - 3 x 256 x 8 float16 per
    # matrix - outweigh the codes, so the file is larger; on SmolLM2 they cost ~0.3 bits per weight.)
    rtn = tmp_path / "q4_0.gguf"
    convert(STORIES, rtn, type="Q4_0", pure=True, progress=False)
    k_aq, k_rtn = _kld(out), _kld(rtn)
    assert k_aq < k_rtn, (k_aq, k_rtn)


@needs_data
def test_stories_deterministic_and_tensor_method(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    kw = dict(type="Q8_0", pure=True, tensor_methods=["ffn_gate=aq"], opts=dict(max_rounds=1, ft_epochs=1))
    ra = _convert(a, **kw)
    _convert(b, **kw)
    assert a.read_bytes() == b.read_bytes()
    types = {t.name: t.type for t in ra.tensors}
    assert types["blk.1.ffn_gate.weight"].lower() == "aq-2x8-g8"
    assert types["blk.1.attn_q.weight"] == "Q8_0" and types["blk.1.ffn_up.weight"] == "Q8_0"
    c = tmp_path / "c.gguf"
    _convert(c, seed=1, **kw)
    assert c.read_bytes() != a.read_bytes()


@needs_data
def test_stories_resume_byte_identical(tmp_path):
    from qgguf.quantize import base

    class Boom(Exception):
        pass

    class Stop(AQ):
        def quantize_block(self, block, ctx):
            if block.index == 2:
                raise Boom("killed")
            return super().quantize_block(block, ctx)

    kw = dict(opts=dict(max_rounds=1, ft_epochs=1))
    full = tmp_path / "full.gguf"
    _convert(full, **kw)
    out = tmp_path / "r.gguf"
    base.register("aq", Stop)
    try:
        with pytest.raises(Boom):
            _convert(out, **kw)
    finally:
        base.register("aq", "aq:AQ")
    rep = _convert(out, resume=True, **kw)
    assert rep.resumed_blocks == 2
    assert out.read_bytes() == full.read_bytes()


@needs_data
def test_stories_end_to_end_stage_lowers_the_kld_and_resumes(tmp_path):
    """The end-to-end stage (quantize/finetune.py) lowers the calibration KLD it minimises and the held-out KLD;
    a run killed inside it resumes from the checkpointed blocks and gives the same bytes; a checkpoint that
    records the stage as done is not tuned again."""
    from qgguf.quantize import finetune

    kw = dict(opts=dict(max_rounds=1, ft_epochs=1, e2e_epochs=3, outliers=0.01))
    off = tmp_path / "off.gguf"
    _convert(off, opts=dict(max_rounds=1, ft_epochs=1, e2e="no", outliers=0.01))
    full = tmp_path / "full.gguf"
    rep = _convert(full, **kw)
    e = rep.e2e
    assert e["kld"] < 0.95 * e["start_kld"] and e["best_epoch"] > 0 and len(e["history"]) == 3 * 4
    assert e["held_out"] == 32 and e["train_kld"] > 0      # the default held-out set, checked 4 times per epoch
    assert "end-to-end fine-tuning: held-out KLD (32 sequences)" in rep.summary()
    assert rep.outliers          # the sparse part survives the stage (its values recomputed against it)
    assert _kld(full) < _kld(off)

    out = tmp_path / "r.gguf"
    real = finetune.finetune_model

    def killed(*a, **k):
        raise KeyboardInterrupt("killed in the end-to-end stage")
    finetune.finetune_model = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            _convert(out, **kw)
    finally:
        finetune.finetune_model = real
    assert not out.exists() and out.with_name(out.name + ".qgguf-resume").is_dir()
    rep2 = _convert(out, resume=True, **kw)
    assert rep2.resumed_blocks == 5 and rep2.e2e["kld"] == e["kld"]
    assert out.read_bytes() == full.read_bytes()

    # a checkpoint whose stage is recorded as done: the resumed run takes its blocks as they are
    from qgguf.quantize.blockwise import Checkpoint
    marked = []
    real_stage = Checkpoint.stage
    Checkpoint.stage = lambda self, name: marked.append(name) or {"start_kld": 1.0, "kld": 0.5, "best_epoch": 1,
                                                                     "history": [0.5], "seconds": 0.0, "tokens": 0}
    finetune.finetune_model = killed
    try:
        rep3 = _convert(tmp_path / "m.gguf", **kw)
    finally:
        finetune.finetune_model = real
        Checkpoint.stage = real_stage
    assert marked == ["e2e"] and rep3.e2e["kld"] == 0.5


@needs_data
def test_end_to_end_stage_draws_more_calibration_samples(tmp_path):
    """``-O e2e_nsamples=N`` gives the end-to-end stage N sequences: the block pass's, then more from the same
    text (here twice as many more as the block pass has), whose teacher (the float model's final hidden states) is
    what a block pass over all N would compute."""
    import torch
    from qgguf.quantize import finetune
    seen = []
    real = finetune.finetune_model

    def spy(parts, tun, ids, teacher, ft, **k):
        seen.append((ids.clone(), teacher.clone()))
        return real(parts, tun, ids, teacher, ft, **k)
    finetune.finetune_model = spy
    try:
        rep = _convert(tmp_path / "a.gguf", nsamples=8, opts=dict(max_rounds=1, ft_epochs=1, e2e_epochs=1,
                                                                    e2e_nsamples=24, e2e_val=4))
        _convert(tmp_path / "b.gguf", nsamples=24, opts=dict(max_rounds=1, ft_epochs=1, e2e_epochs=1,
                                                              e2e_nsamples=0, e2e_val=4))
    finally:
        finetune.finetune_model = real
    (ia, ta), (ib, tb) = seen
    assert ia.shape == (28, 128) and torch.equal(ia, ib)      # 24 to train on, then 4 held out
    torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-4)
    assert rep.e2e["tokens"] == 24 * 128
    assert "nsamples=24" in AQ(e2e_nsamples=24).describe()
    with pytest.raises(OptionError, match="e2e_nsamples"):
        AQ(e2e_nsamples=-1)


@needs_data
def test_block_stage_tunes_on_its_first_ft_nsamples_sequences(tmp_path, monkeypatch):
    """``ft_nsamples`` bounds the block stage's sequences (the layer fits' Gram matrices use all of the block
    pass's): with the sequences after the first ``ft_nsamples`` set to NaN the stage's losses stay finite."""
    import math
    from qgguf.quantize import aq as aqmod
    real, seen = aqmod.finetune_block, []

    def spy(block, packed, state, ft, ctx, exact=None):
        saved = block.x_q
        block.x_q = saved.clone()
        block.x_q[ft.ft_nsamples:] = float("nan")
        try:
            res = real(block, packed, state, ft, ctx, exact=exact)
        finally:
            block.x_q = saved
        seen.append((block.nsamples, res.start_loss, res.loss))
        return res
    monkeypatch.setattr(aqmod, "finetune_block", spy)
    _convert(tmp_path / "a.gguf", nsamples=12, opts=dict(max_rounds=1, ft_epochs=1, e2e="no", ft_nsamples=5))
    assert len(seen) == 5 and all(n == 12 and math.isfinite(a) and math.isfinite(b) for n, a, b in seen)
    assert "target=fp nsamples=5" in AQ(ft_nsamples=5).describe()
    with pytest.raises(OptionError, match="ft_nsamples"):
        AQ(ft_nsamples=-1)


def test_nsamples_as_a_method_option(tmp_path):
    """``-O nsamples=N`` / ``-O seqlen=N`` are ``--nsamples`` / ``--seqlen``; a contradiction is an error."""
    from qgguf.convert.pipeline import convert
    with pytest.raises(OptionError, match="contradicts --nsamples 16"):
        convert(STORIES, tmp_path / "a.gguf", method="aq", aq_config="aq-2x8-g8", calib=C4, nsamples=16,
                method_options={"nsamples": "8"}, progress=False)
    for bad in ("long", "0", "-3"):
        with pytest.raises(OptionError, match=f"seqlen='{bad}': expected a positive integer"):
            convert(STORIES, tmp_path / "a.gguf", method="aq", aq_config="aq-2x8-g8", calib=C4,
                    method_options={"seqlen": bad}, progress=False)
    assert not (tmp_path / "a.gguf").exists()


def test_salient_positions_pick_the_costliest_weights():
    from qgguf.quantize.aq import salient_positions
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    H = np.eye(32)
    H[5, 5] = 1e4                          # a "massive activation" input: every weight of column 5 is costly
    w[3, 7] = 50.0                         # a "super weight"
    idx = salient_positions(w, H, 17 / w.size)
    assert list(idx) == sorted(idx) and idx.dtype == np.int64
    assert set(np.unravel_index(idx, w.shape)[1]) >= {5} and 3 * 32 + 7 in idx
    assert (np.unravel_index(idx, w.shape)[1] == 5).sum() == 16
    assert salient_positions(w, H, 0.0).size == 0


def test_sparse_added_linear_keeps_the_compressed_kind():
    from qgguf.runtime.linear import DenseLinear, LinearBase
    from qgguf.runtime.model import SparseAddedLinear, add_sparse

    class Wrapped(LinearBase):           # stands for a compressed kind (AQ, VQ)
        kind = "test"

        def __init__(self, w):
            super().__init__("t", *w.shape)
            self.w = w

        def forward(self, x):
            return x @ self.w.t()

        def dense_weight(self):
            return self.w

    rng = np.random.default_rng(1)
    w = torch.from_numpy(rng.standard_normal((6, 10)).astype(np.float32))
    idx = np.array([0, 13, 59], np.int64)
    vals = np.array([1.5, -2.0, 0.25], np.float16)
    lin = add_sparse(Wrapped(w), idx, vals)
    assert isinstance(lin, SparseAddedLinear)
    ref = w.clone().reshape(-1)
    ref[torch.from_numpy(idx)] += torch.from_numpy(vals.astype(np.float32))
    ref = ref.reshape(6, 10)
    assert torch.allclose(lin.dense_weight(), ref)
    x = torch.from_numpy(rng.standard_normal((2, 3, 10)).astype(np.float32))
    assert torch.allclose(lin(x), x @ ref.t(), atol=1e-5)                   # the decode path (<= 16 tokens)
    x = torch.from_numpy(rng.standard_normal((40, 10)).astype(np.float32))
    assert torch.allclose(lin(x), x @ ref.t(), atol=1e-5)                   # the prompt path (sparse product)
    assert isinstance(add_sparse(DenseLinear("d", w), idx, vals), DenseLinear)    # a dense weight stays dense


@needs_data
def test_stories_outliers_are_exact(tmp_path):
    # AQ with sparse outliers: the salient weights come back exactly (float16) from the file, through the fine-tuning
    from qgguf.runtime.linear import load_llama
    from qgguf.runtime.model import LlamaModel
    out = tmp_path / "aq-out.gguf"
    rep = _convert(out, aq_config="aq-1x8-g8", opts=dict(outliers=0.02))
    assert rep.outliers and all(v > 0 for v in rep.outliers.values())
    m, src = load_llama(out, threads=1), LlamaModel.from_gguf(STORIES, threads=1)
    lin = m.layers[1].wq
    assert "sparse outliers" in lin.extra_repr()
    w_q, w_f = lin.dense_weight(), src.layers[1].wq.dense_weight()
    got, want = w_q[lin.rows, lin.cols], w_f[lin.rows, lin.cols]
    assert torch.allclose(got, want, rtol=2e-3, atol=1e-4)
    plain = tmp_path / "plain.gguf"
    _convert(plain, aq_config="aq-1x8-g8", opts=dict(outliers=0))
    assert _kld(out) < _kld(plain)
    with pytest.raises(OptionError):
        AQ(outliers=0.7)


@needs_data
@pytest.mark.parametrize("trial", ["", "0.5"])
def test_end_to_end_stage_never_trains_on_its_held_out_sequences(tmp_path, monkeypatch, trial):
    """The end-to-end stage's last ``e2e_val`` sequences (drawn after the ones it trains on) are only scored:
    no teacher state of theirs reaches a training step, and the state kept is the one of least KLD on them,
    checked ``e2e_checks`` times per epoch (the start included). With a rate trial (``e2e_lr_try``, AQ's
    default) the other rate's steps over the first check interval are training steps too, on the same batches."""
    from qgguf.quantize import finetune
    real_kl, real_ft = finetune._kl_chunks, finetune.finetune_model
    trained, seen = [], []

    def kl_spy(parts, h, t, *a, **k):
        if h.requires_grad:
            trained.append(t.detach().clone())
        return real_kl(parts, h, t, *a, **k)

    def ft_spy(parts, tun, ids, teacher, ft, **k):
        res = real_ft(parts, tun, ids, teacher, ft, **k)
        seen.append((ids.clone(), teacher.clone(), res))
        return res
    monkeypatch.setattr(finetune, "_kl_chunks", kl_spy)
    monkeypatch.setattr(finetune, "finetune_model", ft_spy)
    rep = _convert(tmp_path / "v.gguf", nsamples=8,
                   opts=dict(max_rounds=1, ft_epochs=1, e2e_epochs=2, e2e_nsamples=10, e2e_val=3, e2e_checks=3,
                             e2e_lr_try=trial))
    (ids, teacher, res), = seen
    assert len(ids) == 13 and rep.e2e["held_out"] == 3 and rep.e2e["tokens"] == 10 * ids.shape[1]
    assert len(res.history) == 2 * 3 and res.loss == min([res.start_loss] + res.history)
    assert res.best_epoch in {0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2}
    rows = torch.cat([t.reshape(-1, t.shape[-1]) for t in trained])
    # (states after a shared prefix are equal, such as the BOS token's: the held-out ones from position 8 on)
    held, kept = teacher[-3:, 8:].reshape(-1, teacher.shape[-1]), teacher[:10].reshape(-1, teacher.shape[-1])
    # every training sequence once per epoch; the trial's other rate: the first of the 3 batches of 4 once more
    assert len(rows) == 2 * kept.shape[0] + (4 * ids.shape[1] if trial else 0)
    if trial:
        assert [r for r, _ in rep.e2e["rate_trials"]] == [1e-3, 5e-4] and rep.e2e["lr"] in (1e-3, 5e-4)
    else:
        assert "rate_trials" not in rep.e2e
    exact = "donot_use_mm_for_euclid_dist"
    assert torch.cdist(held, rows, compute_mode=exact).min() > 0                   # no held-out state among them
    assert torch.cdist(kept, rows, compute_mode=exact).min(1).values.max() == 0    # every training state among them


@needs_data
@pytest.mark.parametrize("head", ["stored", "float", "codes"])
def test_end_to_end_stage_tunes_the_model_as_stored(tmp_path, head):
    """The end-to-end stage's student is the file: the token embedding and output matrix as stored (quantized
    before the stage and written as they are) and the output norm it tuned. So the stage's own calibration KLD is
    the written file's KLD on those sequences; with ``e2e_head=float`` (AQLM's float embedding and head) it is
    not, when they are quantized coarsely. ``codes``: as stored, with a code step after every optimizer step
    (``e2e_codes``): the codes the kept state had are the file's."""
    import torch.nn.functional as F
    from qgguf.quantize import finetune
    from qgguf.runtime.linear import load_llama
    from qgguf.runtime.model import LlamaModel
    seen = []
    real = finetune.finetune_model

    def spy(parts, tun, ids, teacher, ft, **k):
        res = real(parts, tun, ids, teacher, ft, **k)
        seen.append((ids.clone(), res))
        return res
    finetune.finetune_model = spy
    out = tmp_path / "h.gguf"
    try:
        # (mild code steps: bolder ones, 0.05 of the groups at lr 0.05, leave a model whose KLD moves by 1e-3
        # with the float16 rounding of its outliers' stored differences)
        pv = dict(e2e_codes=0.01, e2e_code_every=1, e2e_code_lr=0.02) if head == "codes" else {}
        rep = _convert(out, nsamples=8, token_embedding_type="Q4_0", output_tensor_type="Q4_0",
                       opts=dict(max_rounds=1, ft_epochs=1, e2e_epochs=2, e2e_nsamples=8, e2e_val=4, **pv,
                                 e2e_head="stored" if head == "codes" else head))
    finally:
        finetune.finetune_model = real
    (ids, res), = seen
    assert len(ids) == 12 and rep.e2e["held_out"] == 4
    ids = ids[-4:]            # the stage's checked loss is the held-out sequences' KLD
    assert res.best_epoch > 0 and {t.name: t.type for t in rep.tensors}["output.weight"] == "Q4_0"
    q, f = load_llama(out, threads=1), LlamaModel.from_gguf(STORIES, threads=1)
    kl = 0.0
    for s in ids.tolist():
        lq, lf = F.log_softmax(q.logits(s).double(), -1), F.log_softmax(f.logits(s).double(), -1)
        kl += float((lf.exp() * (lf - lq)).sum())
    kl /= ids.numel()
    stored, source = q.output_norm.detach().float().numpy(), f.output_norm.detach().float().numpy()
    if head == "codes":
        # every kept state after the start has the first step's new codes
        assert len(res.codes_changed) == 2 * 2 and res.codes_changed[0] > 0 and max(res.codes_changed) <= 0.01
        assert rep.e2e["codes_changed"] == res.codes_changed and res.train_loss is not None
    if head in ("stored", "codes"):
        assert kl == pytest.approx(res.loss, rel=2e-3)
        assert not np.array_equal(stored, source)        # the output norm was tuned
    else:
        assert abs(kl - res.loss) > 0.05 * res.loss
    with pytest.raises(OptionError, match="e2e_head"):
        AQ(e2e_head="fp")


def test_grid_state_round_trips_every_standard_type():
    """A standard-type tensor as a tunable state (codes and integer sub-scales frozen, float16 block scales
    tuned): at its stored scales it is the type's own dequantization, and packed again it is the same bytes;
    scaled scales pack to the type's bytes with only the scale fields changed."""
    from qgguf import gguf_types
    from qgguf.quantize import grid
    from qgguf.quantize.finetune import GridState
    w = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    for name in grid.SPECS:
        qt = gguf_types.get(name)
        data = qt.quantize(w)
        st = GridState.from_packed(qt, data, w.shape)
        assert np.array_equal(st.dequantized().numpy(), qt.dequantize(data, w.shape)), name
        assert np.array_equal(np.asarray(st.pack(qt)).reshape(-1), data.reshape(-1)), name
        vals = {k: (v * 1.5).half().float() for k, (v, _mode, _half) in st.tunables().items()}
        moved = st.with_values(vals)
        got = qt.dequantize(np.asarray(moved.pack(qt)), w.shape)
        assert np.allclose(got, moved.dequantized().numpy(), rtol=1e-6, atol=1e-6), name
        assert np.array_equal(qt.unpack(np.asarray(moved.pack(qt)))["q"], qt.unpack(data)["q"]), name
    assert GridState.from_packed(gguf_types.get("F16"), np.zeros(8, np.uint8), (1, 4)) is None


@needs_data
def test_end_to_end_stage_tunes_standard_scales_and_the_head(tmp_path, monkeypatch):
    """``std_scales=yes`` and ``e2e_head=tuned``: the linears left in a standard type and the stored token
    embedding / output matrix have their float16 block scales tuned in the end-to-end stage, and the file holds
    what the stage tuned: its KLD on the calibration sequences is the stage's own loss. The standard tensors keep
    their type and codes."""
    import torch.nn.functional as F
    from qgguf import gguf_types
    from qgguf.quantize import finetune
    from qgguf.runtime.linear import load_llama
    from qgguf.runtime.model import LlamaModel
    from qgguf.convert.ggufread import GGUFFile
    seen = []
    real = finetune.finetune_model

    def spy(parts, tun, ids, teacher, ft, **k):
        kinds = {key: type(st).__name__ for key, st in tun.states.items()}
        res = real(parts, tun, ids, teacher, ft, **k)
        seen.append((ids.clone(), res, kinds))
        return res
    finetune.finetune_model = spy
    out, fixed = tmp_path / "t.gguf", tmp_path / "f.gguf"
    kw = dict(nsamples=8, type="Q4_0", tensor_methods=["attn_(q|v)=aq"], token_embedding_type="Q4_0",
              output_tensor_type="Q4_0")
    try:
        rep = _convert(out, opts=dict(max_rounds=1, ft_epochs=1, e2e_epochs=2, e2e_nsamples=8, e2e_head="tuned",
                                      std_scales=True, e2e_val=4), **kw)
        _convert(fixed, opts=dict(max_rounds=1, ft_epochs=1, e2e=False, std_scales=False), **kw)
    finally:
        finetune.finetune_model = real
    (ids, res, kinds), = seen
    types = {t.name: t.type for t in rep.tensors}
    assert types["blk.0.attn_k.weight"] == "Q4_0" and types["output.weight"] == "Q4_0"
    assert kinds[(0, "attn_k")] == "GridState" and kinds[(0, "attn_q")] == "AQState"
    assert kinds[finetune.TOK_EMBD] == "GridState" and kinds[finetune.OUTPUT] == "GridState"
    assert res.best_epoch > 0
    ids = ids[-4:]            # the held-out sequences, whose KLD the stage checks
    # the stage computes in float32 throughout: so does the runner here (not llama.cpp's 8-bit activations and
    # float16 KV cache, whose rounding on this file of many Q4_0 products is 0.3 % of the KLD)
    monkeypatch.setenv("QGGUF_EXACT_ACTIVATIONS", "1")
    monkeypatch.setenv("QGGUF_KV_F32", "1")
    q, f = load_llama(out, threads=1), LlamaModel.from_gguf(STORIES, threads=1)
    kl = 0.0
    for s in ids.tolist():
        lq, lf = F.log_softmax(q.logits(s).double(), -1), F.log_softmax(f.logits(s).double(), -1)
        kl += float((lf.exp() * (lf - lq)).sum())
    assert kl / ids.numel() == pytest.approx(res.loss, rel=2e-4)
    # block 0's attn_k is quantized from the float model's inputs in both runs: the same codes, tuned scales
    qt, n = gguf_types.get("Q4_0"), "blk.0.attn_k.weight"
    with GGUFFile(out) as a, GGUFFile(fixed) as b:
        fa, fb = (qt.unpack(np.asarray(g.raw(n)).reshape(-1, qt.row_bytes(64))) for g in (a, b))
    assert np.array_equal(fa["q"], fb["q"]) and not np.array_equal(fa["d"], fb["d"])
    with pytest.raises(OptionError, match="e2e_head"):
        AQ(e2e_head="scales")


@needs_data
def test_stories_aq_token_embedding_and_output(tmp_path):
    """The token embedding and the output matrix in AQ configurations (``--tensor-type``): fitted against the Gram
    matrix of the final hidden states, no sparse outliers, their codebooks and scales tuned in the end-to-end
    stage (``e2e_head=tuned``) and written as tuned: the file's KLD on the calibration sequences is the stage's
    loss. The runner reads them (embedding rows and the output product from the codes)."""
    import torch.nn.functional as F
    from qgguf.quantize import finetune
    from qgguf.runtime.linear import AQLinear, load_llama
    from qgguf.runtime.model import LlamaModel
    seen = []
    real = finetune.finetune_model

    def spy(parts, tun, ids, teacher, ft, **k):
        res = real(parts, tun, ids, teacher, ft, **k)
        seen.append((ids.clone(), res, {key: type(st).__name__ for key, st in tun.states.items()}))
        return res
    finetune.finetune_model = spy
    out = tmp_path / "head.gguf"
    try:
        rep = _convert(out, nsamples=8, tensor_types=["token_embd.weight=aq-2x8-g8", "output.weight=aq-4x8-g8"],
                       opts=dict(max_rounds=1, ft_epochs=1, e2e_epochs=2, e2e_nsamples=8, e2e_head="tuned",
                                 outliers=0.01, e2e_val=4))
    finally:
        finetune.finetune_model = real
    (ids, res, kinds), = seen
    types = {t.name: t.type.lower() for t in rep.tensors}
    assert types["token_embd.weight"] == "aq-2x8-g8" and types["output.weight"] == "aq-4x8-g8"
    assert kinds[finetune.TOK_EMBD] == "AQState" and kinds[finetune.OUTPUT] == "AQState"
    assert "blk.0.attn_q.weight" in rep.outliers and not {"token_embd.weight", "output.weight"} & set(rep.outliers)
    assert res.best_epoch > 0
    ids = ids[-4:]            # the held-out sequences, whose KLD the stage checks
    q, f = load_llama(out, threads=1), LlamaModel.from_gguf(STORIES, threads=1)
    assert isinstance(q.tok_embd, AQLinear) and isinstance(q.output, AQLinear)
    import os
    old = {k: os.environ.get(k) for k in ("QGGUF_EXACT_ACTIVATIONS", "QGGUF_KV_F32")}
    os.environ.update(QGGUF_EXACT_ACTIVATIONS="1", QGGUF_KV_F32="1")
    from contextlib import nullcontext
    from qgguf import native
    # float32 throughout, as the stage: the native scalar path (the SIMD paths' 16-bit lookup tables round the
    # output matrix's products by ~1e-4 relative, which the logits see directly)
    exact = native.use_isa("scalar") if native.available() else nullcontext()
    try:
        with exact:
            q = load_llama(out, threads=1)
            kl = 0.0
            for s in ids.tolist():
                lq, lf = F.log_softmax(q.logits(s).double(), -1), F.log_softmax(f.logits(s).double(), -1)
                kl += float((lf.exp() * (lf - lq)).sum())
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert kl / ids.numel() == pytest.approx(res.loss, rel=2e-4)


@needs_data
def test_codebook_head_needs_method_aq(tmp_path):
    """An embedding/output matrix in a codebook type without --method aq, or in a VQ type: a one-line error before
    any work, and no output file."""
    import qgguf
    for kw in (dict(method="vq", vq_config="vq-v4-k256", tensor_types=["output.weight=aq-2x8-g8"]),
               dict(method="aq", aq_config="aq-2x8-g8", tensor_types=["output.weight=vq-v4-k256"])):
        with pytest.raises(OptionError, match="output.weight"):
            qgguf.convert(STORIES, tmp_path / "x.gguf", calib=str(C4), nsamples=4, seqlen=64, progress=False, **kw)
        assert not (tmp_path / "x.gguf").exists()


def test_tensor_type_pattern_wins_over_the_head_default():
    """``--tensor-type`` naming the embedding/output matrix gives it that type under --method aq (the head
    default of --bits / --aq-config used to override it silently); --token-embedding-type still wins."""
    shapes = {"token_embd.weight": (512, 64), "output.weight": (512, 64), "blk.0.attn_q.weight": (64, 64)}
    default = head_types(shapes, None, None, 2.0)
    assert default[0] == default[1] == "IQ4_NL"
    assert head_types(shapes, None, None, 2.0, ["token_embd.weight=aq-2x8-g8"]) == (None, "IQ4_NL")
    tte, ote = head_types(shapes, "Q8_0", None, 2.0, ["token_embd.weight=aq-2x8-g8"])
    assert tte == "Q8_0"
    tied = {"token_embd.weight": (512, 64), "blk.0.attn_q.weight": (64, 64)}
    assert head_types(tied, None, None, 2.0, ["token_embd=aq-4x8-g8"]) == (None, None)


@needs_data
def test_recipe_codebook_types_outside_the_blocks(tmp_path):
    from qgguf.convert.budget import Recipe
    from qgguf.convert.mixed import check_recipe
    from qgguf.convert.sources import open_source
    from qgguf.errors import InputFileError
    src = open_source(STORIES)
    try:
        check_recipe(Recipe({"token_embd.weight": "aq-2x8-g8"}), src, "r.json", codebook=True)
        with pytest.raises(InputFileError, match="token_embd.weight"):
            check_recipe(Recipe({"token_embd.weight": "vq-v4-k256"}), src, "r.json", codebook=True)
        with pytest.raises(InputFileError, match="output_norm"):
            check_recipe(Recipe({"output_norm.weight": "aq-2x8-g8"}), src, "r.json", codebook=True)
        # the allocator's row-tiered embedding/output matrix: a saved recipe with it is taken back (it was refused
        # as "a codebook type outside the blocks" until session 18), with any method; not for a block linear
        for codebook in (True, False):
            check_recipe(Recipe({"token_embd.weight": "tiers-Q8_0@64-Q5_0@128-IQ4_NL"}), src, "r.json", codebook)
        with pytest.raises(InputFileError, match="blk.0.attn_q.weight the row-tiered type"):
            check_recipe(Recipe({"blk.0.attn_q.weight": "tiers-Q8_0@16-Q4_0"}), src, "r.json", codebook=True)
    finally:
        src.close()


@pytest.mark.parametrize("sched", ["constant", "cosine"])
def test_stage_learning_rate_schedule(monkeypatch, sched):
    """The stages' Adam steps at ``lr`` throughout (constant) or along a half cosine from ``lr`` to 0 over all
    epochs' steps (``e2e_sched=cosine``); an unknown schedule is refused."""
    import math

    from qgguf.quantize import finetune
    lrs = []

    class Recording(torch.optim.Adam):
        def step(self, *a, **k):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(*a, **k)

    monkeypatch.setattr(torch.optim, "Adam", Recording)
    p = torch.nn.Parameter(torch.tensor([1.0]))

    class Tun:
        params = [p]
        snapshot = staticmethod(lambda: p.detach().clone())
        restore = staticmethod(lambda s: p.data.copy_(s))
        result = staticmethod(lambda: ({}, {}))

    res = finetune._train(Tun(), {}, lambda: float(p.detach() ** 2), lambda idx: (p ** 2).sum(), n=8, bs=2,
                          epochs=2, lr=0.1, tol=0, seed=0, sched=sched)
    want = [0.1 * (0.5 * (1 + math.cos(math.pi * k / 8)) if sched == "cosine" else 1) for k in range(8)]
    assert lrs == pytest.approx(want) and res.loss < res.start_loss
    assert finetune.finetune_options({"e2e_sched": sched}).e2e_sched == sched
    with pytest.raises(OptionError):
        finetune.finetune_options({"e2e_sched": "linear"})


@pytest.mark.parametrize("sched", ["constant", "cosine"])
def test_stage_rate_trial_goes_on_as_the_chosen_rate_alone(sched):
    """The end-to-end stage's rate trial (``e2e_lr_try``): each rate runs from the start over the same batches up
    to the first check; the one that scored least there goes on, and the whole run (checks, state kept) is the
    run of that rate alone. Near the optimum the smaller rate wins, far from it the larger (both cases here)."""
    from qgguf.quantize import finetune
    tgt = torch.linspace(-0.2, 0.2, 16)[:, None] + torch.tensor([0.0, 0.5])

    def run(p0, lr, try_rates=()):
        p = torch.nn.Parameter(torch.tensor(p0))

        class Tun:
            params = [p]
            snapshot = staticmethod(lambda: p.detach().clone())
            restore = staticmethod(lambda s: p.data.copy_(s))
            result = staticmethod(lambda: ({}, {}))
        res = finetune._train(Tun(), {}, lambda: float(((p.detach() - tgt.mean(0)) ** 2).sum()),
                              lambda idx: ((p - tgt[idx]) ** 2).sum(-1).mean(), n=16, bs=2, epochs=1, lr=lr, tol=0,
                              seed=0, checks=4, sched=sched, try_rates=try_rates)
        return res, p.detach().clone()

    chosen = []
    for p0 in ([1.0, 1.5], [0.05, 0.55]):
        res, p = run(p0, 0.2, [0.1, 0.2])
        alone = {lr: run(p0, lr) for lr in (0.2, 0.1)}
        assert [r for r, _ in res.rate_trials] == [0.2, 0.1]          # lr first; a repeated rate is not run twice
        assert [v for _, v in res.rate_trials] == [alone[0.2][0].history[0], alone[0.1][0].history[0]]
        want = min(alone, key=lambda lr: alone[lr][0].history[0])
        assert res.lr == want and res.history == alone[want][0].history and torch.equal(p, alone[want][1])
        assert res.loss == alone[want][0].loss and res.best_epoch == alone[want][0].best_epoch
        chosen.append(want)
    assert chosen == [0.2, 0.1]
    res, _ = run([1.0, 1.5], 0.2)
    assert res.rate_trials is None and res.lr == 0.2
    line = finetune.stage_line({"held_out": 32, "start_kld": 0.15, "kld": 0.14, "best_epoch": 1.0, "seconds": 9.0,
                                "lr": 5e-4, "rate_trials": [[1e-3, 0.146], [5e-4, 0.1424]]})
    assert "rate 0.0005 chosen at its first check (0.001: 0.146, 0.0005: 0.1424)" in line
    # the option: factors of e2e_lr; AQ tries half the rate by default, VQ nothing, code steps turn AQ's default off
    assert finetune.lr_try_factors(finetune.finetune_options({"e2e_lr_try": "0.5, 2,1,0.5"})) == [0.5, 2.0]
    assert finetune.lr_try_factors(finetune.finetune_options({})) == []
    for bad in ("x", "0", "-1", "nan"):
        with pytest.raises(OptionError, match="e2e_lr_try"):
            finetune.finetune_options({"e2e_lr_try": bad})
    with pytest.raises(OptionError, match="e2e_codes"):
        finetune.finetune_options({"e2e_lr_try": "0.5", "e2e_codes": 0.01})
    from qgguf.quantize.vq import VQ
    assert AQ().ft.e2e_lr_try == "0.5" and AQ(e2e_lr_try="").ft.e2e_lr_try == ""
    assert AQ(e2e_codes=0.01).ft.e2e_lr_try == "" and VQ().ft.e2e_lr_try == ""


def test_reencode_l2_moves_towards_its_target_within_its_share():
    """PV-Tuning's code step (``aq_core.reencode_l2``): no group gets farther from the target, at most the given
    share of groups change, and those are the ones that gained most; the others keep their codes exactly."""
    g = torch.Generator().manual_seed(3)
    R, J, M, K, gs = 48, 12, 3, 64, 8
    cb = torch.randn(M, K, gs, generator=g) * torch.tensor([1.0, 0.5, 0.25])[:, None, None]
    s = torch.rand(R, generator=g) + 0.5
    codes = torch.randint(0, K, (R, J, M), generator=g)
    W = C.dequantize(codes, cb, s)
    T = W + 0.3 * torch.randn(R, J * gs, generator=g)

    def dist(c):
        return ((T - C.dequantize(c, cb, s)) ** 2).reshape(R, J, gs).sum(-1)
    full, mask = C.reencode_l2(T, cb, s, codes, 1.0)
    d0, d1 = dist(codes), dist(full)
    assert bool((d1 <= d0 + 1e-5).all()) and float(d1.sum()) < 0.7 * float(d0.sum())
    assert torch.equal(mask, (full != codes).any(-1)) and float(mask.float().mean()) > 0.5
    part, pmask = C.reencode_l2(T, cb, s, codes, 0.1)
    assert int(pmask.sum()) == int(0.1 * R * J)
    assert torch.equal(part[~pmask], codes[~pmask]) and torch.equal(part[pmask], full[pmask])
    gain = d0 - d1
    assert float(gain[pmask].min()) >= float(gain[mask & ~pmask].max())
    same, smask = C.reencode_l2(W, cb, s, codes, 1.0)          # at the target already: nothing moves
    assert not bool(smask.any()) and torch.equal(same, codes)


def test_end_to_end_code_step_follows_the_gradient_and_is_undone_with_its_state():
    """The end-to-end stage's code step (``e2e_codes``): the weight gradient it collects is dL/dW of the loss
    the step trained on; a code step lowers a loss that is linear in W; codes are replaced, never changed in
    place, so a snapshot taken before the step restores the codes too."""
    from qgguf.quantize import finetune
    g = torch.Generator().manual_seed(5)
    cfg = C.parse_config("aq-2x8-g8")
    R, J, M, K = 16, 4, 2, 256
    st = finetune.AQState(cfg, torch.randint(0, K, (R, J, M), generator=g), torch.randn(M, K, 8, generator=g),
                          torch.rand(R, generator=g) + 0.5)
    codes0 = st.codes.clone()
    tun = finetune.Tunables({"a": st})
    assert tun.track_codes() == ["a"]
    A = torch.randn(R, J * 8, generator=g)
    loss = (tun.weight("a", True) * A).sum()
    loss.backward()
    assert torch.allclose(tun.probe["a"].grad, A)
    snap = tun.snapshot()
    tun.accumulate()
    assert tun.probe["a"].grad is None
    with torch.no_grad():
        before = float((tun.weight("a", False) * A).sum())
        changed, total = tun.code_step(lr=0.5, max_fraction=0.25)
        after = float((tun.weight("a", False) * A).sum())
    assert 0 < changed <= total // 4 and after < before
    assert torch.equal(st.codes, codes0) and not torch.equal(tun.states["a"].codes, codes0)
    tun.restore(snap)
    assert torch.equal(tun.states["a"].codes, codes0)
    with pytest.raises(OptionError):
        finetune.finetune_options({"e2e_codes": 1.5})
