#!/usr/bin/env python3
"""The AQ and VQ issues' tables: qgguf's codebook files beside llama.cpp's own low-bit files, in one run.

Every run makes one file of SmolLM2-135M (``--model``) and evaluates it the same way (qgguf's evaluator:
``--chunks`` of ``--ctx`` tokens of WikiText-2, KLD / same-top against the F32 model, with the cached F32
logits of tools/compare_methods.py; files llama.cpp can load also get llama.cpp's own perplexity). Runs:

* ``lc-ffn_down-IQ2_XXS``: ``llama-quantize --imatrix I --tensor-type ffn_down=iq2_xxs ... Q8_0`` (ffn_down
  alone in IQ2_XXS, everything else Q8_0; AQ issue, acceptance a);
* ``lc-Q2_K``: ``llama-quantize --imatrix I MODEL OUT Q2_K``, llama.cpp's Q2_K preset with its fallbacks
  (AQ issue, acceptance b);
* ``lc-PRESET`` for any other llama-quantize type name (e.g. ``lc-IQ1_S``: llama.cpp's smallest file);
* ``aq-ffn_down-B``: ``qgguf convert --type Q8_0 --pure --tensor-method ffn_down=aq --bits B --method aq``;
* ``aq-B`` / ``vq-B``: ``qgguf convert --method aq|vq --bits B`` (the whole model);
* any qgguf run with ``+KEY=VALUE`` suffixes adds those method options (``aq-3+finetune=no``: ``-O finetune=no``).

The importance matrix ``I`` is llama-imatrix's on the same calibration text in qgguf's order (shared with
tools/compare_methods.py). Results go to OUT/RUN.json (a finished run is not redone; an interrupted qgguf
conversion resumes) and the markdown table to stdout::

    python tools/compare_codebooks.py --runs lc-ffn_down-IQ2_XXS,aq-ffn_down-2,lc-Q2_K,aq-3,aq-2,vq-2,vq-3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import (ROOT, TOOLS, add_common_args, calib_text, convert_report, evaluate,  # noqa: E402
                             llamacpp_imatrix, run, types_of)


def make_file(name: str, args, imatrix: Path, dest: Path, log: Path) -> dict:
    if name.startswith("lc-"):
        spec = name[3:]
        cmd = [str(TOOLS / "llama-quantize"), "--imatrix", str(imatrix)]
        if spec.startswith("ffn_down-"):
            cmd += ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0",
                    "--tensor-type", f"ffn_down={spec[len('ffn_down-'):].lower()}"]
            qtype = "Q8_0"
        else:
            qtype = spec
        cmd += [args.model, str(dest), qtype, str(args.threads)]
        return {"wall_s": run(cmd, log), "command": " ".join(cmd[1:])}
    name, *extra = name.split("+")     # aq-3+finetune=no: method options (-O KEY=VALUE) for an ablation
    method, _, rest = name.partition("-")
    if method not in ("aq", "vq"):
        raise SystemExit(f"unknown run {name!r}")
    cmd = [str(Path(sys.executable).parent / "qgguf"), "convert", args.model, "-o", str(dest), "--method", method,
           "--calib", args.calib, "--seed", str(args.seed), "-t", str(args.threads), "--json"]
    if rest.startswith("ffn_down-"):
        cmd += ["--type", "Q8_0", "--pure", "--tensor-method", f"ffn_down={method}", "--bits", rest[len("ffn_down-"):]]
    else:   # one configuration per role, as VQ's --bits gives it: AQ against VQ like for like
        cmd += ["--bits", rest] + (["--bits-plan", "role"] if method == "aq" else [])
    for kv in extra:
        cmd += ["-O", kv]
    if dest.with_name(dest.name + ".qgguf-resume").is_dir():
        cmd.append("--resume")
    wall = run(cmd, log)
    rep = convert_report(log)
    return {"wall_s": wall, "peak_rss_bytes": rep.get("peak_rss_bytes"), "command": "qgguf " + " ".join(cmd[1:]),
            "resumed": "--resume" in cmd, "codebook_types": rep.get("codebook_types")}


def table(results: list[dict]) -> str:
    lines = ["| run | file bytes | KLD | PPL (qgguf) | PPL (llama.cpp) | same-top | wall | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        o, lc = r["eval"]["ours"], r["eval"].get("llamacpp", {})
        rss = r["make"].get("peak_rss_bytes")
        lppl = f"{lc['ppl']:.3f}" if lc.get("ppl") else "cannot load"
        wall = f"{r['make']['wall_s']:.0f} s{' (resumed)' if r['make'].get('resumed') else ''}"
        lines.append(f"| {r['run']} | {r['bytes']:,} | {o['kld']:.4f} | {o['ppl']:.3f} | {lppl} | "
                     f"{100 * o['same_top']:.2f}% | {wall} | {f'{rss / 1e9:.2f} GB' if rss else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--runs", default="lc-ffn_down-IQ2_XXS,aq-ffn_down-2,lc-Q2_K,aq-3,aq-2")
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "aq"))
    ap.add_argument("--methods-out", default=str(ROOT / "bench-out" / "methods"),
                    help="where tools/compare_methods.py keeps the importance matrix and the F32 logits cache")
    args = ap.parse_args(argv)

    out, shared = Path(args.out), Path(args.methods_out)
    out.mkdir(parents=True, exist_ok=True)
    shared.mkdir(parents=True, exist_ok=True)
    text = calib_text(args.calib, args.seed, shared / "calib.txt")
    imatrix = shared / "llamacpp-imatrix.gguf"
    results = []
    for name in args.runs.split(","):
        res_path = out / f"{name}.json"
        if res_path.exists():
            results.append(json.loads(res_path.read_text()))
            continue
        if args.table_only:
            continue
        if name.startswith("lc-"):
            llamacpp_imatrix(args.model, text, imatrix, 128, args.ctx, args.threads)
        dest = out / f"{name}.gguf"
        print(f"== {name}", file=sys.stderr, flush=True)
        made = make_file(name, args, imatrix, dest, out / f"{name}.log")
        ev = evaluate(dest, args, shared / "base-logits.npy")
        r = {"run": name, "file": str(dest), "bytes": dest.stat().st_size, "mix": types_of(dest), "make": made,
             "eval": ev, "date": time.strftime("%Y-%m-%d"), "load": os.getloadavg()}
        res_path.write_text(json.dumps(r, indent=1))
        results.append(r)
        o = ev["ours"]
        print(f"   {name}: KLD {o['kld']:.4f} PPL {o['ppl']:.3f} bytes {r['bytes']:,} make {made['wall_s']:.0f} s",
              file=sys.stderr, flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
