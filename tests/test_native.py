"""qgguf.native.decode_attention (qg_decode_attn: one decoding token's rope, KV-cache store and attention) against a
float64 numpy reference, bit-exact rope/cache against the runner's torch arithmetic, and its argument checks."""
from __future__ import annotations

import numpy as np
import pytest

from qgguf import native
from qgguf.errors import QggufError

pytestmark = pytest.mark.skipif(not native.available(), reason="native module not built")


def f16(a):
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def rope_f32(x, c, s):
    """The runner's rope (model.rope_apply / LeanDecoder): adjacent pairs, products then one add, float32."""
    x = x.reshape(-1, x.shape[-1] // 2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    return np.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).reshape(x.shape[0], -1).astype(np.float32)


def reference(q, K, V, n, scale, round16):
    """float64 attention of roped q (H, dk) over K/V[:, :n] (the caches already hold the rounded values)."""
    H, Hkv = q.shape[0], K.shape[0]
    G = H // Hkv
    q64 = (f16(q) if round16 else q).astype(np.float64)
    out = np.empty((H, V.shape[2]))
    for h in range(H):
        s = K[h // G, :n].astype(np.float64) @ q64[h] * scale
        p = np.exp(s - s.max())
        p /= p.sum()
        if round16:
            p = f16(p).astype(np.float64)
        out[h] = p @ V[h // G, :n].astype(np.float64)
    return out.reshape(-1)


@pytest.mark.parametrize("H,Hkv,dk,dv", [(8, 4, 8, 8), (32, 8, 64, 64), (6, 6, 10, 12)])
@pytest.mark.parametrize("round16", [True, False])
def test_decode_attention_against_reference(H, Hkv, dk, dv, round16):
    rng = np.random.default_rng(H + dk + round16)
    cap, steps = 40, 37
    K = np.zeros((Hkv, cap, dk), np.float32)
    V = np.zeros((Hkv, cap, dv), np.float32)
    theta = rng.random((cap, dk // 2)).astype(np.float32) * 3
    cos, sin = np.cos(theta), np.sin(theta)
    scale = 1.0 / np.sqrt(dk)
    for pos in range(steps):
        qk = (rng.standard_normal((H + Hkv) * dk) * 2).astype(np.float32)
        v = rng.standard_normal(Hkv * dv).astype(np.float32)
        roped = rope_f32(qk.reshape(H + Hkv, dk), cos[pos], sin[pos])
        a = native.decode_attention(qk, v, cos[pos].copy(), sin[pos].copy(), K, V, pos, H, scale, round16,
                                    threads=1 + pos % 3)
        # rope in place and the cache store: bit-identical to the runner's float32 arithmetic
        np.testing.assert_array_equal(qk.reshape(H + Hkv, dk), roped)
        kk = roped[H:]
        np.testing.assert_array_equal(K[:, pos], f16(kk) if round16 else kk)
        np.testing.assert_array_equal(V[:, pos], f16(v.reshape(Hkv, dv)) if round16 else v.reshape(Hkv, dv))
        ref = reference(roped[:H], K, V, pos + 1, scale, round16)
        # float32 sums (and, with fp16 probabilities, a rounding of p that may flip): rounding-level agreement
        tol = 2e-3 if round16 else 1e-5
        assert np.abs(a - ref).max() <= tol * max(1.0, np.abs(ref).max()), (pos, np.abs(a - ref).max())


def test_decode_attention_many_positions_threads_agree():
    """Long caches take the threaded path; any thread count gives the same values (heads are independent)."""
    rng = np.random.default_rng(0)
    H, Hkv, dk, cap = 16, 4, 64, 600
    base_K = rng.standard_normal((Hkv, cap, dk)).astype(np.float32)
    base_V = rng.standard_normal((Hkv, cap, dk)).astype(np.float32)
    qk0 = rng.standard_normal((H + Hkv) * dk).astype(np.float32)
    v = rng.standard_normal(Hkv * dk).astype(np.float32)
    c, s = np.ones(dk // 2, np.float32), np.zeros(dk // 2, np.float32)
    outs = []
    for threads in (1, 2, 4):
        K, V, qk = base_K.copy(), base_V.copy(), qk0.copy()
        outs.append(native.decode_attention(qk, v, c, s, K, V, cap - 1, H, 0.125, True, threads=threads))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    ref = reference(qk0.reshape(H + Hkv, dk)[:H], K, V, cap, 0.125, True)
    assert np.abs(outs[0] - ref).max() < 2e-3


def test_decode_attention_argument_checks():
    H, Hkv, dk, dv, cap = 4, 2, 8, 8, 16
    qk = np.zeros((H + Hkv) * dk, np.float32)
    v = np.zeros(Hkv * dv, np.float32)
    c = np.zeros(dk // 2, np.float32)
    K = np.zeros((Hkv, cap, dk), np.float32)
    V = np.zeros((Hkv, cap, dv), np.float32)

    def call(**kw):
        args = dict(qk=qk, v=v, cos=c, sin=c, K=K, V=V, pos=0, n_head=H, scale=1.0)
        args.update(kw)
        return native.decode_attention(**args)
    assert call().shape == (H * dv,)
    bad = [
        (dict(pos=cap), "pos"),
        (dict(pos=-1), "pos"),
        (dict(n_head=3), "multiple"),
        (dict(qk=qk[:-1].copy()), "qk must have shape"),
        (dict(v=np.zeros(Hkv * dv + 1, np.float32)), "shape"),
        (dict(cos=np.zeros(dk, np.float32)), "cos and sin"),
        (dict(K=K.astype(np.float64)), "float32"),
        (dict(K=np.zeros((Hkv, cap, dk + 2), np.float32)[:, :, :dk]), "C-contiguous"),
        (dict(V=np.zeros((Hkv + 1, cap, dv), np.float32)), "same n_kv"),
        (dict(K=np.zeros((Hkv, cap, 7), np.float32), qk=np.zeros((H + Hkv) * 7, np.float32)), "even"),
        (dict(qk=list(qk)), "numpy array"),
    ]
    for kw, msg in bad:
        with pytest.raises(QggufError, match=msg):
            call(**kw)
    ro = K.copy()
    ro.flags.writeable = False
    with pytest.raises(QggufError, match="writable"):
        call(K=ro)
    with pytest.raises(QggufError, match="overlap"):
        call(out=v[: H * dv] if H * dv <= v.size else qk[: H * dv])


def test_c_entry_rejects_bad_layout():
    from qgguf.native import _ffi, _lib
    buf = np.zeros(4096, np.float32)
    p = _ffi.cast("float *", _ffi.from_buffer(buf))
    assert _lib.qg_decode_attn(p, p, p, p, p, p, p, 3, 2, 8, 8, 0, 4, 1.0, 1, 1) == -1       # 3 heads, 2 kv
    assert _lib.qg_decode_attn(p, p, p, p, p, p, p, 4, 2, 7, 8, 0, 4, 1.0, 1, 1) == -1       # odd head size
    assert _lib.qg_decode_attn(p, p, p, p, p, p, p, 4, 2, 8, 8, 4, 4, 1.0, 1, 1) == -1       # pos == cap
    assert _lib.qg_decode_attn(_ffi.NULL, p, p, p, p, p, p, 4, 2, 8, 8, 0, 4, 1.0, 1, 1) == -1
    assert b"position" in _ffi.string(_lib.qg_last_error()) or b"null" in _ffi.string(_lib.qg_last_error())
