"""Build script: compiles the Cython core unless told not to.

GOAWAY_EXT_NO_EXTENSIONS=1    skip the compile; the package runs on ``_core_py``.
GOAWAY_EXT_REQUIRE_EXTENSIONS=1  a failed compile fails the build (wheels, CI).
Neither: try to compile, and on failure warn and install the pure-Python core.
GOAWAY_EXT_CFLAGS / GOAWAY_EXT_LDFLAGS  replace the default -g0 / -s (stripped module).
GOAWAY_EXT_LINETRACE=1        compile with Cython's line tracing, so coverage can measure
                              the .pyx (make coverage's separate build only: it is slower).

``cythonize()`` would reset ``optional=True`` on the extension, so the module is
declared with ``Cython.Distutils.Extension`` and built by Cython's ``build_ext``.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


NO_EXTENSIONS = _flag("GOAWAY_EXT_NO_EXTENSIONS")
REQUIRE_EXTENSIONS = _flag("GOAWAY_EXT_REQUIRE_EXTENSIONS")

if NO_EXTENSIONS and REQUIRE_EXTENSIONS:
    sys.exit("GOAWAY_EXT_NO_EXTENSIONS and GOAWAY_EXT_REQUIRE_EXTENSIONS are both set; pick one")

setup_kwargs: dict[str, object] = {}

if not NO_EXTENSIONS:
    try:
        from Cython.Distutils import Extension, build_ext
    except ImportError:
        if REQUIRE_EXTENSIONS:
            raise
        print("warning: Cython is not installed; installing the pure-Python core", file=sys.stderr)
    else:
        # By default the module ships without debug info and symbols (-g0, -s):
        # 824 KB unstripped against about 130 KB, for nothing a user runs. A
        # build that sets its own flags (``make asan``: -g) keeps what it asks for.
        extra_compile_args = os.environ.get("GOAWAY_EXT_CFLAGS", "-g0").split()
        extra_link_args = os.environ.get("GOAWAY_EXT_LDFLAGS", "-s").split()

        class _BuildExt(build_ext):  # type: ignore[misc]
            """Cython's build_ext, with a warning instead of a failure when optional."""

            def run(self) -> None:
                try:
                    super().run()
                except Exception as exc:
                    if REQUIRE_EXTENSIONS:
                        raise
                    print(f"warning: the Cython core was not built ({exc}); using pure Python", file=sys.stderr)

            def build_extension(self, ext: object) -> None:
                try:
                    super().build_extension(ext)
                except Exception as exc:
                    if REQUIRE_EXTENSIONS:
                        raise
                    print(f"warning: the Cython core was not built ({exc}); using pure Python", file=sys.stderr)

        setup_kwargs["ext_modules"] = [
            Extension(
                "goaway_ext._core_c",
                ["goaway_ext/_core_c.pyx"],
                optional=not REQUIRE_EXTENSIONS,
                extra_compile_args=extra_compile_args,
                extra_link_args=extra_link_args,
                define_macros=[("CYTHON_TRACE", "1")] if _flag("GOAWAY_EXT_LINETRACE") else [],
                cython_directives={
                    "linetrace": _flag("GOAWAY_EXT_LINETRACE"),
                    "language_level": "3",
                    "embedsignature": True,
                    "boundscheck": False,
                    "wraparound": False,
                    "cdivision": True,
                },
            )
        ]
        setup_kwargs["cmdclass"] = {"build_ext": _BuildExt}

setup(**setup_kwargs)  # type: ignore[arg-type]
