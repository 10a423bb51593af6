"""Only here to hook the cffi build of qgguf's native kernels (all metadata is in pyproject.toml).

The native module is optional at install time: when the C compiler fails, the install still
succeeds, the compiler's message is saved next to the package (qgguf/native/_build_error.txt),
and ``qgguf.native`` reports it (``available()`` is False; using a kernel raises a QggufError
naming the problem).  Set QGGUF_NATIVE_REQUIRED=1 to make a failed build fail the install.
"""
import os
import subprocess

from setuptools import setup
from setuptools.command.build_ext import build_ext

ERROR_FILE = "_build_error.txt"


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        err_path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), ERROR_FILE)
        log = []
        orig_spawn = self.compiler.spawn

        def spawn(cmd, **kw):  # keep the compiler's own message for the error report
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, env=kw.get("env"))
            except OSError as e:
                log.append(f"cannot run {cmd[0]!r}: {e}")
                raise
            out = (p.stdout or "") + (p.stderr or "")
            if out.strip():
                print(out, end="")
            if p.returncode != 0:
                log.append(f"$ {' '.join(cmd)}\n{out}")
                raise OSError(f"{cmd[0]!r} failed with exit code {p.returncode}")

        self.compiler.spawn = spawn
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - any compiler/linker problem
            if os.environ.get("QGGUF_NATIVE_REQUIRED"):
                raise
            msg = f"building {ext.name} failed: {e}\n" + "\n".join(log)[-6000:]
            os.makedirs(os.path.dirname(err_path), exist_ok=True)
            with open(err_path, "w") as f:
                f.write(msg)
            self.warn(f"qgguf native kernels not built (see {err_path}): {e}")
        else:
            if os.path.exists(err_path):
                os.remove(err_path)
        finally:
            self.compiler.spawn = orig_spawn


setup(
    cmdclass={"build_ext": OptionalBuildExt},
    cffi_modules=["src/qgguf/native/_build.py:ffibuilder"],
)
