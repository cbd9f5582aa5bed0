"""The figure regions of README.md and docs/*.md are well-formed and each has its generator in tools/figures.py
(and each generator a region). Nothing is measured here: `python tools/figures.py --check` does that (docs/figures.md)."""

import importlib.util
from pathlib import Path

import pytest

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


TIMING = figures.Region("t", None, "", timing=True)


def test_check_compares_timing_regions_without_their_numbers_and_stamp():
    exact = figures.Region("e", None, "", timing=False)
    old = "| FLA | 50.58 | +9.3% (+5.7 .. +12.7) |\n\n_(measured 2026-11-22 on AMD EPYC, 2 cores, ONNX Runtime 1.31.1)_"
    new = "| FLA | 47.10 | +8.1% (-0.2 .. +11.0) |\n\n_(measured 2026-12-05 on Intel Xeon, 16 cores, ONNX Runtime 1.32.0)_"
    assert figures.agrees(TIMING, old, new)
    assert not figures.agrees(TIMING, old, new.replace("| FLA |", "| MLLA |"))  # a row renamed
    assert not figures.agrees(exact, "0.000671 px", "0.000427 px") and figures.agrees(exact, "0.000671 px", "0.000671 px")


@pytest.mark.parametrize("written, fresh, agree", [
    (figures.times(1.61), figures.times(1.30), True), (figures.times(1.61), figures.times(1.20), True),
    (figures.times(1.61), figures.times(0.70), False), (figures.times(0.70), figures.times(1.30), False),
    (figures.span([15.0, 20.0], "the seed"), figures.span([1.1, 20.0], "the seed"), True),
    (figures.span([15.0, 20.0], "the seed"), figures.span([0.05, 0.07], "the seed"), False),
    (figures.span([15.0, 20.0], "the seed"), figures.span([15.0, 20.0], "the plain file"), False),
    ("MLLA is within its bound (+10.1%), at it in fp16", "MLLA is at its bound (+13.1%), over it in fp16", True),
    ("MLLA is within its bound (+10.1%), at it in fp16", "MLLA is over its bound (+15.1%), at it in fp16", False),
    ("the 6% target is not met", "the 6% target is not resolved (the interquartile range spans it)", True),
    ("the 6% target is not met", "the 6% target is met", False),
    ("it costs 9.2 ms, about as much as the network", "it costs 15.5 ms, less than the network", True),
    ("it costs 9.2 ms, more than the network", "it costs 15.5 ms, less than the network", False),
    ("runs 1.4-1.6x the time of fp32 (*slower*; m)", "runs 1.2-1.6x the time of fp32 (about as fast; m)", True),
])
def test_check_fails_a_timing_region_only_on_a_reversed_conclusion(written, fresh, agree):
    """A verdict word at a margin may land on either side of it from run to run: an undecided word agrees with
    both sides; slower against faster, over against within, not met against met is a changed conclusion."""
    assert figures.agrees(TIMING, written, fresh) is agree


def test_verdict_words_need_a_clear_gap():
    assert figures.times(figures.CLEAR_GAP).endswith("(slower)") and figures.times(1.24).endswith("(about as fast)")
    assert figures.times(1 / figures.CLEAR_GAP).endswith("(faster)")
    assert figures.span([1.3, 2.0], "x").endswith("(*slower*)") and figures.span([1.2, 2.0], "x").endswith(
        "(no clear difference)")
    assert figures.against((0.10, 0.13), 0.13) == "within" and figures.against((0.12, 0.14), 0.13) == "at"
    assert figures.against((0.131, 0.14), 0.13) == "over"


def test_a_block_region_keeps_its_markers_on_lines_of_their_own():
    assert figures.fill("\nold\n", "new") == "\nnew\n" and figures.fill("old", "new") == "new"


def test_a_verdict_sentence_keeps_its_skeleton_whatever_its_words():
    """A sentence whose shape changed with its words (one verdict when both precisions agree, two otherwise) failed
    --check on a fresh run where only one precision's word moved to undecided."""
    written = figures.fla_target({"fp32": "not met", "fp16": "not met"})
    assert figures.agrees(TIMING, written, figures.fla_target({"fp32": "not met", "fp16": "at"}))
    assert not figures.agrees(TIMING, written, figures.fla_target({"fp32": "met", "fp16": "not met"}))


def test_differences_name_each_differing_region_with_its_fresh_text():
    """--check against the docs as written: every region agrees with itself, and a changed exact region is named
    with the fresh text it would print."""
    written = {name: body.strip("\n")
               for path in figures.doc_files() for name, body in figures.regions_in(path.read_text())}
    assert figures.differences(written) == []
    exact = next(name for name, reg in figures.REGIONS.items() if not reg.timing)
    found = figures.differences({exact: "a planted difference"})
    assert [fresh for _, fresh in found] == ["a planted difference"] * len(found) and found
    assert all(where.endswith(f": {exact}") for where, _ in found)
