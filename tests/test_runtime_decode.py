"""The lean decoder's fused native calls (q/k/v and gate/up as one qg_matvec_multi each) and its multi-threaded
dense output matrix give bit-identical logits to one call per weight on one thread; its native attention
(qg_decode_attn) writes the same KV cache and agrees to float rounding; all match the model's forward."""
from __future__ import annotations

import pytest
import torch

from _shared import synthetic_tool

from qgguf import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native module not built")

TYPES = ("aq-2x8-g8", "aq-1x16-g8", "vq-v8-k256")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("decode")
    syn = synthetic_tool()
    out = {}
    for t in TYPES:
        out[t] = d / f"tiny-{t}.gguf"
        syn.write_synthetic(out[t], "tiny", t, seed=5)
    return out


def _run(m, dec, toks):
    m.reset()
    return torch.stack([dec.step(t, i).clone() for i, t in enumerate(toks)])


@pytest.mark.parametrize("t", TYPES)
def test_fused_and_threaded_decoder_bit_identical(files, t):
    from qgguf.runtime.bench import LeanDecoder
    from qgguf.runtime.linear import load_llama
    torch.set_num_threads(1)
    m = load_llama(files[t], threads=1)
    toks = [1, 17, 300, 42, 5, 77, 410, 3, 9]
    base = LeanDecoder(m, threads=1, fuse=False, dense_threads=1, native_attention=False)
    assert not base.layers[0]["qkv"].fused
    ref = _run(m, base, toks)
    for threads in (1, 2, 3):
        dec = LeanDecoder(m, threads=threads, fuse=True, native_attention=False)
        L = m.layers[0]
        for key, lins in (("qkv", (L.wq, L.wk, L.wv)), ("gateup", (L.w_gate, L.w_up))):
            # fused exactly when every weight of the group is native (tiny's ffn of 172 rows is F16 under VQ)
            assert dec.layers[0][key].fused == all(getattr(w, "native", None) is not None for w in lins)
        assert dec.layers[0]["qkv"].fused
        assert torch.equal(_run(m, dec, toks), ref), threads
    n = len(toks)
    kv = (m.cache.k[0][:, :n].clone(), m.cache.v[0][:, :n].clone())
    # native rope + cache store + attention: the same cache bits, logits equal to float rounding
    nat = LeanDecoder(m, threads=2, native_attention=True)
    assert nat._attn is not None
    got = _run(m, nat, toks)
    assert torch.equal(m.cache.k[0][:, :n], kv[0]) and torch.equal(m.cache.v[0][:, :n], kv[1])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # and the model's own forward (the same kernels, one token at a time)
    m.reset()
    fwd = torch.stack([m.forward([tok], i)[0] for i, tok in enumerate(toks)])
    torch.testing.assert_close(ref, fwd, rtol=1e-4, atol=1e-4)


def test_bench_profile(files, capsys):
    import json

    from qgguf.cli import main
    assert main(["bench", str(files["aq-2x8-g8"]), "-p", "0", "-n", "4", "-t", "2", "-r", "1", "--profile",
                 "--json"]) == 0
    p = json.loads(capsys.readouterr().out)["decode_profile_ms"]
    for k in ("qkv", "o", "gateup", "down", "output", "weights", "other", "total"):
        assert p[k] >= 0, k
    assert abs(p["weights"] - sum(p[k] for k in ("qkv", "o", "gateup", "down", "output"))) < 1e-9
    assert abs(p["total"] - p["weights"] - p["other"]) < 1e-9
    assert main(["bench", str(files["aq-2x8-g8"]), "-p", "0", "-n", "2", "-r", "1", "--profile"]) == 0
    assert "decode ms/token" in capsys.readouterr().out


@pytest.mark.parametrize("t", ["aq-2x8-g8", "stories260K"])
def test_generate_decodes_through_the_lean_decoder(files, t, monkeypatch):
    """generate_ids runs the prompt through forward and every later token through the lean decoder (the path
    `qgguf bench` times): the same tokens and logits as decoding with forward one token at a time."""
    from _shared import ROOT
    from qgguf.runtime import generate as G
    from qgguf.runtime.bench import LeanDecoder
    from qgguf.runtime.linear import load_llama
    torch.set_num_threads(1)
    path = files[t] if t in files else ROOT.parent / "shared" / "models" / "stories260K.gguf"
    if not path.exists():
        pytest.skip(f"{path} missing")
    m = load_llama(path, threads=1)
    made = []
    real = LeanDecoder.__init__

    def spy(self, *a, **k):
        made.append(self)
        real(self, *a, **k)
    monkeypatch.setattr(LeanDecoder, "__init__", spy)

    def run():
        seen = []

        def greedy(logits):
            seen.append(logits.copy())
            return int(logits.argmax())
        m.reset()
        ids = list(G.generate_ids(m, [1, 17, 42], 12, greedy, set()))
        return ids, seen
    m.reset()
    assert len(list(G.generate_ids(m, [1, 17, 42], 1, lambda lg: int(lg.argmax()), set()))) == 1
    assert not made   # one token needs only the prompt's forward: no decoder is built
    ids, seen = run()
    assert len(made) == 1 and len(ids) == 12
    monkeypatch.setattr(G, "_single_token_step", lambda model: lambda tid, pos: model.forward([tid], pos)[-1])
    ids_ref, seen_ref = run()
    assert len(made) == 1 and ids == ids_ref
    # Rounding through 12 steps: other sum orders (matvec, attention), and the fp16 KV cache's numerics (the
    # query and the attention probabilities rounded to half), where a sum order that flips one half rounding
    # moves stories260K's logits (|logit| up to ~20) by up to a few 1e-3: 3.7e-3 measured on an Intel Xeon
    # (Ice Lake-SP), under 2e-3 on an AMD EPYC (Zen 4). A wrong attention or cache moves them by ~1.
    for a, b in zip(seen, seen_ref):
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), rtol=1e-3, atol=1e-2)
