"""``--method imatrix``: llama.cpp's importance matrix (per weight, the mean of x^2 of its inputs over
the calibration tokens), collected with qgguf's own forward pass on the (dequantized) source, then each
tensor quantized with the type's importance-weighted search.

Files: ``--imatrix-out FILE`` writes the GGUF imatrix format that llama.cpp's ``llama-imatrix`` writes and
``llama-quantize`` reads (``general.type = imatrix``, ``imatrix.datasets``, ``imatrix.chunk_count``,
``imatrix.chunk_size``; per weight ``<name>.in_sum2`` (sums of x^2, ne = [n, 1]) and ``<name>.counts``
(tokens, ne = [1, 1])). ``--imatrix FILE`` reads that format or the legacy ``.dat`` one.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from ..errors import InputFileError, OptionError, OutputError, UnsupportedModelError
from .base import Method, QuantContext


class IMatrixData:
    """Sums of x^2 and token counts per weight name (one row: dense models)."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.datasets: list[str] = []
        self.chunk_count = 0
        self.chunk_size = 0

    def add(self, name: str, sum2: np.ndarray, n: int) -> None:
        cur = self.sums.get(name)
        if cur is None:
            self.sums[name] = np.asarray(sum2, dtype=np.float64).copy()
            self.counts[name] = int(n)
        else:
            cur += sum2
            self.counts[name] += int(n)

    def importance(self) -> dict[str, np.ndarray]:
        return {k: (v / max(1, self.counts[k])).astype(np.float32) for k, v in self.sums.items()}

    # --- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from gguf import GGUFWriter
        path = Path(path)
        if not path.parent.is_dir():
            raise OutputError("folder does not exist", path.parent)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            w = GGUFWriter(str(tmp), arch="llama")
            w.kv_data[0].pop("general.architecture", None)
            w.add_string("general.type", "imatrix")
            w.add_array("imatrix.datasets", self.datasets or ["unknown"])
            w.add_uint32("imatrix.chunk_count", int(self.chunk_count))
            w.add_uint32("imatrix.chunk_size", int(self.chunk_size))
            for name in sorted(self.sums):
                s = self.sums[name].astype(np.float32).reshape(1, -1)
                c = np.array([[float(self.counts[name])]], dtype=np.float32)
                w.add_tensor(f"{name}.in_sum2", s)
                w.add_tensor(f"{name}.counts", c)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            tmp.replace(path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write imatrix: {e.strerror}", path) from None

    @classmethod
    def load(cls, path: str | Path) -> "IMatrixData":
        path = Path(path)
        if not path.is_file():
            raise InputFileError("no such imatrix file", path)
        with open(path, "rb") as f:
            magic = f.read(4)
        d = cls()
        if magic == b"GGUF":
            from ..convert.ggufread import GGUFFile
            with GGUFFile(path) as g:
                ds = g.get("imatrix.datasets", []) or []
                if isinstance(ds, str):
                    ds = [ds]
                if not isinstance(ds, list) or not all(isinstance(x, str) for x in ds):
                    raise InputFileError("imatrix.datasets must be an array of strings", path)
                d.datasets = list(ds)
                for key in ("imatrix.chunk_count", "imatrix.chunk_size"):
                    v = g.get(key, 0) or 0
                    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                        raise InputFileError(f"{key} must be a non-negative integer, got {v!r}", path)
                d.chunk_count = int(g.get("imatrix.chunk_count", 0) or 0)
                d.chunk_size = int(g.get("imatrix.chunk_size", 0) or 0)
                by = {t.name: t for t in g.tensors}
                for tn, t in by.items():
                    if not tn.endswith(".in_sum2"):
                        continue
                    base = tn[: -len(".in_sum2")]
                    ct = by.get(base + ".counts")
                    if ct is None or t.ggml_type != 0 or ct.ggml_type != 0:
                        raise InputFileError(f"imatrix entry {base!r} lacks F32 counts", path)
                    sums = g.raw(t).view(np.float32).reshape(t.shape)
                    counts = g.raw(ct).view(np.float32).reshape(-1)
                    if sums.ndim > 2 or (sums.ndim == 2 and sums.shape[0] > 1):
                        raise UnsupportedModelError(f"imatrix entry {base!r} has per-expert rows", path)
                    if counts.size < 1 or not np.isfinite(counts[0]) or not 0 <= counts[0] < 2 ** 53:
                        raise InputFileError(f"imatrix entry {base!r} has an invalid count "
                                             f"{counts[:1].tolist()}", path)
                    d.sums[base] = sums.reshape(-1).astype(np.float64)
                    d.counts[base] = int(counts[0])
            return d
        # legacy .dat: n_entries, then (len, name, ncall, nval, values[nval]) each; values = mean * ncall
        try:
            raw = path.read_bytes()
            pos = 0
            n = struct.unpack_from("<i", raw, pos)[0]; pos += 4
            if n <= 0 or n > 1_000_000:
                raise ValueError(f"bad entry count {n}")
            for _ in range(n):
                ln = struct.unpack_from("<i", raw, pos)[0]; pos += 4
                if not 0 < ln <= len(raw) - pos:
                    raise ValueError(f"bad name length {ln} at byte {pos - 4}")
                name = raw[pos:pos + ln].decode("utf-8"); pos += ln
                ncall, nval = struct.unpack_from("<ii", raw, pos); pos += 8
                if not 0 < nval <= (len(raw) - pos) // 4 or ncall < 0:
                    raise ValueError(f"entry {name!r}: bad value count {nval} or call count {ncall}")
                if name in d.sums:
                    raise ValueError(f"entry {name!r} appears twice")
                vals = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float64); pos += 4 * nval
                # store as sums/counts so that importance() = values / ncall
                d.sums[name] = vals
                d.counts[name] = max(1, ncall)
            if pos + 4 <= len(raw):
                d.chunk_count = struct.unpack_from("<i", raw, pos)[0]; pos += 4
                if pos + 4 <= len(raw):
                    ln = struct.unpack_from("<i", raw, pos)[0]; pos += 4
                    if not 0 <= ln <= len(raw) - pos:
                        raise ValueError(f"bad dataset name length {ln}")
                    d.datasets = [raw[pos:pos + ln].decode("utf-8", "replace")]
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise InputFileError(f"not an imatrix file (GGUF or legacy .dat): {e}", path) from None
        return d


def model_for_source(source, threads: int | None = None):
    """qgguf's runtime model with the source's weights dequantized to float32."""
    from ..runtime.model import LlamaModel

    names = {t.name for t in source.tensors}
    md = {k: v.value for k, v in source.metadata.items()}
    md["general.architecture"] = source.arch
    return LlamaModel.from_tensors(md, lambda n: source.load(n) if n in names else None, source.path, threads)


def collect(source, calib=None, nsamples: int = 128, seqlen: int = 512, seed: int = 0,
            threads: int | None = None, progress: bool = True) -> IMatrixData:
    """Run the calibration sequences through the source model and accumulate sum(x^2) per weight."""
    import torch
    from ..runtime.tokenizer import Tokenizer
    from .calib import calibration_sequences

    model = model_for_source(source, threads)
    md = {k: v.value for k, v in source.metadata.items()}
    tok = Tokenizer(md, source=source.path) if calib not in (None, "self") else None
    seqs, dataset = calibration_sequences(calib, model, tok, md, nsamples, seqlen, seed, progress)
    d = IMatrixData()
    d.datasets = [dataset]
    d.chunk_size = seqlen

    def cb(name, x):
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        d.add(name, (x * x).sum(0).numpy(), x.shape[0])

    it = seqs
    if progress:
        from tqdm import tqdm
        it = tqdm(seqs, desc="imatrix", unit="seq", leave=False)
    with torch.no_grad(), model.capture_linear_inputs(cb):
        for s in it:
            model.reset()
            model.forward(s, 0)
            d.chunk_count += 1
    model.reset()
    return d


class IMatrix(Method):
    name = "imatrix"
    needs_calibration = True

    def __init__(self, calib=None, nsamples: int | None = 128, seqlen: int | None = 512, imatrix=None, imatrix_out=None, **_):
        self.calib, self.nsamples, self.seqlen = calib, int(nsamples or 128), int(seqlen or 512)
        self.imatrix_file, self.imatrix_out = imatrix, imatrix_out
        self.data: IMatrixData | None = None

    def prepare(self, source, plan, ctx: QuantContext) -> None:
        from ..convert.ggufread import MetaValue
        if self.imatrix_file:
            self.data = IMatrixData.load(self.imatrix_file)
            src_name = str(self.imatrix_file)
        else:
            self.data = collect(source, self.calib, self.nsamples, self.seqlen, ctx.seed, ctx.threads, ctx.progress)
            src_name = "qgguf:" + (self.data.datasets[0] if self.data.datasets else "self")
        if not self.data.sums:
            raise OptionError("the importance matrix is empty")
        for k, v in self.data.sums.items():
            if not np.all(np.isfinite(v)):
                if self.imatrix_file:
                    raise InputFileError(f"importance matrix entry {k!r} has non-finite values", self.imatrix_file)
                raise OptionError(f"importance matrix entry {k!r} has non-finite values")
        if self.imatrix_out:
            self.data.save(self.imatrix_out)
        ctx.importance = self.data.importance()
        S, I32 = GGUFValueType.STRING, GGUFValueType.INT32
        ctx.metadata["quantize.imatrix.file"] = MetaValue(src_name, S)
        if self.data.datasets:
            ctx.metadata["quantize.imatrix.dataset"] = MetaValue(self.data.datasets[0], S)
        ctx.metadata["quantize.imatrix.entries_count"] = MetaValue(len(self.data.sums), I32)
        ctx.metadata["quantize.imatrix.chunks_count"] = MetaValue(int(self.data.chunk_count), I32)

    def quantize_tensor(self, name: str, w: np.ndarray, qtype, ctx: QuantContext) -> np.ndarray:
        imp = None if qtype.is_float else ctx.importance_for(name, w.shape[-1])
        return qtype.quantize(w, imp)
