"""Text generation with the torch runner: streaming completion and an interactive chat loop.

Sampling follows llama.cpp's default chain (common/sampling): top-k -> top-p -> min-p -> temperature ->
random draw; ``temp <= 0`` is greedy (argmax). The prompt is tokenized as llama.cpp's ``llama-cli`` does
(BOS first when the vocabulary says so; special tokens in the prompt text are parsed), and generation
stops at an end-of-generation token, after ``n_predict`` tokens or when the context is full.

The prompt runs through ``LlamaModel.forward`` (matrix products, torch's attention); every later token through
:class:`qgguf.runtime.bench.LeanDecoder`, the single-token path ``qgguf bench`` times (preallocated buffers, one
native call per weight group, torch's small ops on one thread), so generation runs at the measured speed.
"""
from __future__ import annotations

import codecs
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, TextIO

import numpy as np

from ..errors import OptionError


@dataclass
class Sampler:
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None

    def __post_init__(self):
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise OptionError(f"top-p must be in (0, 1] (got {self.top_p})")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits) -> int:
        x = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.temp is None or self.temp <= 0:
            return int(np.argmax(x))
        order = np.argsort(-x, kind="stable")
        if self.top_k and self.top_k > 0:
            order = order[: self.top_k]
        lg = x[order]
        if self.top_p is not None and self.top_p < 1.0:
            p = np.exp(lg - lg[0])
            p /= p.sum()
            cum = np.cumsum(p)
            keep = int(np.searchsorted(cum, self.top_p) + 1)  # smallest prefix with cum >= top_p
            order, lg = order[:keep], lg[:keep]
        if self.min_p and self.min_p > 0:
            keep = lg >= lg[0] + np.log(self.min_p)
            order, lg = order[keep], lg[keep]
        lg = lg / self.temp
        p = np.exp(lg - lg.max())
        p /= p.sum()
        return int(order[self.rng.choice(len(order), p=p)])


def eog_ids(tokenizer) -> set[int]:
    """End-of-generation token ids of ``tokenizer`` (EOS, EOT, <|im_end|>, ...)."""
    for attr in ("eog_ids", "end_of_generation_ids", "eog_tokens"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            v = v() if callable(v) else v
            return {int(t) for t in v}
    ids = set()
    eos = getattr(tokenizer, "eos_id", None)
    if eos is not None and eos >= 0:
        ids.add(int(eos))
    return ids


def _is_eog(tokenizer, tid: int, eog: set[int]) -> bool:
    f = getattr(tokenizer, "is_eog", None)
    if callable(f):
        try:
            return bool(f(tid))
        except Exception:
            pass
    return tid in eog


def generate_ids(model, prompt_ids: Sequence[int], n_predict: int, sampler: Sampler, stop_ids: set[int],
                 start_pos: int = 0, n_ctx: int | None = None, is_eog=None) -> Iterator[int]:
    """Evaluate ``prompt_ids`` at ``start_pos`` (the cache keeps earlier positions) and yield sampled ids.

    The end-of-generation id that stops the loop is yielded too (callers decide whether to print it);
    it is not evaluated."""
    n_ctx = n_ctx or model.n_ctx_train
    ids = list(prompt_ids)
    if not ids:
        raise OptionError("empty prompt")
    if start_pos + len(ids) > n_ctx:
        raise OptionError(f"the prompt needs {start_pos + len(ids)} positions; the context has {n_ctx}")
    logits = model.forward(ids, start_pos, logits_from=-1)[-1]
    pos = start_pos + len(ids)
    step = None   # the decoder is built only when a token follows the prompt's (not for n_predict=1 or an early stop)
    n = 0
    while n_predict < 0 or n < n_predict:
        tid = sampler(logits.numpy())
        n += 1
        yield tid
        if (is_eog(tid) if is_eog else tid in stop_ids) or pos >= n_ctx:
            return
        if n_predict >= 0 and n >= n_predict:
            return
        step = step or _single_token_step(model)
        logits = step(tid, pos)
        pos += 1


def _single_token_step(model):
    """``step(token, pos) -> logits`` for decoding: the lean decoder on a LlamaModel (the model's weight threads
    for the kernels, one torch thread for the small ops between them), else ``model.forward``."""
    from .model import LlamaModel
    if not isinstance(model, LlamaModel):
        return lambda tid, pos: model.forward([tid], pos, logits_from=-1)[-1]
    import torch

    from .bench import LeanDecoder
    from .threads import torch_threads
    dec = LeanDecoder(model, threads=torch.get_num_threads())

    def step(tid: int, pos: int):
        with torch_threads(1):
            return dec.step(tid, pos)
    return step


class _Utf8Stream:
    """Token pieces -> text, holding back incomplete UTF-8 sequences; control tokens are not shown
    (llama-cli's ``special=false``). Uses the tokenizer's own StreamDecoder when it has one."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        sd = getattr(tokenizer, "stream_decoder", None)
        self.sd = sd(special=False) if callable(sd) else None
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, tid: int) -> str:
        if self.sd is not None:
            return self.sd.push(int(tid))
        return self.dec.decode(self.tok.token_to_piece(int(tid)))

    def flush(self) -> str:
        if self.sd is not None:
            return self.sd.flush()
        return self.dec.decode(b"", final=True)


def generate(model, tokenizer, prompt: str, n_predict: int = 128, temp: float = 0.8, top_k: int = 40,
             top_p: float = 0.95, seed: int | None = None, min_p: float = 0.05,
             n_ctx: int | None = None) -> Iterator[str]:
    """Yield the text pieces generated after ``prompt`` (the prompt itself is not yielded).

    ``temp=0`` is greedy. BOS goes first when the vocabulary adds it; an empty prompt is just BOS."""
    ids = list(tokenizer.encode(prompt, add_special=True, parse_special=True))
    if not ids:
        if tokenizer.bos_id is None or tokenizer.bos_id < 0:
            raise OptionError("empty prompt and the vocabulary has no BOS token")
        ids = [int(tokenizer.bos_id)]
    sampler = Sampler(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    eog = eog_ids(tokenizer)
    model.reset()
    out = _Utf8Stream(tokenizer)
    for tid in generate_ids(model, ids, n_predict, sampler, eog, 0, n_ctx,
                            is_eog=lambda t: _is_eog(tokenizer, t, eog)):
        if _is_eog(tokenizer, tid, eog):
            break
        s = out.piece(tid)
        if s:
            yield s
    tail = out.flush()
    if tail:
        yield tail


def chat(model, tokenizer, input_stream: TextIO | Iterable[str] = None, output: TextIO = None,
         system: str | None = None, n_predict: int = 512, temp: float = 0.8, top_k: int = 40,
         top_p: float = 0.95, seed: int | None = None, min_p: float = 0.05, n_ctx: int | None = None,
         interactive: bool | None = None) -> list[dict]:
    """Chat loop: read user turns (one per line) from ``input_stream``, stream the replies to ``output``.

    The conversation is re-rendered with the model's chat template each turn; the KV cache is reused for
    the tokens that did not change. Returns the messages."""
    input_stream = sys.stdin if input_stream is None else input_stream
    output = sys.stdout if output is None else output
    if interactive is None:
        interactive = hasattr(input_stream, "isatty") and input_stream.isatty()
    sampler = Sampler(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    eog = eog_ids(tokenizer)
    n_ctx = n_ctx or model.n_ctx_train
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": system})
    cached: list[int] = []
    model.reset()

    def prompt_marker():
        if interactive:
            output.write("> ")
            output.flush()

    prompt_marker()
    for line in input_stream:
        user = line.rstrip("\r\n")
        if not user.strip():
            prompt_marker()
            continue
        messages.append({"role": "user", "content": user})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = list(tokenizer.encode(text, add_special=True, parse_special=True))
        p = 0
        while p < min(len(ids), len(cached)) and ids[p] == cached[p]:
            p += 1
        p = min(p, len(ids) - 1)  # evaluate at least one token to get logits
        if len(ids) >= n_ctx:
            raise OptionError(f"the conversation no longer fits the context of {n_ctx} tokens")
        cached = ids[:]
        stream = _Utf8Stream(tokenizer)
        reply: list[str] = []
        for tid in generate_ids(model, ids[p:], n_predict, sampler, eog, p, n_ctx,
                                is_eog=lambda t: _is_eog(tokenizer, t, eog)):
            if _is_eog(tokenizer, tid, eog):
                break
            cached.append(tid)
            s = stream.piece(tid)
            if s:
                reply.append(s)
                output.write(s)
                output.flush()
        s = stream.flush()
        if s:
            reply.append(s)
            output.write(s)
        output.write("\n")
        output.flush()
        # the cache holds positions < len(cached); the last sampled id was never evaluated
        cached = cached[: model.n_past]
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
        prompt_marker()
    return messages


__all__ = ["Sampler", "generate", "generate_ids", "chat", "eog_ids"]
