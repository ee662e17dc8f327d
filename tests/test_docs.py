"""docs/: the API page matches the docstrings and mend_kernels.__all__, the pages hold the example files
verbatim, and every example shown in the docs is run by a test."""

from __future__ import annotations

import importlib.util
import re
import runpy
from pathlib import Path

import pytest

import mend_kernels as mk

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

# Examples whose run (with assertions on what they show) lives in another test file; the rest run here.
RUN_ELSEWHERE = {
    "examples/training_loop.py": "test_integrations.py",
    "examples/hf_trainer_edits.py": "test_integrations.py",
    "examples/distributed_edits.py": "test_functional.py",
}
RUN_HERE = ["examples/capture_own_loss.py", "examples/serving_temporary_edit.py"]


def _build_module():
    spec = importlib.util.spec_from_file_location("docs_build", ROOT / "docs" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build_module()


def test_pages_are_up_to_date_with_docstrings_and_examples():
    stale = [str(path.relative_to(ROOT)) for path, text in BUILD.expected_pages().items()
             if not path.exists() or path.read_text() != text]
    assert not stale, f"{stale} out of date: run `python docs/build.py` and commit the result"


def test_api_page_lists_exactly_the_public_surface():
    assert len(set(mk.__all__)) == len(mk.__all__) and all(hasattr(mk, name) for name in mk.__all__)
    assert all(hasattr(mk.functional, name) for name in mk.functional.__all__)
    listed = re.findall(r"^## `mend_kernels\.([\w.]+)`$", (ROOT / "docs" / "api.md").read_text(), re.MULTILINE)
    assert listed == list(mk.__all__)


def test_every_documented_example_is_run_by_a_test():
    included = [path for page in sorted((ROOT / "docs").glob("*.md")) for path in BUILD.included_examples(page.read_text())]
    assert included, "the docs show no example"
    for path in included:
        assert path in RUN_HERE or path in RUN_ELSEWHERE, f"{path} is shown in the docs but no test runs it"
        if path in RUN_ELSEWHERE:
            assert Path(path).name in (TESTS / RUN_ELSEWHERE[path]).read_text(), f"{RUN_ELSEWHERE[path]} must run {path}"


@pytest.mark.parametrize("path", RUN_HERE)
def test_documented_example_runs(path):
    runpy.run_path(str(ROOT / path), run_name="__main__")  # the examples assert what they show
