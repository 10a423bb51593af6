"""Sub-commands of the torch runner: ``run``, ``chat``, ``eval``, ``tokenize``, ``bench``.

torch is imported inside the handlers only, so that ``qgguf --help`` and conversion start fast."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputFileError, OptionError
from .threads import set_torch_threads


def _threads(args) -> int | None:
    t = getattr(args, "threads", None)
    if t is not None and t < 1:
        raise OptionError(f"--threads must be at least 1 (got {t})")
    return t


def _load(args):
    from .linear import load_llama
    from .tokenizer import Tokenizer

    path = Path(args.model)
    if not path.is_file():
        raise InputFileError("no such model file", path)
    threads = _threads(args)
    if threads:
        set_torch_threads(threads)
    model = load_llama(path, threads=threads)   # plain files: LlamaModel.from_gguf; also qgguf AQ tensors
    tok = Tokenizer.from_gguf(path)
    return model, tok


def _sampling_kwargs(args) -> dict:
    return dict(temp=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                n_ctx=args.ctx)


def cmd_run(args) -> int:
    from .generate import generate

    if args.n_predict == 0:
        return 0
    model, tok = _load(args)
    out = sys.stdout
    if not args.no_display_prompt:
        out.write(args.prompt)
        out.flush()
    for piece in generate(model, tok, args.prompt, n_predict=args.n_predict, **_sampling_kwargs(args)):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return 0


def cmd_chat(args) -> int:
    from .generate import chat

    model, tok = _load(args)
    chat(model, tok, sys.stdin, sys.stdout, system=args.system, n_predict=args.n_predict,
         **_sampling_kwargs(args))
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate, format_result

    if args.ctx is None or args.ctx < 4:
        raise OptionError("--ctx must be at least 4")
    res = evaluate(args.model, args.text, ctx=args.ctx, chunks=args.chunks, base=args.base,
                   threads=_threads(args), progress=not args.no_progress, base_cache=args.base_cache)
    if args.json:
        print(json.dumps(res))
    else:
        print(format_result(res))
    return 0


def cmd_tokenize(args) -> int:
    from .evaluate import read_text
    from .tokenizer import Tokenizer

    if (args.text is None) == (args.prompt is None):
        raise OptionError("give exactly one of --text FILE or -p TEXT")
    text = read_text(args.text) if args.text is not None else args.prompt
    path = Path(args.model)
    if not path.is_file():
        raise InputFileError("no such model file", path)
    tok = Tokenizer.from_gguf(path)
    ids = tok.encode(text, add_special=not args.no_bos, parse_special=not args.no_parse_special)
    ids = [int(i) for i in ids]
    if args.json:
        print(json.dumps(ids))
    else:
        print(" ".join(str(i) for i in ids))
    return 0


def cmd_bench(args) -> int:
    from .bench import bench, format_result

    res = bench(args.model, n_prompt=args.n_prompt, n_gen=args.n_gen, threads=_threads(args), reps=args.reps,
                torch_threads_decode=args.torch_threads_decode, profile=args.profile)
    if args.json:
        print(json.dumps(res))
    else:
        print(format_result(res))
    return 0


def _add_sampling(p: argparse.ArgumentParser, n_default: int) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=n_default,
                   help=f"tokens to generate (-1: until end of text or context full; default {n_default})")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling (default 40, 0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling (default 0.95, 1 = off)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p sampling (default 0.05, 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("-c", "--ctx", type=int, default=None, help="context size (default: the model's)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: torch's)")


def add_parsers(sub) -> None:
    p = sub.add_parser("run", help="generate text from a prompt with the bundled torch runner",
                       description="Generate text after a prompt (streamed to stdout).")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("-p", "--prompt", required=True, help="prompt text")
    p.add_argument("--no-display-prompt", action="store_true", help="do not echo the prompt")
    _add_sampling(p, 128)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="chat with an instruction-tuned model (interactive or piped stdin)",
                       description="Chat using the model's chat template: one user turn per input line.")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--system", default=None, help="system message")
    _add_sampling(p, 512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="perplexity (and KL divergence against a base model), llama-perplexity style",
                       description="Perplexity over a text as llama.cpp's llama-perplexity computes it; with "
                                   "--base, KL divergence, its percentiles and the same-top rate.")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text (e.g. wiki.test.raw)")
    p.add_argument("-c", "--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="number of chunks (default: all)")
    p.add_argument("--base", default=None, metavar="REF.gguf", help="reference model for KL divergence")
    p.add_argument("--base-cache", default=None, metavar="FILE.npy",
                   help="keep the base model's logits in FILE (made on the first run, reused while the base "
                        "file, text, --ctx and --chunks are the same; like llama-perplexity's "
                        "--kl-divergence-base)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tokenize", help="print the token ids of a text",
                       description="Token ids of a text with the model's own vocabulary.")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--text", default=None, metavar="FILE", help="UTF-8 text file")
    p.add_argument("-p", "--prompt", default=None, help="text given on the command line")
    p.add_argument("--no-bos", action="store_true", help="do not add BOS/EOS even when the vocab asks")
    p.add_argument("--no-parse-special", action="store_true", help="treat special-token text as plain text")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("bench", help="prompt and decode tokens/s of the torch runner (like llama-bench)",
                       description="Prompt processing (pp: -p tokens in one batch) and text generation (tg: -n "
                                   "tokens one at a time) speed, best of -r repetitions.")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("-p", "--n-prompt", type=int, default=128, help="prompt tokens (default 128; 0: skip)")
    p.add_argument("-n", "--n-gen", type=int, default=64, help="generated tokens (default 64; 0: skip)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: min(cores, 4))")
    p.add_argument("-r", "--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--torch-threads-decode", type=int, default=1,
                   help="torch threads for the small ops of decoding (default 1; weights use --threads)")
    p.add_argument("--profile", action="store_true",
                   help="also time the weight calls of decoding (ms per token: q/k/v, output proj, gate/up, down, "
                        "output matrix; the rest is norms, attention and Python) in an extra decode run")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)


__all__ = ["add_parsers"]
