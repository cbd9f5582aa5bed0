"""The figure regions of README.md and docs/*.md are well-formed and each has its generator in tools/figures.py
(and each generator a region). Nothing is measured here: `python tools/figures.py --check` does that (docs/figures.md)."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("figures", REPO / "tools" / "figures.py")
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)


def test_every_region_is_closed_and_has_a_generator_and_every_generator_a_region():
    assert figures.structure_problems() == []


def test_the_docs_hold_regions():
    names = {name for path in figures.doc_files() for name, _ in figures.regions_in(path.read_text())}
    assert names == set(figures.REGIONS)


def test_malformed_markers_are_named(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- figures:twins -->\n| a |\n\n<!-- figures:no-such-region -->x<!-- /figures:no-such-region -->\n"
                   "<!-- /figures:demo-parity -->\n")
    problems = figures.structure_problems([doc])
    assert any("no-such-region opens inside twins" in p for p in problems)
    assert any("no-such-region has no generator" in p for p in problems)
    assert any("demo-parity closes a region that is not open" in p for p in problems)
    doc.write_text("<!-- figures:twins -->\n| a |\n")
    assert figures.structure_problems([doc]) == ["doc.md: twins is never closed"]


def test_check_compares_timing_regions_without_their_numbers_and_stamp():
    timing = figures.Region("t", None, "", timing=True)
    exact = figures.Region("e", None, "", timing=False)
    old = "| FLA | 50.58 | +9.3% (+5.7 .. +12.7) |\n\n_(measured 2026-11-22 on AMD EPYC, 2 cores, ONNX Runtime 1.31.1)_"
    new = "| FLA | 47.10 | +8.1% (-0.2 .. +11.0) |\n\n_(measured 2026-12-05 on Intel Xeon, 16 cores, ONNX Runtime 1.32.0)_"
    assert figures.comparable(timing, old) == figures.comparable(timing, new)
    assert figures.comparable(timing, "1.80x slower") != figures.comparable(timing, "1.80x faster")
    assert figures.comparable(exact, "0.000671 px") != figures.comparable(exact, "0.000427 px")


def test_a_block_region_keeps_its_markers_on_lines_of_their_own():
    assert figures.fill("\nold\n", "new") == "\nnew\n" and figures.fill("old", "new") == "new"
