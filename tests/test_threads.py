"""runtime/threads.py: no nested OpenMP teams under torch. numba's OpenMP pool allows nested regions on the
thread that starts it; when it loaded the system libgomp before torch, torch shares that runtime and MKL inside
torch's parallel regions starts a nested team (new threads) on every call. The convert pipeline imports torch
first, and every torch thread setting (and the end-to-end stage) sets max-active-levels back to 1."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K.gguf"

# max-active-levels of every OpenMP runtime in the process, as JSON on the last line
_LEVELS = textwrap.dedent("""
    import ctypes, json
    def levels():
        out = {}
        for p in sorted({l.rsplit(None, 1)[-1] for l in open('/proc/self/maps') if 'libgomp' in l}):
            out[p] = ctypes.CDLL(p).omp_get_max_active_levels()
        return out
""")


def _run(body: str) -> str:
    r = subprocess.run([sys.executable, "-c", _LEVELS + textwrap.dedent(body)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def test_set_torch_threads_turns_nesting_off_after_numbas_pool():
    import json
    out = json.loads(_run("""
        import numba
        numba.set_num_threads(2)
        if numba.threading_layer() != "omp":
            print(json.dumps({"skip": numba.threading_layer()})); raise SystemExit
        import torch
        before = levels()
        from qgguf.runtime.threads import set_torch_threads
        set_torch_threads(2)
        print(json.dumps({"before": before, "after": levels()}))
    """))
    if "skip" in out:
        pytest.skip(f"numba's threading layer is {out['skip']}, not OpenMP")
    assert max(out["before"].values()) > 1          # the hazard: numba left nesting allowed
    assert out["after"] and set(out["after"].values()) == {1}


@pytest.mark.skipif(not STORIES.is_file(), reason="no stories260K")
def test_convert_with_threads_leaves_torch_without_nesting(tmp_path: Path):
    import json
    out = json.loads(_run(f"""
        from qgguf.convert.pipeline import convert
        convert({str(STORIES)!r}, {str(tmp_path / 'o.gguf')!r}, type="Q8_0", threads=2, progress=False)
        import torch
        x = torch.randn(256, 256); (x @ x).sum()
        print(json.dumps(levels()))
    """))
    assert out and set(out.values()) == {1}


def test_the_end_to_end_stage_sets_it(monkeypatch):
    from qgguf.quantize import finetune
    from qgguf.runtime import threads
    calls = []
    monkeypatch.setattr(threads, "no_nested_openmp", lambda: calls.append(1) or 1)
    with pytest.raises(Exception):
        finetune.finetune_model(None, None, None, None, None)   # fails on the missing parts after the call
    assert calls == [1]
