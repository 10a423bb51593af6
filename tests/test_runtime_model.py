"""The torch runner's forward pass against transformers' LlamaForCausalLM, KV cache, capture hook, errors."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qgguf.errors import InputFileError, UnsupportedModelError
from qgguf.runtime import linear as linear_mod
from qgguf.runtime.linear import DenseLinear, LinearBase, make_linear, register_linear_kind
from qgguf.runtime.model import LlamaModel, rms_norm

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K.gguf"

torch.set_num_threads(1)


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (HF half-split rope -> GGUF adjacent pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def hf_model(tied: bool, n_head=4, n_kv=2, bias=False, seed=0, vocab=97, dim=64, ff=96, layers=2, theta=1e5):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=ff, num_hidden_layers=layers,
                      num_attention_heads=n_head, num_key_value_heads=n_kv, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=theta, tie_word_embeddings=tied, attention_bias=bias,
                      mlp_bias=bias)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return m


def write_gguf(m, path: Path, arch: str = "llama", drop: str | None = None, reshape: str | None = None,
               weight_type=None) -> Path:
    """Write an HF llama as GGUF the way convert_hf_to_gguf.py does (q/k permuted)."""
    cfg = m.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in m.state_dict().items()}
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        tensors[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        tensors[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        for hf, gg in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                       ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                       ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")):
            for kind in ("weight", "bias"):
                if p + hf + "." + kind not in sd:
                    continue
                t = sd[p + hf + "." + kind]
                if gg == "attn_q":
                    t = permute(t, H, H)
                elif gg == "attn_k":
                    t = permute(t, H, Hkv)
                tensors[f"{b}{gg}.{kind}"] = t
    for name, t in tensors.items():
        if name == drop:
            continue
        if name == reshape:
            t = t[:-1]
        t = np.ascontiguousarray(t)
        if weight_type is not None and t.ndim == 2 and name != "token_embd.weight":
            q = gguf.quants.quantize(t, weight_type)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=weight_type)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_logits(m, ids) -> torch.Tensor:
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].float()



@pytest.fixture(autouse=True)
def _float32_kv_cache(monkeypatch):
    """These tests compare with float32 references (transformers): keep the KV cache in float32."""
    monkeypatch.setenv("QGGUF_KV_F32", "1")

@pytest.mark.parametrize("tied,n_head,n_kv,bias", [(True, 4, 2, False), (False, 4, 4, False),
                                                   (False, 8, 2, True), (True, 4, 1, False)])
def test_logits_match_transformers(tmp_path, tied, n_head, n_kv, bias):
    m = hf_model(tied, n_head=n_head, n_kv=n_kv, bias=bias)
    path = write_gguf(m, tmp_path / "tiny.gguf")
    ours = LlamaModel.from_gguf(path)
    assert ours.tied == tied
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 97, 40).tolist()
    ref = hf_logits(m, ids)
    got = ours.logits(ids)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=2e-4, rtol=1e-4), float((got - ref).abs().max())


def test_kv_cache_incremental_equals_full(tmp_path):
    m = hf_model(True)
    ours = LlamaModel.from_gguf(write_gguf(m, tmp_path / "tiny.gguf"))
    ids = np.random.default_rng(2).integers(0, 97, 30).tolist()
    full = ours.logits(ids)
    ours.reset()
    parts, pos = [], 0
    for size in (7, 1, 5, 1, 1, 9, 6):
        parts.append(ours.forward(ids[pos:pos + size], pos))
        pos += size
    assert pos == len(ids)
    inc = torch.cat(parts)
    assert torch.allclose(inc, full, atol=1e-5, rtol=1e-5), float((inc - full).abs().max())
    # rewinding: re-run the tail from an earlier position
    tail = ours.forward(ids[20:], 20)
    assert torch.allclose(tail, full[20:], atol=1e-5, rtol=1e-5)
    # logits_from
    ours.reset()
    last = ours.forward(ids, 0, logits_from=-1)
    assert last.shape == (1, 97) and torch.allclose(last[0], full[-1], atol=1e-5)
    with pytest.raises(ValueError):
        ours.forward([1], 40)


def test_capture_linear_inputs(tmp_path):
    m = hf_model(True)
    ours = LlamaModel.from_gguf(write_gguf(m, tmp_path / "tiny.gguf"))
    ids = [3, 5, 7, 11, 13]
    seen: dict[str, list] = {}
    with ours.capture_linear_inputs(lambda name, x: seen.setdefault(name, []).append(x.clone())):
        ours.logits(ids)
    names = [f"blk.{i}.{t}.weight" for i in range(2)
             for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    assert set(seen) == set(names) | {"token_embd.weight"}
    for n in names:
        (x,) = seen[n]
        assert x.dtype == torch.float32 and x.shape[0] == len(ids)
    assert seen["blk.0.ffn_down.weight"][0].shape == (5, 96)
    emb = m.model.embed_tokens.weight.detach()[ids]
    expect = rms_norm(emb, m.model.layers[0].input_layernorm.weight.detach(), 1e-5)
    assert torch.allclose(seen["blk.0.attn_q.weight"][0], expect, atol=1e-5)
    # outside the block nothing is captured
    n_before = sum(len(v) for v in seen.values())
    ours.logits(ids)
    assert sum(len(v) for v in seen.values()) == n_before


def test_quantized_weights_dequantized_at_load(tmp_path):
    from qgguf import gguf_types

    try:
        gguf_types.by_ggml(int(gguf.GGMLQuantizationType.Q8_0))
    except Exception:
        pytest.skip("Q8_0 not in the registry yet")
    m = hf_model(False, dim=64, ff=96)
    qpath = write_gguf(m, tmp_path / "q8.gguf", weight_type=gguf.GGMLQuantizationType.Q8_0)
    ours = LlamaModel.from_gguf(qpath)
    lin = ours.layers[0].wq
    assert isinstance(lin, DenseLinear) and lin.source_type == "Q8_0"
    # the same weights through gguf's reference dequantizer
    r = gguf.GGUFReader(str(qpath))
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    ref = gguf.quants.dequantize(t.data, t.tensor_type)
    assert np.array_equal(lin.weight.numpy(), ref)
    ids = [1, 2, 3, 4, 5, 6]
    diff = (ours.logits(ids) - hf_logits(m, ids)).abs().max()
    assert 0 < float(diff) < 0.5


def test_plugin_linear_kind():
    calls = []

    class Fake(LinearBase):
        kind = "fake"

        def __init__(self, name, shape):
            super().__init__(name, shape[0], shape[1])

        def forward(self, x):
            calls.append(x.shape)
            return torch.zeros(*x.shape[:-1], self.out_features)

    register_linear_kind(1000, lambda name, tt, shape, raw: Fake(name, shape))
    try:
        lin = make_linear("blk.0.attn_q.weight", 1000, (3, 4), np.zeros(12, np.uint8))
        assert isinstance(lin, Fake) and lin(torch.ones(2, 4)).shape == (2, 3)
        with pytest.raises(ValueError):
            register_linear_kind(1000, lambda *a: None)
    finally:
        linear_mod._KINDS.pop(1000, None)
    with pytest.raises(UnsupportedModelError, match="attn_q"):
        make_linear("blk.0.attn_q.weight", 1000, (3, 4), np.zeros(12, np.uint8))


def test_errors(tmp_path):
    m = hf_model(True)
    with pytest.raises(UnsupportedModelError, match="architecture 'gpt2'"):
        LlamaModel.from_gguf(write_gguf(m, tmp_path / "a.gguf", arch="gpt2"))
    with pytest.raises(UnsupportedModelError, match="missing tensor blk.1.ffn_up.weight") as e:
        LlamaModel.from_gguf(write_gguf(m, tmp_path / "b.gguf", drop="blk.1.ffn_up.weight"))
    assert "b.gguf" in str(e.value)
    with pytest.raises(UnsupportedModelError, match="blk.0.attn_k.weight has shape"):
        LlamaModel.from_gguf(write_gguf(m, tmp_path / "c.gguf", reshape="blk.0.attn_k.weight"))
    with pytest.raises(InputFileError):
        LlamaModel.from_gguf(tmp_path / "none.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(InputFileError, match="bad.gguf"):
        LlamaModel.from_gguf(bad)


STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park.")


@pytest.mark.skipif(not STORIES.exists(), reason="shared stories260K missing")
def test_stories_greedy_from_bos():
    model = LlamaModel.from_gguf(STORIES)
    r = gguf.GGUFReader(str(STORIES))
    f = r.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(f.parts[i]).decode() for i in f.data]
    ids = [1]
    logits = model.forward(ids, 0)
    for _ in range(40):
        t = int(logits[-1].argmax())
        ids.append(t)
        logits = model.forward([t], len(ids) - 1)
    text = "".join(vocab[i] for i in ids[1:]).replace("\u2581", " ").strip()
    assert text.startswith(STORY), text
