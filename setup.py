"""Builds the compiled core only: _core/<name>.pyx -> buttress._core.<name>.

The Cython sources stay in the top-level _core/; the extension modules land in src/buttress/_core/ beside
their .pyi stubs, so the package is a plain src layout and `pip install -e .` is a static path that
type checkers follow (no import hook).

Metadata lives in pyproject.toml. BUTTRESS_PURE_BUILD=1 builds without extensions (a pure wheel).
"""
import glob
import os
import sys

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("BUTTRESS_PURE_BUILD", "") in ("", "0"):
    from Cython.Build import cythonize

    sources = sorted(glob.glob(os.path.join("_core", "*.pyx")))
    cflags = [] if sys.platform == "win32" else ["-O3", "-fno-strict-aliasing"]
    extensions = [
        Extension(
            f"buttress._core.{os.path.splitext(os.path.basename(src))[0]}",
            [src],
            include_dirs=[os.path.join("_core", "include")],
            extra_compile_args=cflags,
        )
        for src in sources
    ]
    ext_modules = cythonize(
        extensions,
        include_path=["_core"],
        compiler_directives={"language_level": 3},
        annotate=os.environ.get("BUTTRESS_ANNOTATE", "") not in ("", "0"),
        nthreads=os.cpu_count() or 1,          # cythonize the modules in parallel
    )

# compile the modules in parallel too (one C compiler per core): the build takes about a minute on 2 cores
setup(ext_modules=ext_modules, options={"build_ext": {"parallel": os.cpu_count() or 1}})
