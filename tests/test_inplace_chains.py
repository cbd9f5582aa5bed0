"""The import-time rewrite of in-place chains on indexed views (export/checkpoint/inplace_chains.py): only the
statement form it is sure of, the same values bit for bit, and the lines it names."""

import ast
import textwrap

import pytest
import torch

from export.checkpoint.inplace_chains import rewrite

SOURCE = textwrap.dedent("""
    def normalise(ref, w, h, g):
        ref[..., 1].div_(w).mul_(2).sub_(1)
        ref[..., 0].div_(h).mul_(2).sub_(1)
        ref[1:-1, :, 0].clamp_(min=-0.5).add_(g)
        ref[0].masked_fill_(ref[0] > 0.5, 0.0)
        return ref
""")
UNTOUCHED = textwrap.dedent("""
    def untouched(ref, idx, v, g):
        v.mul_(2)                       # a view held in a variable: not known to be one
        ref[idx].add_(1)                # a tensor or list index copies: in-place on the copy changes nothing
        ref[g()].add_(1)                # a call in the index could have side effects
        y = ref[..., 0].add_(1)         # the chain's value is used
        ref[..., 0].copy_(v)            # copy_ has no out-of-place twin of its name
        return ref, y
""")


def _function(source, name, rewritten):
    tree = ast.parse(source)
    done = rewrite(tree) if rewritten else []
    namespace = {}
    exec(compile(tree, "<test>", "exec"), namespace)
    return namespace[name], done, tree


def test_chains_on_indexed_views_become_indexed_assignments_with_the_same_values():
    original, _, _ = _function(SOURCE, "normalise", False)
    rewritten, done, tree = _function(SOURCE, "normalise", True)
    assert [line for line, _ in done] == [3, 4, 5, 6]
    assert done[0][1] == "ref[..., 1].div_(w).mul_(2).sub_(1)"
    assert "ref[..., 1] = ref[..., 1].div(w).mul(2).sub(1)" in ast.unparse(tree)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ref = torch.rand(5, 7, 2, generator=g) * 9
        expected = original(ref.clone(), 7.0, 5.0, 0.3)
        assert torch.equal(rewritten(ref.clone(), 7.0, 5.0, 0.3), expected)  # bit-identical


def test_other_forms_are_left_as_written():
    tree = ast.parse(UNTOUCHED)
    before = ast.unparse(tree)
    assert rewrite(tree) == [] and ast.unparse(tree) == before


@pytest.mark.parametrize("statement", ["x[0].add_(1)", "self.buf[:, 1:-1].clamp_(min=0)", "x[..., None, -k:].neg_()"])
def test_basic_indexing_forms_are_rewritten(statement):
    tree = ast.parse(statement)
    assert rewrite(tree) == [(1, statement)]
    assert isinstance(tree.body[0], ast.Assign)
