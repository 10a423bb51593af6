"""The CUDA kernels of the codebook types (qgguf.native.cuda) against the numpy reference of the format.

Without CuPy or a CUDA GPU (this project's CI), the GPU tests skip with the reason, and what runs is the part that
needs no GPU: the launch plans cover every row and input, the unavailable path raises one clear error, and the
runner's hook falls back to the CPU kind with one warning.

On a GPU: every AQ family (1x8, 2x8, 4x8, 8x8, 1x16, 2x16; g 4/8/16/32; fp16 scales) and VQ feature (residual,
outliers, groups, permutation; v 2/4/8/16; up to 2^16 centroids), built from packed companions, on shapes whose
rows are not a multiple of any block size:
* dequantization to float32 equals the numpy reference bit for bit, to float16 equals its rounding;
* the fused matvec (both AQ methods) is within 2e-5 relative (L2) of a float64 matvec with the reference weight,
  and every element within 1e-4 of sum |W||x| (float32 summation error), into outputs poisoned with NaN;
* matmul: the batched fused kernels (2 to 11 tokens) to the same bound; fp16 dequantization + cuBLAS (20 tokens)
  within 3e-3;
* a tiny synthetic llama model with AQ and VQ weights on the GPU gives the CPU's logits (1e-4 one token at a time,
  3e-3 for a 13-token batch through fp16).
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from _shared import synthetic_tool

from qgguf.errors import QggufError
from qgguf.gguf_types.codebook import parse_aq
from qgguf.gguf_types.vq import parse_vq
from qgguf.native import cuda

GPU = cuda.available()
gpu = pytest.mark.skipif(not GPU, reason=f"CUDA kernels unavailable: {cuda.unavailable_reason()}")

FP32_REL = 2e-5          # fused matvec (float32 arithmetic) vs the float64 matvec, relative L2
FP32_ELEM = 1e-4         # per element, relative to sum_c |W[r, c] x[c]|
FP16_REL = 3e-3          # fp16 dequantization + cuBLAS fp16 matmul


# ------------------------------------------------------------------------------------------------
# no GPU needed

@pytest.mark.parametrize("R,C,M,G", [(1, 4, 1, 4), (300, 320, 2, 8), (2052, 2048, 2, 8), (4096, 11008, 4, 8),
                                     (512, 2048, 8, 32), (128256, 2048, 1, 16), (7, 64, 3, 4), (256, 65536, 2, 32)])
@pytest.mark.parametrize("sms", [1, 132])
def test_plans_cover_every_row_and_input(R, C, M, G, sms):
    J = C // G
    p = cuda.plan_aq_lut(R, J, M, G, sms)
    nj, nr = p["grid"]
    assert nj * p["jc"] >= J > (nj - 1) * p["jc"] and nr * p["rpb"] >= R > (nr - 1) * p["rpb"]
    assert p["rpb"] % 128 == 0 and p["shmem"] <= 48 * 1024 and p["jc"] * M <= 32
    for nt in (1, 2, 4, 8):
        d = cuda.plan_aq_direct(R, J, G, sms, nt=nt)
        nj, nr = d["grid"]
        assert nj * d["jc"] >= J > (nj - 1) * d["jc"] and nr * 256 >= R > (nr - 1) * 256 and nr <= 65535
        assert d["shmem"] == 4 * nt * d["jc"] * G <= 48 * 1024
    for v in (2, 8, 16):
        if R % v:
            continue
        nb = R // v
        q = cuda.plan_vq(nb, C, sms)
        npc, nbk = q["grid"]
        assert npc * q["pc"] >= C > (npc - 1) * q["pc"] and nbk * q["bpb"] >= nb > (nbk - 1) * q["bpb"]
        assert q["shmem"] <= 48 * 1024 and nbk <= 65535


@pytest.mark.parametrize("name", ["vq-v8-k4096-256", "vq-v8-k256-256-o1-g4", "vq-v2-k16-4-o5-g3",
                                  "vq-v4-k64-o50-g2", "vq-v16-k65536", "vq-v8-k1024-16-o3-g64"])
@pytest.mark.parametrize("C", [333, 2048, 11008])
def test_vq_plan_stages_the_codebooks_of_every_chunk(name, C):
    qt = parse_vq(name)
    if not qt.fits_shape((qt.v, C)):
        pytest.skip("shape does not fit")
    L = qt.layout((qt.v * 8, C))
    p = cuda.plan_vq(512, C, 132, v=qt.v, k=qt.k, kr=qt.kr, n_out=L["n_out"], gs=L["gs"])
    # brute force: the books (outlier book = 0, then groups) and residual books each chunk touches
    grp = qt.group_of(C)
    book = np.where(grp < 0, 0, grp + (L["n_out"] > 0))
    nbk = nrb = 0
    for lo in range(0, C, p["pc"]):
        b = book[lo:lo + p["pc"]]
        nbk = max(nbk, b.max() - b.min() + 1)
        r = grp[lo:lo + p["pc"]]
        r = r[r >= 0]
        if qt.kr and r.size:
            nrb = max(nrb, r.max() - r.min() + 1)
    need = 2 * qt.v * (nbk * qt.k + nrb * qt.kr)
    assert p["stage"] == (4 * (2 * p["pc"] + 8) + need <= cuda.STAGE_MAX_BYTES)
    assert p["shmem"] == 4 * (2 * p["pc"] + 8) + (need if p["stage"] else 0)


def test_upload_of_read_only_arrays_warns_not(recwarn):
    a = np.arange(12, dtype=np.float16)
    a.flags.writeable = False                  # as the companions of a memory-mapped file
    t = cuda._to_dev(a, "cpu")
    assert t.dtype == torch.float16 and t.tolist() == list(range(12))
    assert not [w for w in recwarn if "not writable" in str(w.message)]


@pytest.mark.skipif(GPU, reason="checks the behaviour without a GPU")
def test_without_gpu_one_clear_error():
    assert isinstance(cuda.unavailable_reason(), str) and cuda.unavailable_reason()
    qt = parse_aq("aq-2x8-g8")
    f = qt.random_fields((16, 64), np.random.default_rng(0))
    with pytest.raises(cuda.CudaUnavailableError, match="CUDA kernels cannot run") as e:
        cuda.CudaAQTensor.from_fields(qt, f)
    assert isinstance(e.value, QggufError) and "\n" not in str(e.value)


@pytest.mark.skipif(GPU, reason="checks the behaviour without a GPU")
def test_runner_hook_falls_back_to_cpu(capsys):
    from qgguf.native.cuda import linear as cl
    from qgguf.runtime import linear as L
    qt = parse_aq("aq-2x8-g8")
    comp = qt.pack(qt.random_fields((16, 64), np.random.default_rng(0)))
    cl._warned.clear()
    assert cl.cuda_codebook_linear("w", qt, (16, 64), comp) is None
    assert cl.cuda_codebook_linear("w", qt, (16, 64), comp) is None
    err = capsys.readouterr().err
    assert err.count("codebook weights stay on the CPU") == 1
    with pytest.raises(QggufError):
        L.set_codebook_device("gpu")


# ------------------------------------------------------------------------------------------------
# GPU

def _check_matvec(y, W, x, rel=FP32_REL, elem=FP32_ELEM):
    y = y.detach().cpu().numpy().astype(np.float64)
    W64 = W.astype(np.float64)
    ref = W64 @ x
    assert np.isfinite(y).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert err < rel, f"relative error {err:.3g} >= {rel}"
    bound = np.abs(W64) @ np.abs(x)
    worst = np.max(np.abs(y - ref) / bound)
    assert worst < elem, f"worst element error {worst:.3g} of sum |W||x| >= {elem}"


def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


def _check_dequant(t, W):
    R, C = W.shape
    d32 = t.dequantize(torch.float32, out=_nan(R, C))
    np.testing.assert_array_equal(d32.cpu().numpy(), W)
    d16 = t.dequantize(torch.float16, out=_nan(R, C, dtype=torch.float16))
    np.testing.assert_array_equal(d16.cpu().numpy(), W.astype(np.float16))


def _check_matvecs(t, W, rng, methods=(None,)):
    R, C = W.shape
    for m in methods:
        x = rng.standard_normal(C)
        kw = {} if m is None else {"method": m}
        _check_matvec(t.matvec(torch.from_numpy(x), out=_nan(R), **kw), W, x)
        # the input's dtype and device do not matter: fp16 on the GPU
        x16 = torch.from_numpy(x).to("cuda", torch.float16)
        _check_matvec(t.matvec(x16, **kw), W, x16.double().cpu().numpy())


def _check_matmul(t, W, rng):
    C = W.shape[1]
    for N in (2, 3, 5, 8, 11):        # the batched fused kernels (11: one launch of 8 or two of 4, then the rest)
        X = rng.standard_normal((N, C))
        Y = t.matmul(torch.from_numpy(X), fused_max=16)
        for n in range(N):
            _check_matvec(Y[n], W, X[n])
    X = rng.standard_normal((20, C)).astype(np.float16).astype(np.float64)
    Y = t.matmul(torch.from_numpy(X)).cpu().numpy()
    ref = X @ W.astype(np.float64).T
    assert np.isfinite(Y).all() and np.linalg.norm(Y - ref) / np.linalg.norm(ref) < FP16_REL


def _check_tensor(t, W, rng, monkeypatch, methods=(None,)):
    _check_dequant(t, W)
    _check_matvecs(t, W, rng, methods)
    _check_matmul(t, W, rng)
    # the other ways of adding the chunks (the last block instead of reduce_parts) and, for VQ, of reading the
    # codebooks (from shared memory instead of L1/L2) and of loading the indices (2 or 4 per lane at once); for AQ
    # the codes loaded after the barrier
    for fin, stage, unroll, pre in ((64, 100 * 1024, 2, 0), (64, 0, 4, 1)):
        monkeypatch.setattr(cuda, "AQ_PREFETCH", pre)
        monkeypatch.setattr(cuda, "FIN_MAX_CHUNKS", fin)
        monkeypatch.setattr(cuda, "STAGE_MAX_BYTES", stage)
        monkeypatch.setattr(cuda, "VQ_UNROLL", unroll)
        t._cfg.clear()
        _check_matvecs(t, W, rng, methods)
    monkeypatch.undo()
    t._cfg.clear()


AQ_CASES = ["aq-1x8-g8", "aq-2x8-g8", "aq-4x8-g8", "aq-8x8-g8", "aq-1x16-g8", "aq-2x16-g16", "aq-2x8-g16",
            "aq-1x8-g16", "aq-3x8-g4", "aq-1x8-g32-s16", "aq-2x16-g4"]


@gpu
@pytest.mark.parametrize("name", AQ_CASES)
@pytest.mark.parametrize("R,J", [(301, 23), (1028, 70), (40, 3)])
def test_aq_against_reference(name, R, J, monkeypatch):
    qt = parse_aq(name)
    rng = np.random.default_rng(zlib.crc32(f"{name} {R}".encode()))
    shape = (R, J * qt.g)
    f = qt.random_fields(shape, rng)
    W = qt.dequantize_fields(f)
    t = cuda.from_companions(qt, shape, qt.pack(f))
    assert isinstance(t, cuda.CudaAQTensor) and t.nbytes >= f["codes"].nbytes
    _check_tensor(t, W, rng, monkeypatch, methods=("lut", "direct", "auto") if qt.B == 8 else (None,))


@gpu
@pytest.mark.parametrize("name", ["aq-2x8-g8", "aq-1x16-g8"])
def test_aq_llama_shape_many_chunks(name, monkeypatch):
    qt = parse_aq(name)
    rng = np.random.default_rng(7)
    shape = (2052, 2048)
    f = qt.random_fields(shape, rng)
    W = qt.dequantize_fields(f)
    t = cuda.CudaAQTensor.from_fields(qt, f)
    _check_tensor(t, W, rng, monkeypatch, methods=("lut", "direct", "auto") if qt.B == 8 else (None,))


VQ_CASES = ["vq-v8-k256", "vq-v8-k4096-256", "vq-v4-k256-16-o2", "vq-v8-k256-256-o1-g4", "vq-v2-k16-4-o5-g3",
            "vq-v16-k65536", "vq-v4-k64-o50-g2", "vq-v16-k1024-65536-g2"]


@gpu
@pytest.mark.parametrize("name", VQ_CASES)
@pytest.mark.parametrize("nb,C", [(37, 333), (130, 2100), (50, 200)])
def test_vq_against_reference(name, nb, C, monkeypatch):
    qt = parse_vq(name)
    rng = np.random.default_rng(zlib.crc32(f"{name} {C}".encode()))
    shape = (nb * qt.v, C)
    f = qt.random_fields(shape, rng)
    W = qt.dequantize_fields(f)
    comp = qt.pack(f)
    np.testing.assert_array_equal(qt.dequantize(comp, shape), W)     # the packed streams hold the same indices
    t = cuda.from_companions(qt, shape, comp)
    assert isinstance(t, cuda.CudaVQTensor)
    _check_tensor(t, W, rng, monkeypatch)


@gpu
def test_bad_arguments_are_one_line_errors():
    qt = parse_vq("vq-v8-k256")
    f = qt.random_fields((64, 40), np.random.default_rng(1))
    comp = dict(qt.pack(f))
    bad = comp[".vq_perm"].copy()
    bad[0] = bad[1]
    with pytest.raises(QggufError, match="permutation"):
        cuda.from_companions(qt, (64, 40), {**comp, ".vq_perm": bad})
    with pytest.raises(QggufError, match="bytes"):
        cuda.from_companions(qt, (64, 40), {**comp, ".vq_idx": comp[".vq_idx"][:-1]})
    t = cuda.from_companions(qt, (64, 40), comp)
    with pytest.raises(QggufError, match="columns"):
        t.matvec(torch.zeros(41))
    with pytest.raises(QggufError, match="out must be"):
        t.matvec(torch.zeros(40), out=torch.empty(64))


@gpu
@pytest.mark.parametrize("typ", ["aq-2x8-g8", "aq-1x16-g8", "vq-v8-k256-16"])
def test_model_logits_with_cuda_codebook_weights(tmp_path, monkeypatch, typ):
    from qgguf.runtime import linear as L
    from qgguf.runtime.model import LlamaModel
    # plain float32 activations and KV cache: llama.cpp's fp16 / Q8 roundings would turn 1e-7 differences into
    # whole rounding steps on a random model
    monkeypatch.setenv("QGGUF_KV_F32", "1")
    monkeypatch.setenv("QGGUF_EXACT_ACTIVATIONS", "1")
    p = tmp_path / f"tiny-{typ}.gguf"
    synthetic_tool().write_synthetic(p, "tiny", typ, seed=5)
    toks = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
    old = L.CODEBOOK_DEVICE
    try:
        L.set_codebook_device("cpu")
        cpu = LlamaModel.from_gguf(p)
        ref = cpu.logits(toks)
        L.set_codebook_device("cuda")
        gm = LlamaModel.from_gguf(p)
    finally:
        L.set_codebook_device(old)
    kinds = {type(m).__name__ for m in gm.modules()}
    assert "CudaCodebookLinear" in kinds
    # 13 tokens at once: fp16 dequantization + cuBLAS
    got = gm.logits(toks)
    assert torch.isfinite(got).all()
    err = (got - ref).norm() / ref.norm()
    assert err < FP16_REL, f"logits differ by {err:.3g} (relative)"
    # one token at a time: the fused float32 matvec
    gm.reset()
    steps = torch.cat([gm.forward([t], i) for i, t in enumerate(toks)])
    err = (steps - ref).norm() / ref.norm()
    assert err < 1e-4, f"logits differ by {err:.3g} (relative)"
