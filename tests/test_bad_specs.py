"""The error corpus: every spec under tests/bad_specs carries its expected code and position.

`# expect: E020 @ 6:5` on the first line means: checking the file reports error E020 at line 6, column 5.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nestc.pipeline import SpecError, front_end

CORPUS = sorted((Path(__file__).parent / "bad_specs").glob("*.nest"))
EXPECT = re.compile(r"#\s*expect:\s*(E\d{3})\s*@\s*(\d+):(\d+)")


def expectation(path: Path) -> tuple[str, int, int]:
    match = EXPECT.search(path.read_text().splitlines()[0])
    assert match, f"{path.name} has no `# expect: E0NN @ line:col` header"
    return match.group(1), int(match.group(2)), int(match.group(3))


def test_corpus_is_not_empty() -> None:
    assert len(CORPUS) >= 20


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_bad_spec_reports_expected_error(path: Path) -> None:
    code, line, col = expectation(path)
    with pytest.raises(SpecError) as info:
        front_end(path)
    error = info.value
    found = []
    for diag in error.diagnostics:
        assert diag.span is not None, f"{diag.code} has no position"
        source = error.sources.get(diag.span.file)
        assert source is not None
        found.append((diag.code, *source.line_col(diag.span.start)))
    assert (code, line, col) in found, f"expected {code} @ {line}:{col}, got {found}"


def test_every_error_code_of_the_first_slice_has_a_corpus_file() -> None:
    covered = {expectation(p)[0] for p in CORPUS}
    wanted = {"E001", "E002", "E003", "E010", "E011", "E012", "E013", "E014", "E015", "E016"}
    wanted |= {"E018", "E020", "E021", "E022", "E023", "E024", "E025", "E026", "E027"}
    assert wanted <= covered, f"no corpus file for {sorted(wanted - covered)}"
