"""Every public name is documented: in docs/api.md, in the README's API section, with a docstring.

The public names are the ``__all__`` of ``goaway_ext`` and of each of its modules whose
name does not start with an underscore (the integrations included). A name added to an
``__all__`` without a line in both documents, or a class or function without a
docstring, fails here rather than in a user's editor.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
API_MD = ROOT / "docs" / "api.md"
README = ROOT / "README.md"


def _public_modules() -> list[str]:
    # goaway_ext and every module or subpackage of it whose name does not start with "_".
    import goaway_ext

    found = [f"goaway_ext.{m.name}" for m in pkgutil.iter_modules(goaway_ext.__path__) if not m.name.startswith("_")]
    return ["goaway_ext", *sorted(found)]


def _public(module: ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    assert names is not None, f"{module.__name__} has no __all__"
    return list(names)


def _word(name: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(name) + r"\b")


def _readme_api_lists() -> dict[str, list[str]]:
    """The README's ``## API`` section: one line per module, ``- `module`: `name`, `name` ...``."""
    text = README.read_text()
    start = text.index("\n## API\n")
    end = text.find("\n## ", start + 1)
    lists = {}
    for line in text[start:end].splitlines():
        item = re.match(r"- `(goaway_ext[\w.]*)`: (.*)$", line)
        if item:
            lists[item.group(1)] = re.findall(r"`(\w+)`", item.group(2))
    return lists


MODULES = _public_modules()


def test_the_module_list_is_not_empty() -> None:
    # Discovery is what the checks below stand on: a broken one would silently shrink them.
    assert {"goaway_ext", "goaway_ext.httpx", "goaway_ext.hypercorn", "goaway_ext.grpclib", "goaway_ext.server"} <= set(
        MODULES)


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_is_in_api_md(module_name: str) -> None:
    api = API_MD.read_text()
    missing = [n for n in _public(importlib.import_module(module_name)) if not _word(n).search(api)]
    assert missing == [], f"{module_name}: not in docs/api.md: {missing}"


def test_readme_api_section_lists_exactly_each_module_s_public_names() -> None:
    # Both ways: a name missing from the README, or one listed that is no longer public, fails.
    listed = _readme_api_lists()
    assert sorted(listed) == MODULES
    for module_name in MODULES:
        public = _public(importlib.import_module(module_name))
        assert sorted(listed[module_name]) == sorted(public), module_name


def _own_docstring(obj: object) -> str | None:
    doc = inspect.getdoc(obj)
    if doc is None:
        return None
    if inspect.isclass(obj):
        if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            return None  # the signature dataclasses writes when the class has no docstring
        if "__doc__" not in vars(obj):
            return None  # inherited from a base class: says nothing about this one
    return doc


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_class_and_function_has_a_docstring(module_name: str) -> None:
    module = importlib.import_module(module_name)
    undocumented = []
    for name in _public(module):
        obj = getattr(module, name)
        # Classes and functions (compiled ones too); constants and typing aliases (Handler,
        # Decider) cannot carry a docstring: docs/api.md describes them.
        if (inspect.isclass(obj) or inspect.isroutine(obj)) and not _own_docstring(obj):
            undocumented.append(name)
    assert undocumented == [], f"{module_name}: no docstring: {undocumented}"
