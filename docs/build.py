"""Build docs/api.md from the docstrings of the public surface, and refresh the examples in docs/*.md.

    python docs/build.py           # rewrite what is out of date
    python docs/build.py --check   # exit 1 if anything is out of date (tests/test_docs.py runs this)

The API page lists every name in ``mend_kernels.__all__``, and for a module the names in its own
``__all__``. Each object is rendered once; later mentions link to it. In the other pages a line
``<!-- example: examples/NAME.py -->`` is followed by a fenced block holding that file verbatim.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
API_PAGE = ROOT / "docs" / "api.md"
EXAMPLE_MARKER = re.compile(r"(<!-- example: (?P<path>[\w/.-]+) -->\n)```python\n.*?```\n", re.DOTALL)

MAX_DEFAULT_REPR = 60  # longer defaults (e.g. a dataclass's table of relations) print as "..."

HEADER = """# API reference

Generated from the docstrings by `python docs/build.py`; do not edit by hand. This page lists
`mend_kernels.__all__`, the public surface (what is stable and what may change:
[embedding.md](embedding.md#versioning)).
"""


# ------------------------------------------------------------------------------------------ API page
def render_api() -> str:
    import mend_kernels

    sections, seen = [HEADER], {}
    for name in mend_kernels.__all__:
        sections.append(_render(f"mend_kernels.{name}", getattr(mend_kernels, name), seen, level=2))
    return "\n".join(sections)


def _render(qualname: str, obj: object, seen: dict[int, str], level: int) -> str:
    if id(obj) in seen and not isinstance(obj, (str, int, float)):
        return f"{'#' * level} `{qualname}`\n\nThe same object as [`{seen[id(obj)]}`](#{_anchor(seen[id(obj)])}).\n"
    seen[id(obj)] = qualname
    if isinstance(obj, ModuleType):
        return _render_module(qualname, obj, seen, level)
    heading = f"{'#' * level} `{qualname}`\n\n"
    if inspect.isclass(obj):
        return heading + _render_class(obj)
    if callable(obj):
        return f"{heading}`{obj.__name__}{_signature(obj)}`\n\n{_doc(obj)}"
    return f"{heading}{_describe_value(obj)}\n"


def _render_module(qualname: str, module: ModuleType, seen: dict[int, str], level: int) -> str:
    parts = [f"{'#' * level} `{qualname}`\n\nmodule\n\n{_doc(module)}"]
    for name in getattr(module, "__all__", []):
        member = getattr(module, name, None)
        if member is None:  # a submodule listed in __all__ but imported on first use
            member = importlib.import_module(f"{module.__name__}.{name}")
        parts.append(_render(f"{qualname}.{name}", member, seen, min(level + 1, 4)))
    return "\n".join(parts)


def _render_class(cls: type) -> str:
    if issubclass(cls, BaseException):
        parts = [f"exception `{cls.__name__}({', '.join(base.__name__ for base in cls.__bases__)})`\n\n{_doc(cls)}"]
    else:
        parts = [f"class `{cls.__name__}{_signature(cls)}`\n\n{_doc(cls)}"]
    for name, member in vars(cls).items():
        if name.startswith("_") or not (callable(member) or isinstance(member, (property, classmethod, staticmethod))):
            continue
        function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
        if isinstance(member, property):
            parts.append(f"- property `{name}`: {_first_line(member)}\n")
        else:
            parts.append(f"- `{name}{_signature(function)}`\n\n{_indented(_doc(function))}")
    return "\n".join(parts)


class _Elided:
    """Stands for a default value too long to print in a signature."""

    def __repr__(self) -> str:
        return "..."


def _signature(obj: object) -> str:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins and some extension types have none
        return "(...)"
    parameters = [
        parameter.replace(default=_Elided())
        if parameter.default is not parameter.empty and len(repr(parameter.default)) > MAX_DEFAULT_REPR
        else parameter
        for parameter in signature.parameters.values()
    ]
    return str(signature.replace(parameters=parameters)).replace("'", '"')


def _doc(obj: object) -> str:
    doc = inspect.getdoc(obj)
    return f"```text\n{doc}\n```\n" if doc else "(no docstring)\n"


def _first_line(obj: object) -> str:
    return (inspect.getdoc(obj) or "").split("\n", 1)[0] or "(no docstring)"


def _indented(text: str) -> str:
    return "".join(f"  {line}" if line.strip() else line for line in text.splitlines(keepends=True))


def _describe_value(value: object) -> str:
    if isinstance(value, dict):
        return f"A dict with keys {', '.join(f'`{key}`' for key in value)}."
    if isinstance(value, (tuple, list)) and not all(isinstance(item, (str, int, float)) for item in value):
        kinds = sorted({type(item).__name__ for item in value})
        return f"A {type(value).__name__} of {len(value)} `{'`, `'.join(kinds)}` objects."
    return f"`{value!r}`"


def _anchor(qualname: str) -> str:
    return re.sub(r"[^a-z0-9_ -]", "", qualname.lower()).replace(" ", "-")


# ------------------------------------------------------------------------------------- example code
def refresh_examples(page: str) -> str:
    """``page`` with the fenced block after each example marker replaced by that file's text."""

    def include(match: re.Match) -> str:
        code = (ROOT / match["path"]).read_text()
        return f"{match[1]}```python\n{code}```\n"

    return EXAMPLE_MARKER.sub(include, page)


def included_examples(page: str) -> list[str]:
    return [match["path"] for match in EXAMPLE_MARKER.finditer(page)]


def expected_pages() -> dict[Path, str]:
    """Every generated or refreshed page and the text it must have."""
    pages = {API_PAGE: render_api()}
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page != API_PAGE:
            pages[page] = refresh_examples(page.read_text())
    return pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="only report pages that are out of date")
    args = parser.parse_args(argv)
    stale = [path for path, text in expected_pages().items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run `python docs/build.py`")
        return 1 if stale else 0
    for path, text in expected_pages().items():
        if path in stale:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
