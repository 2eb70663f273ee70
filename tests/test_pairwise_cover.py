"""conftest.pairwise_cover: the subset of a test's grid the Triton interpreter runs by default."""

from __future__ import annotations

import itertools

from conftest import pairwise_cover


def _pairs(row):
    return {(i, a, j, b) for (i, a), (j, b) in itertools.combinations(enumerate(row), 2)}


def test_every_value_and_pair_of_the_grid_is_covered_by_fewer_rows():
    grid = list(itertools.product((0, 1), ("a", "b", "c"), (False, True), (0.0, 0.1), ("x", "y")))
    grid = [row for row in grid if not (row[0] == 1 and row[1] == "c")]  # a filtered grid, as the SGD one is
    chosen = pairwise_cover(grid)
    assert chosen == sorted(set(chosen)) and len(chosen) < len(grid) // 4
    covered = set().union(*(_pairs(grid[k]) for k in chosen))
    assert covered == set().union(*(_pairs(row) for row in grid))
    assert {grid[k][1] for k in chosen} == {"a", "b", "c"}
    assert pairwise_cover(grid) == chosen  # the same subset every run


def test_one_parameter_keeps_each_value_no_parameter_its_one_case():
    assert pairwise_cover([("p1",), ("p2",), ("p1",)]) == [0, 1]
    assert pairwise_cover([]) == []
    assert pairwise_cover([()]) == [0]  # a test of no parameters but the backend runs
