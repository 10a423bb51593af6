"""qgguf bench: JSON keys, and the lean decode path equal to LlamaModel.forward."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


from _shared import synthetic_tool as _synthetic  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    syn = _synthetic()
    out = {}
    for t in ("aq-2x8-g8", "aq-1x16-g8", "Q8_0"):
        out[t] = d / f"tiny-{t}.gguf"
        syn.write_synthetic(out[t], "tiny", t, seed=2)
    return out


def test_bench_json_keys(files, capsys):
    from qgguf.cli import main
    rc = main(["bench", str(files["aq-2x8-g8"]), "-p", "8", "-n", "4", "-t", "1", "-r", "1", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    for k in ("pp_tps", "tg_tps", "threads", "n_prompt", "n_gen", "model_bytes", "model_params", "rss_model_bytes"):
        assert k in r, k
    assert r["pp_tps"] > 0 and r["tg_tps"] > 0 and r["threads"] == 1 and r["n_prompt"] == 8 and r["n_gen"] == 4
    assert r["model_bytes"] == files["aq-2x8-g8"].stat().st_size
    assert r["kinds"]["aq-2x8-g8"] == 30


def test_bench_text_and_options(files, capsys):
    from qgguf.cli import main
    assert main(["bench", str(files["Q8_0"]), "-p", "4", "-n", "0", "-r", "1"]) == 0
    assert "pp4" in capsys.readouterr().out
    assert main(["bench", str(files["Q8_0"]), "-p", "0", "-n", "0"]) == 2
    assert main(["bench", str(files["Q8_0"]) + ".missing"]) == 2


@pytest.mark.parametrize("t", ["aq-2x8-g8", "aq-1x16-g8", "Q8_0"])
def test_lean_decoder_equals_forward(files, t):
    from qgguf.runtime.bench import LeanDecoder
    from qgguf.runtime.linear import load_llama
    torch.set_num_threads(1)
    m = load_llama(files[t], threads=1)
    toks = [1, 17, 300, 42, 5, 77, 410, 3]
    m.reset()
    m.forward(toks[:3], 0)
    ref = {i: m.forward([toks[i]], i)[0] for i in range(3, len(toks))}    # the same kernels (matvec)
    full = m.logits(toks)
    m.reset()
    m.forward(toks[:3], 0)               # a prompt through forward, then lean steps continue from its cache
    dec = LeanDecoder(m, threads=1)
    for i in range(3, len(toks)):
        out = dec.step(toks[i], i).clone()
        torch.testing.assert_close(out, ref[i], rtol=1e-4, atol=1e-4)
        # the prompt path sums in another order (and llama.cpp-style activation rounding may flip): loose
        assert float((out - full[i]).abs().max()) < 0.05 * float(full[i].abs().max())
    with pytest.raises(ValueError):
        dec.step(1, 2)
