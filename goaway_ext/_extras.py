"""The optional extras, and the error a user sees when one is missing.

``goaway_ext.httpx`` and ``goaway_ext.hypercorn`` import libraries that are not
dependencies of the package; a bare ``No module named 'httpcore'`` does not tell
the user which extra brings it, so those modules raise :func:`missing_extra`.
"""

from __future__ import annotations


def missing_extra(module: str, extra: str, exc: ModuleNotFoundError) -> ModuleNotFoundError:
    """A ``ModuleNotFoundError`` that names the missing library and the extra that installs it."""
    return ModuleNotFoundError(
        f"{module} needs {exc.name}, which is not installed: install goaway_ext with its {extra!r} extra, "
        f"pip install '.[{extra}]' in a checkout or pip install 'goaway_ext-VERSION-....whl[{extra}]'",
        name=exc.name,
    )
