"""Issue 7: up-front checks (free disk space against the plan's expected bytes, read-only destinations,
--max-memory against the plan's memory estimate), stale temporary files of killed writers, and --seed (the same seed
gives the same bytes for every randomised method)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from qgguf.convert import writer as writer_mod
from qgguf.convert.pipeline import convert
from qgguf.convert.resources import estimate_peak_memory, expected_output_bytes, parse_size
from qgguf.errors import OptionError, OutputError

STORIES = Path("/work/shared/models/stories260K.gguf")
pytestmark = pytest.mark.skipif(not STORIES.exists(), reason="needs stories260K.gguf")
ROOT = Path(__file__).resolve().parents[1]
Usage = namedtuple("Usage", "total used free")


@pytest.fixture(autouse=True)
def _one_thread():
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qgguf", *map(str, args)], capture_output=True, text=True, cwd=cwd)


# ------------------------------------------------------------------ free space
def test_free_space_checked_before_any_work(tmp_path, monkeypatch):
    """Too little free space: OutputError naming the folder, the bytes needed and free, raised before the
    calibration of a block method starts (and nothing is left in the folder)."""
    import qgguf.quantize.blockwise as bw
    free = 50_000
    monkeypatch.setattr(writer_mod.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - free, free))

    def no_work(*a, **k):
        raise AssertionError("calibration started before the free-space check")
    monkeypatch.setattr(bw, "run_blocks", no_work)
    out = tmp_path / "o.gguf"
    with pytest.raises(OutputError) as e:
        convert(STORIES, out, method="gptq", type="Q4_0", nsamples=2, seqlen=16, progress=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and "need" in msg and "50,000 bytes" in msg and "free" in msg
    m = int(msg.split("need ")[1].split(" bytes")[0].replace(",", ""))
    assert m > 16 << 20   # the planned bytes + checkpoints + margin
    assert list(tmp_path.iterdir()) == []


def test_free_space_estimate_matches_the_file(tmp_path):
    """The up-front estimate of the file's bytes is within a few KB of the file written (metadata included)."""
    from qgguf.convert.presets import plan_types
    from qgguf.convert.sources import open_source
    from qgguf import gguf_types
    out = tmp_path / "o.gguf"
    rep = convert(STORIES, out, type="Q4_K_M", progress=False)
    with open_source(STORIES) as src:
        plan = plan_types([(t.name, t.shape) for t in src.tensors], arch=src.arch, n_layer=src.n_layer,
                          n_head=src.n_head, n_head_kv=src.n_head_kv, type="Q4_K_M",
                          float_source_types={t.name: t.src_type for t in src.tensors})
        qtypes = {c.type: gguf_types.get(c.type) for c in plan.choices}
        est, ckpt = expected_output_bytes(plan, qtypes, src.metadata, blockwise=False)
    assert ckpt == 0
    assert abs(est - rep.file_bytes) < 8192, (est, rep.file_bytes)


def test_exact_free_space_is_enough(tmp_path, monkeypatch):
    """The check is not stricter than needed: with just the estimate + margin free, the conversion runs."""
    real = shutil.disk_usage
    seen = []

    def usage(p):
        u = real(p)
        seen.append(p)
        return u
    monkeypatch.setattr(writer_mod.shutil, "disk_usage", usage)
    convert(STORIES, tmp_path / "o.gguf", type="Q8_0", progress=False)
    assert seen   # checked (up front and at open)


# ------------------------------------------------------------------ read-only destinations
def test_read_only_folder_by_access(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod.os, "access", lambda p, mode: False)
    with pytest.raises(OutputError, match="not writable"):
        convert(STORIES, tmp_path / "o.gguf", type="Q8_0", progress=False)


def test_read_only_file_system_probe(tmp_path, monkeypatch):
    """root passes os.access on a read-only mount: the probe file catches it (EROFS)."""
    def erofs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(writer_mod.tempfile, "mkstemp", erofs)
    with pytest.raises(OutputError, match="read-only file system") as e:
        convert(STORIES, tmp_path / "o.gguf", type="Q8_0", progress=False)
    assert str(tmp_path) in str(e.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write a mode-555 folder")
def test_read_only_folder_chmod(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        r = cli("convert", STORIES, "-o", d / "o.gguf", "--type", "Q8_0", "-q")
        assert r.returncode == 2 and "not writable" in r.stderr
    finally:
        d.chmod(0o755)


def test_cli_read_only_one_line_error(tmp_path):
    """A missing destination folder: one line, exit code 2, nothing written."""
    r = cli("convert", STORIES, "-o", tmp_path / "nope" / "o.gguf", "--type", "Q8_0", "-q")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr


# ------------------------------------------------------------------ stale temporary files
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_of_a_killed_writer_is_removed(tmp_path):
    out = tmp_path / "o.gguf"
    dead = tmp_path / f".o.gguf{writer_mod.TMP_INFIX}{_dead_pid()}"
    live = tmp_path / f".o.gguf{writer_mod.TMP_INFIX}{os.getppid()}"     # a running process: left alone
    other = tmp_path / f".x.gguf{writer_mod.TMP_INFIX}{_dead_pid()}"     # another destination's: left alone
    for p in (dead, live, other):
        p.write_bytes(b"GGUF partial")
    convert(STORIES, out, type="Q8_0", progress=False)
    assert out.exists() and not dead.exists() and live.exists() and other.exists()


def test_writer_killed_mid_write_leaves_no_destination(tmp_path):
    """A writer process that dies (os._exit: no cleanup) after half its tensors: the destination does not exist,
    its temporary file does; the next conversion to that destination removes it and succeeds."""
    out = tmp_path / "o.gguf"
    code = f"""
import os, numpy as np
from qgguf.convert.writer import OutputFile
of = OutputFile({str(out)!r}, "llama")
for i in range(4):
    of.plan_tensor(f"t{{i}}", (64,), 0, 256)
of.open()
of.write_tensor("t0", np.zeros(64, np.float32))
of.write_tensor("t1", np.zeros(64, np.float32))
of._writer.flush()
os._exit(9)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    left = [p.name for p in tmp_path.iterdir()]
    assert not out.exists() and len(left) == 1 and writer_mod.TMP_INFIX in left[0]
    convert(STORIES, out, type="Q8_0", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["o.gguf"]


# ------------------------------------------------------------------ --max-memory
@pytest.mark.parametrize("text,want", [("2GB", 2 * 10**9), ("1500MB", 1500 * 10**6), ("1.5GiB", 3 * 2**29),
                                       ("4g", 4 * 10**9), ("123456", 123456), (" 64 MiB ", 64 * 2**20),
                                       (10**9, 10**9)])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "GB", "2XB", "-1GB", "0", "1e9", "two", True])
def test_parse_size_bad(text):
    with pytest.raises(OptionError):
        parse_size(text)


def test_max_memory_refuses_before_work(tmp_path):
    r = cli("convert", STORIES, "-o", tmp_path / "o.gguf", "--method", "gptq", "--nsamples", "4", "--seqlen",
            "32", "--type", "Q4_0", "--max-memory", "100MB")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert "--max-memory 100MB" in r.stderr and "GiB" in r.stderr
    assert list(tmp_path.iterdir()) == []
    r = cli("convert", STORIES, "-o", tmp_path / "o.gguf", "--type", "Q4_0", "--max-memory", "lots")
    assert r.returncode == 2 and "--max-memory" in r.stderr


def test_max_memory_fits_and_json_reports_peak(tmp_path):
    r = cli("convert", STORIES, "-o", tmp_path / "o.gguf", "--type", "Q4_0", "--max-memory", "2GB", "--json", "-q")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["peak_rss_bytes"] > 10 << 20
    assert 100 << 20 < rep["estimated_peak_bytes"] < 2 * 10**9


def test_memory_estimate_grows_with_the_plan():
    """More calibration tokens, a method with Adam fine-tuning, and sampling from the float model cost more."""
    from qgguf.convert.presets import plan_types
    from qgguf.convert.sources import open_source
    from qgguf.quantize.base import get_method

    with open_source(STORIES) as src:
        plan = plan_types([(t.name, t.shape) for t in src.tensors], arch=src.arch, n_layer=src.n_layer,
                          n_head=src.n_head, n_head_kv=src.n_head_kv, type="Q4_0", has_imatrix=True,
                          float_source_types={t.name: t.src_type for t in src.tensors})
        rtn = estimate_peak_memory(src, plan, get_method("rtn"), False, 128, 512)
        g1 = estimate_peak_memory(src, plan, get_method("gptq"), True, 16, 64, calib="x.txt")
        g2 = estimate_peak_memory(src, plan, get_method("gptq"), True, 128, 512, calib="x.txt")
        ar = estimate_peak_memory(src, plan, get_method("autoround", init="rtn"), True, 16, 64, calib="x.txt")
        ar_gptq = estimate_peak_memory(src, plan, get_method("autoround", init="gptq"), True, 16, 64, calib="x.txt")
        selfcal = estimate_peak_memory(src, plan, get_method("gptq"), True, 16, 64, calib="self")
    assert rtn.total < g1.total < g2.total
    assert ar.block["Gram matrices"] == 0 < ar_gptq.block["Gram matrices"] == g1.block["Gram matrices"]
    assert ar.block["one block's weights"] == 2 * g1.block["one block's weights"]   # Adam's moments
    assert "calibration through the float model" in selfcal.parts and selfcal.total >= g1.total
    # 128 x 512 tokens through 3 x 64 + 64 + 172 float32 columns of activations at least
    assert g2.total - g2.base >= 128 * 512 * 4 * (3 * 64 + 64 + 172)


# ------------------------------------------------------------------ --seed
def _methods():
    from qgguf.quantize.base import get_method
    out = [("aq", dict(method="aq", aq_config="aq-1x8-g8",
                       method_options=dict(max_rounds=1, kmeans_iters=4, ft_epochs=1, kmeans_points=2048))),
           ("autoround", dict(method="autoround", method_options=dict(iters=4))),
           ("gptq-calib-self", dict(method="gptq"))]
    try:
        get_method("vq")
        out.append(("vq", dict(method="vq")))
    except Exception:   # noqa: BLE001 - VQ not registered in this tree
        pass
    return out


@pytest.mark.parametrize("name,kw", _methods(), ids=lambda v: v if isinstance(v, str) else "")
def test_same_seed_same_bytes(tmp_path, name, kw):
    """Every randomised method (and --calib self sampling) is a function of --seed: seed 0 twice gives the same
    file, seed 1 a different one."""
    outs = []
    for i, seed in enumerate((0, 0, 1)):
        out = tmp_path / f"{i}.gguf"
        convert(STORIES, out, type="Q4_0", nsamples=4, seqlen=32, seed=seed, progress=False, **kw)
        outs.append(sha(out))
    assert outs[0] == outs[1], name
    assert outs[0] != outs[2], f"{name}: --seed changes nothing"


# ------------------------------------------------------------------ chunked safetensors reads (bounded RSS)
def _synthetic_hf():
    import importlib.util
    spec = importlib.util.spec_from_file_location("_qgguf_synthetic_hf", ROOT / "tools" / "synthetic_hf.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_chunked_safetensors_reads_are_exact(tmp_path, monkeypatch, dtype):
    """The HF source reads tensors in chunks (releasing each chunk's mapped pages); tiny chunks that split rows give
    exactly the values of the file: bf16 widened, f16 converted, f32 as stored."""
    import struct
    from qgguf.convert import sources
    d = tmp_path / "hf"
    _synthetic_hf().write_hf(d, "tiny", dtype, seed=5)
    raw = (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    monkeypatch.setattr(sources._SafetensorsIndex, "CHUNK_BYTES", 1000)   # 500 bf16 values: splits rows
    src = sources.open_source(d)
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            buf = raw[8 + n + a:8 + n + b]
            if dtype == "BF16":
                want = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                want = np.frombuffer(buf, "<f2" if dtype == "F16" else "<f4").astype(np.float32)
            got = src.st.load(name)
            assert got.dtype == np.float32 and got.flags.writeable and got.shape == tuple(info["shape"])
            np.testing.assert_array_equal(got.reshape(-1), want, err_msg=name)
    finally:
        src.close()


def test_synthetic_hf_folder_converts(tmp_path):
    """tools/synthetic_hf.py writes a folder that qgguf converts and runs (the 1B-shape memory benchmark's input)."""
    d = tmp_path / "hf"
    mod = _synthetic_hf()
    r = mod.write_hf(d, "tiny", "BF16", seed=1)
    assert r["bytes"] == (d / "model.safetensors").stat().st_size
    n_params = sum(int(np.prod(s)) for _, s, _ in mod.hf_tensors(mod.SHAPES["tiny"], 512))
    assert r["bytes"] == 2 * n_params + 8 + int.from_bytes((d / "model.safetensors").read_bytes()[:8], "little")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    out = tmp_path / "o.gguf"
    rep = convert(d, out, type="Q8_0", progress=False)
    assert rep.n_params == n_params == 292800
    from qgguf.runtime.model import LlamaModel
    m = LlamaModel.from_gguf(out)
    logits = np.asarray(m.forward(np.array([1, 2, 3]), 0))
    assert logits.shape == (3, 512) and np.isfinite(logits).all()


def test_disk_full_while_checkpointing(tmp_path, monkeypatch):
    """The disk filling up during the blocks (after the up-front check): one OutputError naming the checkpoint,
    no output file, no half-written checkpoint file; the blocks saved before stay for --resume."""
    import qgguf.quantize.blockwise as bw
    calls = []
    real = bw.os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) >= 3:   # run.json and block 0 fit, block 1 does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)
    monkeypatch.setattr(bw.os, "fsync", fsync)
    out = tmp_path / "o.gguf"
    with pytest.raises(OutputError, match="No space left on device") as e:
        convert(STORIES, out, method="gptq", type="Q4_0", nsamples=2, seqlen=16, progress=False)
    assert "blk.1.npz" in str(e.value)
    ck = tmp_path / "o.gguf.qgguf-resume"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf.qgguf-resume"]
    assert sorted(p.name for p in ck.iterdir()) == ["blk.0.npz", "run.json"]
