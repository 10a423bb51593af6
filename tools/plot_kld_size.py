#!/usr/bin/env python3
"""Draw KL divergence against file size from tools/bench_mixed.py's measured results (docs/kld_vs_size.png).

    .venv/bin/python tools/plot_kld_size.py bench-out/mixed/results.json [bench-out/mixed-stories/results.json] \\
        -o docs/kld_vs_size.png [--titles T1 T2] [--point 'AQ 2-bit=57800000:2.78']

Every point is a measured file: llama.cpp's presets (with importance matrix) and qgguf's budgets; ``--point``
adds a measured figure from elsewhere (NAME=BYTES:KLD, e.g. the AQ 2-bit file of docs/BENCHMARKS.md).
Entries without a KLD (not evaluated yet) are skipped. One panel per results argument; ``A.json+B.json`` draws
several results files in one panel (e.g. the SmolLM2 presets and the AQ mix of bench-out/mixed-aq).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results.json of tools/bench_mixed.py (A.json+B.json: one panel)")
    ap.add_argument("-o", "--out", default="docs/kld_vs_size.png")
    ap.add_argument("--point", action="append", default=[], metavar="NAME=BYTES:KLD")
    ap.add_argument("--titles", nargs="*", default=[], help="one title per results file (one panel each)")
    args = ap.parse_args()

    panels = []
    for i, path in enumerate(args.results):
        series: dict[str, list[tuple[float, float, str]]] = {}
        entries = {}
        for part in path.split("+"):
            entries.update(json.loads(Path(part).read_text()))
        for key, e in entries.items():
            if key.startswith("_") or e.get("kld") is None:
                continue
            if e.get("kind") == "llama.cpp":
                label, name = "llama.cpp presets (imatrix)", e["preset"]
            else:
                extra = f", types {e['mix_types']}" if e.get("mix_types") else ""
                label, name = f"qgguf measured mix ({e.get('method', '?')}{extra})", key.split("@", 1)[-1]
            series.setdefault(label, []).append((e["file_bytes"] / 1e6, float(e["kld"]), name))
        if i == 0:
            for item in args.point:
                name, _, rest = item.partition("=")
                b_, _, k = rest.partition(":")
                series.setdefault(name, []).append((int(b_) / 1e6, float(k), name))
        if series:
            panels.append((args.titles[i] if i < len(args.titles) else Path(path.split("+")[0]).parent.name, series))
    if not panels:
        raise SystemExit("no evaluated entries")

    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5), dpi=110, squeeze=False)
    colors = ["tab:red", "tab:orange", "tab:purple", "tab:green"]
    for ax, (title, series) in zip(axes[0], panels):
        q = 0
        for label, pts in series.items():
            pts.sort()
            if label.startswith("llama.cpp"):
                m, c = "o", "tab:blue"
            elif label.startswith("qgguf"):
                m, c = "s", colors[q % len(colors)]
                q += 1
            else:
                m, c = "D", "tab:green"
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, marker=m, linestyle="-" if len(pts) > 1 else "", color=c, label=label)
            for x, y, n in pts:
                ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=c)
        ax.set_xlabel("file size (MB, 10^6 bytes)")
        ax.set_ylabel("mean KL divergence to the float model (log scale)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(args.out)
    tmp = out.with_name("." + out.name + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
