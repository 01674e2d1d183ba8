"""Every benchmark writes only its own marked section of docs/benchmarks.md."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import benchdoc  # noqa: E402


def test_a_section_is_appended_then_replaced_without_touching_the_others(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- a:start -->\n## A\nold a\n<!-- a:end -->\n\n## Hand-written\nkeep me\n")
    start, end = benchdoc.markers("b")
    benchdoc.write_section("## B\nfirst", start, end, doc)
    benchdoc.write_section(f"{start}\n## B\nsecond\n{end}", start, end, doc)
    benchdoc.write_section("## A\nnew a", *benchdoc.markers("a"), doc)
    text = doc.read_text()
    assert text.count(start) == 1 and text.count(end) == 1
    assert "second" in text and "first" not in text
    assert "new a" in text and "old a" not in text
    assert "keep me" in text
    assert text.index("new a") < text.index("keep me") < text.index("second")
