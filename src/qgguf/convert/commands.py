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
    p.add_argument("--method", default="rtn",
                   help="rtn (default), imatrix, gptq, quantease, autoround or aq (the last four calibrate block by "
                        "block; see the method options below)")
    p.add_argument("--type", default="Q8_0",
                   help="llama.cpp file type (F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q2_K_S Q3_K_S Q3_K_M "
                        "Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K) or a bare tensor type (Q4_K, IQ4_NL, ...)")
    p.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
                   help="override the type of tensors whose name matches the regex PATTERN (repeatable)")
    p.add_argument("--pure", action="store_true", help="no mixing rules: every quantized tensor in --type")
    p.add_argument("--token-embedding-type", metavar="T")
    p.add_argument("--output-tensor-type", metavar="T")
    p.add_argument("--calib", metavar="FILE|NAME|self",
                   help="calibration text or JSONL file, a Hugging Face dataset name (needs 'datasets' and network), "
                        "or 'self' (sample from the model; the default)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration sequences (default 128; gptq: 64; aq: 128 of 256 tokens; vq: 32 of 256; autoround: recipe)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per sequence (default 512; autoround: recipe)")
    p.add_argument("--imatrix", metavar="FILE", help="use this importance matrix (llama.cpp GGUF or .dat)")
    p.add_argument("--imatrix-out", metavar="FILE", help="save the collected importance matrix (GGUF format)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every random choice (calibration sampling, AQ/VQ k-means and shuffles, AutoRound "
                        "batches): the same seed and options give the same file (default 0)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="refuse a plan whose estimated peak memory exceeds SIZE (e.g. 2GB, 1500MB, 1.5GiB) before "
                        "any work; the report shows the estimate next to the measured peak RSS")
    g = p.add_argument_group("method options (block methods: gptq, quantease, autoround)")
    g.add_argument("--damp", type=float, help="gptq: Hessian damping, fraction of the mean diagonal (0.01)")
    g.add_argument("--actorder", action="store_true", default=None,
                   help="gptq: process columns by decreasing activation energy")
    g.add_argument("--passes", type=int, help="quantease: coordinate-descent passes (20)")
    g.add_argument("--init", choices=["rtn", "gptq", "quantease"], help="quantease, autoround: start point (rtn: the type's importance-weighted rounding; gptq: GPTQ's result; quantease: QuantEase's result, autoround only)")
    g.add_argument("--outliers", type=float, metavar="FRAC",
                   help="quantease, aq: keep this fraction of weights as sparse float16 outliers (e.g. 0.01; "
                        "aq's default 0.002, 0 turns them off); the file then needs the qgguf runner")
    g.add_argument("--iters", type=int, help="autoround: optimisation steps per block")
    g.add_argument("--lr", type=float, help="autoround: learning rate (default 1/iters)")
    g.add_argument("--recipe", metavar="light|default|best|FILE.json",
                   help="autoround: preset of iters/samples (light, default, best); or a mixed-precision recipe "
                        "JSON file written by --save-recipe: its tensor types, no measurement")
    g.add_argument("--batch-size", type=int, help="autoround: samples per optimisation step")
    a = p.add_argument_group("AQ (additive codebooks, --method aq; the file then needs the qgguf runner)")
    a.add_argument("--aq-config", metavar="aq-MxB-gG",
                   help="AQ configuration: M codebooks of 2^B entries over groups of G inputs (default aq-2x8-g8)")
    a.add_argument("--bits", type=float, metavar="B",
                   help="aq: the most accurate file whose block linears take at most B bits per weight, every byte "
                        "counted (codes, codebooks, scales; --bits-plan says how)")
    a.add_argument("--bits-plan", choices=["auto", "role", "tensor"], default="auto",
                   help="how --bits B is spent with --method aq: per tensor by the mixed-precision allocator from "
                        "measured KL divergences (tensor: the block linears' bytes at B bits per weight plus the "
                        "embedding/output as --bits gives them, spent on AQ configurations and standard types; a "
                        "measurement first), or one configuration per role (role: no measurement, faster, less "
                        "accurate). auto (default): tensor for the whole model, role with --tensor-method")
    a.add_argument("--vq-config", metavar="vq-vV-kK[-KR][-oP][-gG]",
                   help="VQ configuration (--method vq; VPTQ-style vectors of V rows, K centroids, KR residual "
                        "centroids, P%% outlier columns, G codebook groups; default vq-v8-k256-256); --bits B with "
                        "--method vq picks the best VQ configuration within B bits per weight, every byte counted")
    a.add_argument("--tensor-method", action="append", default=[], metavar="PATTERN=METHOD",
                   help="per-tensor method by regex (repeatable), e.g. 'ffn_down=aq': AQ only on the matching block "
                        "linears, --type elsewhere")
    g.add_argument("-O", "--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the method (repeatable), e.g. -O blocksize=256")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted block-method run from OUT.qgguf-resume/")
    x = p.add_argument_group("mixed precision (a type per tensor from measured sensitivities)")
    x.add_argument("--target-size", metavar="SIZE",
                   help="the whole file in at most SIZE: bytes, or 60MB (10^6), 57.8MiB (2^20), 1.2GB")
    x.add_argument("--target-bpw", type=float, metavar="X", help="at most X bits per weight over all tensors")
    x.add_argument("--compat", choices=["llama.cpp", "any"], default=None,
                   help="candidate types: llama.cpp-loadable only (default; F16 Q8_0 Q6_K Q5_1 Q5_K Q5_0 Q4_1 Q4_K "
                        "IQ4_NL Q4_0 Q3_K Q2_K where the row length allows) or any qgguf type (with --method aq also the "
                        "AQ configurations aq-4x8-g8 aq-3x8-g8 aq-2x8-g8 aq-1x8-g8 for the block linears; the default "
                        "with --method aq)")
    x.add_argument("--dynamic", action="store_true",
                   help="with --type: keep the tensors whose quantization hurts most at higher precision, for at "
                        "most --dynamic-extra more bytes of the quantized tensors")
    x.add_argument("--dynamic-extra", type=float, default=0.10, metavar="F", help="--dynamic's extra bytes (0.10)")
    x.add_argument("--save-recipe", metavar="FILE.json", help="write the chosen recipe (types, budget, sensitivities)")
    x.add_argument("--sens-nsamples", type=int, metavar="N",
                   help="calibration sequences of the sensitivity measurement (32, of --seqlen or 512 tokens)")
    x.add_argument("--sens-from", metavar="RECIPE.json",
                   help="reuse the sensitivities saved in a recipe (another budget without a new measurement)")
    x.add_argument("--mix-types", metavar="T1,T2,...",
                   help="candidate types (a subset of the --compat list), e.g. Q8_0,Q6_K,Q5_0,Q4_K,Q4_0; with "
                        "--method aq also any valid AQ configuration aq-MxB-gG (e.g. aq-6x8-g16)")
    x.add_argument("--proxy-check", type=int, default=0, metavar="N",
                   help="also measure N single-tensor KL divergences with other types and report the rank "
                        "correlation of the prediction with them")
    x.add_argument("--kld-stride", type=int, metavar="K",
                   help="measure the block linears' single-tensor KL divergence in every K-th layer (and the last) "
                        "and interpolate the layers between (default n_layer // 6; 1: every layer)")
    x.add_argument("--aq-search", choices=["sampled", "full"],
                   help="AQ candidates (--compat any --method aq): searched in the KL-measured layers and predicted "
                        "per role elsewhere (sampled, the default) or searched in every layer (full, slower)")
    p.add_argument("-t", "--threads", type=int)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_convert)

    i = sub.add_parser("inspect", help="list the tensors of a GGUF file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_inspect)


_OPTION_ARGS = ("damp", "actorder", "passes", "init", "outliers", "iters", "lr", "recipe", "batch_size")


def _value(text: str):
    t = text.strip()
    if t.lower() in ("true", "yes", "on"):
        return True
    if t.lower() in ("false", "no", "off"):
        return False
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def method_options(args: argparse.Namespace) -> dict:
    from ..errors import OptionError
    opts = {k: getattr(args, k) for k in _OPTION_ARGS if getattr(args, k, None) is not None}
    for item in args.method_option or []:
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise OptionError(f"--method-option wants KEY=VALUE, got {item!r}")
        opts[key.strip().replace("-", "_")] = _value(val)
    return opts


AUTOROUND_RECIPES = ("default", "light", "best")


def _split_recipe(args: argparse.Namespace):
    """``--recipe``: an AutoRound preset name stays a method option; anything else must be a recipe file."""
    from pathlib import Path

    from ..errors import OptionError
    r = args.recipe
    if r is None or r in AUTOROUND_RECIPES:
        return None
    if not (r.lower().endswith(".json") or Path(r).is_file()):
        raise OptionError(f"--recipe {r!r}: expected an AutoRound preset ({', '.join(AUTOROUND_RECIPES)}) or a "
                          "recipe JSON file from --save-recipe")
    args.recipe = None
    return r


def _convert(args: argparse.Namespace) -> int:
    from ..errors import OptionError
    from .pipeline import convert
    recipe_file = _split_recipe(args)
    sens = {"check": args.proxy_check}
    if args.sens_from:
        sens["from"] = args.sens_from
    if args.mix_types:
        sens["types"] = [t for t in args.mix_types.split(",") if t.strip()]
    if args.sens_nsamples:
        sens["nsamples"] = args.sens_nsamples
    if args.aq_search:
        sens["aq_search"] = args.aq_search
    if args.kld_stride is not None:
        if args.kld_stride < 1:
            raise OptionError(f"--kld-stride {args.kld_stride}: expected a layer stride of at least 1")
        sens["alpha_stride"] = args.kld_stride
    if args.seqlen:
        sens["seqlen"] = min(args.seqlen, 512)
    rep = convert(args.src, args.out, method=args.method, type=args.type, tensor_types=args.tensor_type,
                  pure=args.pure, token_embedding_type=args.token_embedding_type,
                  output_tensor_type=args.output_tensor_type, calib=args.calib, nsamples=args.nsamples,
                  seqlen=args.seqlen, imatrix=args.imatrix, imatrix_out=args.imatrix_out, seed=args.seed,
                  threads=args.threads, progress=not args.quiet and sys.stderr.isatty(),
                  method_options=method_options(args), resume=args.resume, aq_config=args.aq_config,
                  bits=args.bits, tensor_methods=args.tensor_method, target_size=args.target_size,
                  target_bpw=args.target_bpw, compat=args.compat, dynamic=args.dynamic,
                  dynamic_extra=args.dynamic_extra, recipe_file=recipe_file, save_recipe=args.save_recipe,
                  sensitivity=sens, vq_config=args.vq_config, max_memory=args.max_memory, bits_plan=args.bits_plan)
    if args.json:
        import json
        print(json.dumps(rep.to_dict(), indent=1))
    else:
        print(rep.summary())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from . import inspect as insp
    from .writer import outlier_rows
    if outlier_rows not in insp.ROW_PROVIDERS:
        insp.register_rows(outlier_rows)
    info = insp.inspect_file(args.file)
    if args.json:
        print(insp.to_json(info))
        return 0
    print(insp.format_table(info))
    sparse = [r for r in info["tensors"] if r.get("outliers")]
    if sparse:
        print(f"qgguf extensions (qgguf.version {info['metadata'].get('qgguf.version')}): sparse outliers in "
              f"{len(sparse)} tensors, {sum(r['outliers'] for r in sparse):,} values (NAME.outlier_idx I32 + "
              "NAME.outlier_val F16, counted in the bytes above)")
        for r in sparse:
            print(f"  {r['name']:<32} {r['outliers']:>8,} outliers ({100.0 * r['outliers'] / max(1, r['params']):.2f}%)")
        print("NOTE: this file needs the qgguf runner (qgguf run / eval / chat, qgguf.load); "
              "stock llama.cpp will not load it")
    return 0
