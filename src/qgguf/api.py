"""The Python API, mirroring the command line: ``qgguf.convert(...)`` and ``qgguf.load(path)``."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator


def convert(src, out=None, method: str = "rtn", type: str = "Q8_0", **options):
    """Convert ``src`` (a Hugging Face folder, a GGUF file or an alias such as ``"smollm2-135m"``) to the GGUF
    file ``out``, like ``qgguf convert``. Keyword options are those of
    :func:`qgguf.convert.pipeline.convert` (``tensor_types``, ``pure``, ``token_embedding_type``,
    ``output_tensor_type``, ``calib``, ``nsamples``, ``seqlen``, ``imatrix``, ``seed``, ``threads``,
    ``progress``). Returns the conversion report (types chosen, fallbacks, bytes, time, peak memory)."""
    from .convert.pipeline import convert as _convert

    return _convert(src, out, method=method, type=type, **options)


class Model:
    """A GGUF model loaded into qgguf's runner, with its tokenizer."""

    def __init__(self, path: str | Path, threads: int | None = None):
        from .runtime.model import LlamaModel
        from .runtime.tokenizer import Tokenizer

        self.path = Path(path)
        self.threads = threads
        self.model = LlamaModel.from_gguf(self.path, threads=threads)
        self.tokenizer = Tokenizer.from_gguf(self.path)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special))

    def generate(self, prompt: str, n_predict: int = 128, temp: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, seed: int | None = None) -> Iterator[str]:
        """Yield the generated text piece by piece (``temp=0``: greedy), as ``qgguf run``."""
        from .runtime.generate import generate

        return generate(self.model, self.tokenizer, prompt, n_predict=n_predict, temp=temp, top_k=top_k,
                        top_p=top_p, seed=seed)

    def perplexity(self, text_path: str | Path, ctx: int = 512, chunks: int | None = None,
                   progress: bool = False) -> dict:
        """The llama-perplexity protocol over ``text_path``: a dict with ``ppl``, ``ppl_err``, ``chunks``..."""
        from .runtime.evaluate import evaluate_loaded

        return evaluate_loaded(self.model, self.tokenizer, text_path, ctx=ctx, chunks=chunks, progress=progress,
                               desc=self.path.name)

    def kl_divergence(self, base: "str | Path | Model", text_path: str | Path, ctx: int = 512,
                      chunks: int | None = None, progress: bool = False) -> dict:
        """KL divergence of this model against ``base`` (a path or a loaded :class:`Model`), with PPL,
        the 99th percentile and the same-top-token rate, as ``qgguf eval --base``."""
        from .runtime.evaluate import evaluate_loaded

        base_model = base if isinstance(base, Model) else Model(base, threads=self.threads)
        return evaluate_loaded(self.model, self.tokenizer, text_path, ctx=ctx, chunks=chunks,
                               base_model=base_model.model, progress=progress, desc=self.path.name)


def load(path: str | Path, threads: int | None = None) -> Model:
    """Load a GGUF written by qgguf (or any llama-architecture GGUF of a supported type)."""
    return Model(path, threads=threads)
