#!/usr/bin/env python3
"""Settings of the end-to-end fine-tuning stage (quantize/finetune.py) on SmolLM2-135M, one block pass shared.

The blocks of an AQ conversion do not depend on the end-to-end options, so this tool converts once with
``-O e2e=no``, keeps that run's block checkpoint (``OUT/pristine-KIND/``), and for every later setting copies it
beside a new output and resumes from it: only the end-to-end stage and the writing are redone. (To reuse the
checkpoint across options it fixes the checkpoint's settings fingerprint, which a normal ``--resume`` checks.)
Each file is then evaluated by ``qgguf eval`` (KLD against the F32 model on ``--chunks`` chunks of 512 tokens of
WikiText-2) and one JSON line is printed::

    python tools/e2e_sweep.py --kind bits2 --tag base -O e2e=no          # first: the block pass, no stage
    python tools/e2e_sweep.py --kind bits2 --tag lr1e-3 -O e2e_lr=1e-3   # then: the stage from those blocks

Kinds: ``ffn_down`` (``--type Q8_0 --pure --tensor-method ffn_down=aq --bits 2.2``), ``bits2``, ``bits3``
(``--method aq --bits 2|3``), ``recipe`` (``--method aq --recipe FILE``: a mixed plan saved by ``--save-recipe``;
its shared blocks may also be a copy of a whole conversion's checkpoint taken before its stage ended, put at
``OUT/pristine-recipe``); ``--bits``/``--aq-config`` replace the kind's budget, and ``--once`` makes a whole
conversion with the given options (no shared blocks). The conversion's wall time of a resumed run is the stage's
and the writing's only.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED = ROOT.parent / "shared"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=("ffn_down", "bits2", "bits3", "recipe"), required=True)
    ap.add_argument("--recipe", default=None, help="the recipe of --kind recipe (qgguf convert --save-recipe)")
    ap.add_argument("--tag", required=True)
    ap.add_argument("-O", dest="opts", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--model", default=str(ROOT / "out" / "smollm2-f32.gguf"))
    ap.add_argument("--calib", default=str(SHARED / "data" / "c4-sample-1000.jsonl"))
    ap.add_argument("--text", default=str(SHARED / "data" / "wikitext-2-raw-test.txt"))
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--base-cache", default=None, help="F32 logits cache of the evaluation (default OUT/base-CHUNKS.npy)")
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "e2e"))
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--bits", type=float, default=None, help="instead of the kind's --bits")
    ap.add_argument("--aq-config", default=None, help="instead of the kind's --bits (e.g. aq-2x8-g8)")
    ap.add_argument("--once", action="store_true", help="a whole conversion with these options: no shared blocks")
    ap.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
                    help="qgguf convert's --tensor-type (e.g. 'blk\\.(0|2)\\.ffn_down=aq-3x8-g8'); a kind's shared "
                         "blocks are made with the same ones (use another --out for another set)")
    args = ap.parse_args(argv)

    from qgguf.convert.pipeline import convert
    from qgguf.quantize import blockwise
    blockwise.Checkpoint.remove = lambda self: None       # the block checkpoint is kept (copied below)
    blockwise.fingerprint = lambda *a, **k: {"tool": "e2e_sweep"}

    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    opts = dict(kv.split("=", 1) for kv in args.opts)
    out = outdir / f"{args.kind}-{args.tag}.gguf"
    ck = blockwise.resume_folder(out)
    pristine = outdir / f"pristine-{args.kind}"
    resume = pristine.is_dir() and not args.once
    if resume:
        shutil.rmtree(ck, ignore_errors=True)
        shutil.copytree(pristine, ck, ignore=shutil.ignore_patterns("stage.*"))
        (ck / "run.json").write_text(json.dumps(blockwise.fingerprint(), indent=1, sort_keys=True))
    elif not args.once and opts.get("e2e", "yes").lower() not in ("no", "0", "false", "off"):
        raise SystemExit("the first run of a kind makes the shared block checkpoint: give it -O e2e=no")
    if args.kind == "recipe":
        if not args.recipe or args.bits is not None or args.aq_config:
            raise SystemExit("--kind recipe takes --recipe FILE (and no --bits or --aq-config)")
        kw = dict(recipe_file=args.recipe)
    elif args.kind == "ffn_down":
        kw = dict(type="Q8_0", pure=True, tensor_methods=["ffn_down=aq"], bits=2.2)
    else:
        kw = dict(bits=3.0 if args.kind == "bits3" else 2.0, bits_plan="role")   # the kinds' files: per role
    kw["tensor_types"] = list(args.tensor_type)
    for k in ("nsamples", "seqlen"):   # -O nsamples=/seqlen= are the pipeline's --nsamples/--seqlen
        if k in opts:
            kw[k] = int(opts[k])
    mopts = {k: v for k, v in opts.items() if k not in ("nsamples", "seqlen")}
    if args.bits is not None or args.aq_config:
        kw.pop("bits")
        kw.update({"bits": args.bits} if args.bits is not None else {"aq_config": args.aq_config})
    t0 = time.time()
    rep = convert(args.model, out, method="aq", calib=args.calib, seed=0, threads=args.threads, progress=False,
                  method_options=mopts, resume=resume, **kw)
    conv = time.time() - t0
    if not resume and not args.once:
        shutil.copytree(ck, pristine)
    shutil.rmtree(ck, ignore_errors=True)
    cache = args.base_cache or str(outdir / f"base-{args.chunks}.npy")
    t0 = time.time()
    ev = subprocess.run([str(Path(sys.executable).parent / "qgguf"), "eval", str(out), "--text", args.text, "--ctx", "512",
                         "--chunks", str(args.chunks), "--base", args.model, "--json", "-t", str(args.threads),
                         "--no-progress", "--base-cache", cache], capture_output=True, text=True)
    if ev.returncode:
        raise SystemExit(f"qgguf eval failed: {ev.stderr[-2000:]}")
    r = json.loads(ev.stdout)
    line = {"kind": args.kind, "tag": args.tag, "opts": opts, "bits": args.bits, "aq_config": args.aq_config,
            "tensor_types": args.tensor_type, "bytes": out.stat().st_size, "chunks": args.chunks,
            "kld": r["kld"], "ppl": r["ppl"], "same_top": r["same_top"], "e2e": rep.e2e, "convert_s": conv,
            "resumed": resume, "eval_s": time.time() - t0, "peak_rss_bytes": rep.peak_rss_bytes,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    (outdir / f"{args.kind}-{args.tag}.json").write_text(json.dumps(line, indent=1))
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
