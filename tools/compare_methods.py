#!/usr/bin/env python3
"""Issue 3's table: qgguf's calibrated methods against llama.cpp's own quantize with an importance matrix.

For every type T and method M, one file with every block linear in T (llama.cpp's row-length fallbacks
apply: SmolLM2's rows of 576 do not divide 256, so Q2_K/Q3_K fall back to Q4_0 there) and the embeddings
and output in Q8_0, then the same evaluation of every file:

* ``llama.cpp``: ``llama-quantize --pure --imatrix I --token-embedding-type q8_0 --output-tensor-type q8_0``
  (llama.cpp's own tool, built by tools/build_llamacpp_tools.sh) with ``I`` from ``llama-imatrix`` on the
  calibration text, in the order qgguf's calibration reads it (documents shuffled with the seed, joined by a
  blank line; both cut it into windows of 512 tokens, 128 of them);
* ``rtn``, ``imatrix``, ``gptq``, ``autoround``, ``quantease`` (``NAME:key=value,...`` adds ``-O key=value``
  method options, e.g. ``autoround:init=gptq``): ``qgguf convert --method M --type T --pure
  --token-embedding-type Q8_0 --output-tensor-type Q8_0 --calib CALIB`` (each method's default calibration
  size: 128 x 512 tokens, GPTQ 64 x 512, AutoRound's recipe its own; ``--nsamples N`` sets it for all, and for
  llama-imatrix).

Each file is evaluated by qgguf's evaluator (llama-perplexity's protocol, ``--chunks`` of ``--ctx`` tokens of
the text; KLD, same-top against the F32 model) and loaded by llama.cpp (llama-cpp-python) for its own
perplexity on the same chunks. Results go to OUT/RESULT.json per run (a finished run is not redone), and the
markdown table to stdout.

    python tools/compare_methods.py --model out/smollm2-f32.gguf --calib ../shared/data/c4-sample-1000.jsonl \\
        --text ../shared/data/wikitext-2-raw-test.txt --types Q2_K,Q3_K,Q4_0 --out bench-out/methods
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".llamacpp-tools" / "bin"
METHODS = ["llama.cpp", "rtn", "imatrix", "gptq", "autoround", "quantease"]


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output in ``log``; return the wall time (s). Raises on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)} - see {log}")
    return dt


def calib_text(calib: str, seed: int, dest: Path) -> Path:
    """The calibration documents as one text, in the order qgguf's --calib reads them (quantize/calib.py)."""
    from qgguf.quantize.calib import load_texts

    if dest.exists():
        return dest
    texts = load_texts(calib)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    dest.write_text("".join(texts[i] + "\n\n" for i in order), encoding="utf-8")
    return dest


def llamacpp_imatrix(model: str, text: Path, out: Path, nsamples: int, seqlen: int, threads: int) -> Path:
    if not out.exists():
        dt = run([str(TOOLS / "llama-imatrix"), "-m", model, "-f", str(text), "-c", str(seqlen), "--chunks",
                  str(nsamples), "-o", str(out), "-t", str(threads), "--no-ppl"], out.with_suffix(".log"))
        print(f"llama-imatrix: {dt:.1f} s", file=sys.stderr)
    return out


def make_file(method: str, qtype: str, args, imatrix: Path, dest: Path, log: Path) -> dict:
    if method == "llama.cpp":
        cmd = [str(TOOLS / "llama-quantize"), "--pure", "--imatrix", str(imatrix), "--token-embedding-type", "q8_0",
               "--output-tensor-type", "q8_0", args.model, str(dest), qtype, str(args.threads)]
        wall = run(cmd, log)
        return {"wall_s": wall, "command": " ".join(cmd[1:])}
    method, _, opts = method.partition(":")      # NAME:key=value,key=value -> -O key=value ...
    cmd = [str(Path(sys.executable).parent / "qgguf"), "convert", args.model, "-o", str(dest), "--method", method,
           "--type", qtype, "--pure", "--token-embedding-type", "Q8_0", "--output-tensor-type", "Q8_0",
           "--seed", str(args.seed), "-t", str(args.threads), "--json", "-q"]
    if method != "rtn":
        cmd += ["--calib", args.calib]
    if method not in ("rtn", "autoround") and args.nsamples:   # else the method's own default (AutoRound: recipe)
        cmd += ["--nsamples", str(args.nsamples)]
    if method == "autoround":
        cmd += ["--recipe", args.recipe]
        cmd.remove("-q")     # keep its per-block losses in the log
    for kv in filter(None, opts.split(",")):
        cmd += ["-O", kv]
    resumed = dest.with_name(dest.name + ".qgguf-resume").is_dir()
    if resumed:          # an interrupted run of the same command: continue it (its wall time is then partial)
        cmd.append("--resume")
    wall = run(cmd, log)
    rep = convert_report(log)
    return {"wall_s": wall, "peak_rss_bytes": rep.get("peak_rss_bytes"), "command": "qgguf " + " ".join(cmd[1:]),
            "resumed": resumed}


def convert_report(log: Path) -> dict:
    """The ``qgguf convert --json`` report at the end of a conversion's log ({} if there is none)."""
    body = log.read_text()
    start = body.find("\n{")
    if start >= 0:
        try:
            return json.loads(body[start + 1:])
        except ValueError:
            pass
    return {}


def evaluate(path: Path, args, base_cache: Path) -> dict:
    """qgguf's evaluator (KLD against the F32 model, whose logits ``base_cache`` keeps) and llama.cpp's perplexity,
    in a child process each."""
    py = sys.executable
    ours = subprocess.run([str(Path(py).parent / "qgguf"), "eval", str(path), "--text", args.text, "--ctx",
                           str(args.ctx), "--chunks", str(args.chunks), "--base", args.model, "--json", "-t",
                           str(args.threads), "--no-progress", "--base-cache",
                           str(base_cache)], capture_output=True, text=True)
    if ours.returncode != 0:
        raise SystemExit(f"qgguf eval failed on {path}: {ours.stderr[-2000:]}")
    res = {"ours": json.loads(ours.stdout)}
    code = ("import json,sys; sys.path.insert(0, %r); from compare_llamacpp import run_llamacpp; "
            "from qgguf.runtime.evaluate import read_text; "
            "r,_ = run_llamacpp(%r, read_text(%r), %d, %d, None, %d, False, False); print(json.dumps(r))"
            % (str(ROOT / "tools"), str(path), args.text, args.ctx, args.chunks, args.threads))
    lc = subprocess.run([py, "-c", code], capture_output=True, text=True)
    if lc.returncode != 0:
        res["llamacpp_error"] = lc.stderr.strip().splitlines()[-1] if lc.stderr.strip() else "failed"
    else:
        res["llamacpp"] = json.loads(lc.stdout.strip().splitlines()[-1])
    return res


def types_of(path: Path) -> dict:
    from gguf import GGMLQuantizationType

    from qgguf.convert.ggufread import GGUFFile

    mix: dict = {}
    with GGUFFile(path) as f:
        for t in f.tensors:
            if t.name.endswith(".weight") and len(t.ne) == 2:
                name = GGMLQuantizationType(t.ggml_type).name
                mix[name] = mix.get(name, 0) + 1
    return mix


def table(results: list[dict]) -> str:
    lines = []
    for qtype in dict.fromkeys(r["type"] for r in results):
        rows = [r for r in results if r["type"] == qtype]
        ref = next((r for r in rows if r["method"] == "llama.cpp"), None)
        lines += [f"\n**{qtype}** (types: {rows[0].get('mix')})\n",
                  "| method | KLD | KLD / llama.cpp | PPL (qgguf) | PPL (llama.cpp) | PPL ratio | same-top | "
                  "file bytes | wall |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            o, lc = r["eval"]["ours"], r["eval"].get("llamacpp", {})
            rel = o["kld"] / ref["eval"]["ours"]["kld"] if ref else float("nan")
            lppl = lc.get("ppl")
            ratio = f"{o['ppl'] / lppl:.5f}" if lppl else r["eval"].get("llamacpp_error", "-")
            lines.append(f"| {r['method']} | {o['kld']:.4f} | {rel:.3f} | {o['ppl']:.3f} | "
                         f"{lppl if lppl is None else f'{lppl:.3f}'} | {ratio} | {100 * o['same_top']:.2f}% | "
                         f"{r['bytes']:,} | {r['make']['wall_s']:.0f} s{' (resumed)' if r['make'].get('resumed') else ''} |")
    return "\n".join(lines)


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The model, data, evaluation and thread options this tool shares with tools/compare_codebooks.py."""
    ap.add_argument("--model", default=str(ROOT / "out" / "smollm2-f32.gguf"))
    ap.add_argument("--calib", default=str(ROOT.parent / "shared" / "data" / "c4-sample-1000.jsonl"))
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--table-only", action="store_true", help="print the table of the finished runs")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--types", default="Q2_K,Q3_K,Q4_0")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--recipe", default="default", help="AutoRound recipe")
    ap.add_argument("--nsamples", type=int, default=None,
                    help="calibration windows of --ctx tokens, for llama-imatrix and qgguf alike (default: llama-imatrix "
                         "128, each qgguf method its own default: 128, GPTQ 64, AutoRound its recipe)")
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "methods"))
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    text = calib_text(args.calib, args.seed, out / "calib.txt")
    lc_nsamples = args.nsamples or 128
    imatrix = out / ("llamacpp-imatrix.gguf" if lc_nsamples == 128 else f"llamacpp-imatrix-{lc_nsamples}.gguf")
    for qtype in args.types.split(","):
        for method in args.methods.split(","):
            tag = f"{qtype}-{method.replace('.', '').replace(':', '-').replace(',', '-').replace('=', '')}"
            res_path = out / f"{tag}.json"
            if res_path.exists():
                results.append(json.loads(res_path.read_text()))
                continue
            if args.table_only:
                continue
            if method == "llama.cpp":
                llamacpp_imatrix(args.model, text, imatrix, lc_nsamples, args.ctx, args.threads)
            dest = out / f"{tag}.gguf"
            print(f"== {tag}", file=sys.stderr, flush=True)
            made = make_file(method, qtype, args, imatrix, dest, out / f"{tag}.log")
            ev = evaluate(dest, args, out / "base-logits.npy")
            r = {"type": qtype, "method": method, "file": str(dest), "bytes": dest.stat().st_size,
                 "mix": types_of(dest), "make": made, "eval": ev,
                 "date": time.strftime("%Y-%m-%d"), "load": os.getloadavg()}
            res_path.write_text(json.dumps(r, indent=1))
            results.append(r)
            o = ev["ours"]
            print(f"   {tag}: KLD {o['kld']:.4f} PPL {o['ppl']:.3f} bytes {r['bytes']:,} "
                  f"make {made['wall_s']:.0f} s", file=sys.stderr, flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
