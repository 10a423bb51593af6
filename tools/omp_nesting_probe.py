#!/usr/bin/env python3
"""Nested OpenMP teams under torch: the end-to-end stage's slowdown, reproduced in seconds.

Each case runs in a fresh process: a forward and backward of SmolLM2-135M-sized attention (CPU flash attention),
an MLP matmul and ``exp`` -- the operations in which MKL runs inside torch's own parallel regions -- on
``--threads`` torch threads. The cases differ only in what happens first:

* ``torch-first``: torch imported before numba's OpenMP pool starts (each keeps its own OpenMP runtime);
* ``numba-first``: ``numba.set_num_threads`` before ``import torch`` (what the convert pipeline did until
  session 10): torch binds to the system libgomp that numba loaded, with nesting allowed;
* ``numba-first+guard``: the same, then qgguf's ``set_torch_threads`` (``runtime/threads.py``).

Reported per case: seconds per iteration, threads created (the kernel's last PID before and after, modulo pid_max; run it on an
otherwise idle machine) and max-active-levels of the OpenMP runtimes. Usage:
``python tools/omp_nesting_probe.py [--iters 10] [--threads 2] [--json]``."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASE = r"""
import ctypes, json, sys, time
case, iters, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if case.startswith("numba-first"):
    import numba
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
import torch
if case == "torch-first":
    import numba
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
torch.set_num_threads(threads)
if case.endswith("+guard"):
    from qgguf.runtime.threads import set_torch_threads
    set_torch_threads(threads)
def levels():
    return {p: ctypes.CDLL(p).omp_get_max_active_levels()
            for p in sorted({l.rsplit(None, 1)[-1] for l in open('/proc/self/maps') if 'libgomp' in l})}
def last_pid():
    return int(open('/proc/loadavg').read().split()[-1])
g = torch.Generator().manual_seed(0)
B, T, H, D, E, F = 4, 256, 9, 64, 576, 1536
q, k, v = (torch.randn(B, H, T, D, generator=g, requires_grad=True) for _ in range(3))
x = torch.randn(B, T, E, generator=g, requires_grad=True)
w = torch.randn(E, F, generator=g, requires_grad=True)
def step():
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    (o.square().mean() + torch.exp(0.01 * (x @ w)).mean()).backward()
step()
p0 = last_pid(); t0 = time.perf_counter()
for _ in range(iters):
    step()
dt = (time.perf_counter() - t0) / iters
pid_max = int(open('/proc/sys/kernel/pid_max').read())
print(json.dumps({"case": case, "s_per_iter": dt, "threads_created": (last_pid() - p0) % pid_max, "max_active_levels": levels()}))
"""

CASES = ("torch-first", "numba-first", "numba-first+guard")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    rows = []
    for case in CASES:
        r = subprocess.run([sys.executable, "-c", CASE, case, str(a.iters), str(a.threads)], capture_output=True,
                           text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    base = rows[0]["s_per_iter"]
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            lv = ",".join(str(v) for v in r["max_active_levels"].values())
            print(f"{r['case']:<20} {r['s_per_iter']:.3f} s/iter ({r['s_per_iter'] / base:.2f}x)  "
                  f"threads created {r['threads_created']:>6}  max-active-levels {lv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
