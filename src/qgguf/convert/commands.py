"""CLI sub-commands of the convert area: ``qgguf convert`` and ``qgguf inspect``."""
from __future__ import annotations

import argparse
import sys


def add_parsers(sub) -> None:
    p = sub.add_parser("convert", help="convert / quantize a model to GGUF",
                       description="Convert a GGUF file, a Hugging Face folder or an alias (smollm2-135m) "
                                   "to a quantized GGUF that stock llama.cpp loads.")
    p.add_argument("src", help="GGUF file, Hugging Face model folder, or alias (smollm2-135m)")
    p.add_argument("-o", "--out", help="output file (default: NAME-TYPE.gguf next to SRC, or ./ for an alias)")
    p.add_argument("--method", default="rtn", help="rtn (default) or imatrix")
    p.add_argument("--type", default="Q8_0",
                   help="llama.cpp file type (F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q2_K_S Q3_K_S Q3_K_M "
                        "Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K) or a bare tensor type (Q4_K, IQ4_NL, ...)")
    p.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
                   help="override the type of tensors whose name matches the regex PATTERN (repeatable)")
    p.add_argument("--pure", action="store_true", help="no mixing rules: every quantized tensor in --type")
    p.add_argument("--token-embedding-type", metavar="T")
    p.add_argument("--output-tensor-type", metavar="T")
    p.add_argument("--calib", metavar="FILE", help="calibration text or JSONL ('self': sample from the model)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--imatrix", metavar="FILE", help="use this importance matrix (llama.cpp GGUF or .dat)")
    p.add_argument("--imatrix-out", metavar="FILE", help="save the collected importance matrix (GGUF format)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-t", "--threads", type=int)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_convert)

    i = sub.add_parser("inspect", help="list the tensors of a GGUF file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_inspect)


def _convert(args: argparse.Namespace) -> int:
    from .pipeline import convert
    rep = convert(args.src, args.out, method=args.method, type=args.type, tensor_types=args.tensor_type,
                  pure=args.pure, token_embedding_type=args.token_embedding_type,
                  output_tensor_type=args.output_tensor_type, calib=args.calib, nsamples=args.nsamples,
                  seqlen=args.seqlen, imatrix=args.imatrix, imatrix_out=args.imatrix_out, seed=args.seed,
                  threads=args.threads, progress=not args.quiet and sys.stderr.isatty())
    if args.json:
        import json
        print(json.dumps(rep.to_dict(), indent=1))
    else:
        print(rep.summary())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import format_table, inspect_file, to_json
    info = inspect_file(args.file)
    print(to_json(info) if args.json else format_table(info))
    return 0
