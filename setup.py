"""Only here to hook the cffi build of qgguf's native kernels (all metadata is in pyproject.toml).

The native module is optional at install time: when the C compiler fails, the install still
succeeds, the compiler's message is saved next to the package (qgguf/native/_build_error.txt),
and ``qgguf.native`` reports it (``available()`` is False; using a kernel raises a QggufError
naming the problem).  Set QGGUF_NATIVE_REQUIRED=1 to make a failed build fail the install.
"""
import os
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_ext import build_ext

ERROR_FILE = "_build_error.txt"


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        err_path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), ERROR_FILE)
        # keep the compiler's own messages (its stderr, however it is spawned) for the report
        with tempfile.TemporaryFile(mode="w+b") as cap:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(cap.fileno(), 2)
            try:
                super().build_extension(ext)
                error = None
            except Exception as e:  # noqa: BLE001 - any compiler/linker problem
                error = e
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
            cap.seek(0)
            output = cap.read().decode(errors="replace")
        if output:
            sys.stderr.write(output)
        if error is None:
            if os.path.exists(err_path):
                os.remove(err_path)
            return
        if os.environ.get("QGGUF_NATIVE_REQUIRED"):
            raise error
        msg = f"building {ext.name} failed: {error}\ncompiler output:\n{output[-6000:]}"
        os.makedirs(os.path.dirname(err_path), exist_ok=True)
        with open(err_path, "w") as f:
            f.write(msg)
        self.warn(f"qgguf native kernels not built (see {err_path}): {error}")


setup(
    cmdclass={"build_ext": OptionalBuildExt},
    cffi_modules=["src/qgguf/native/_build.py:ffibuilder"],
)
