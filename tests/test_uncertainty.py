"""Entropy / margin values, exact tile scores, and what each selection picks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsiseg.errors import InputError
from wsiseg.uncertainty import TileSelection, entropy, margin, sample_tiles, tile_scores, uncertainty_map


@pytest.mark.parametrize("classes", [1, 2, 5])
def test_entropy_is_one_for_uniform_and_zero_for_one_hot(classes: int) -> None:
    channels = classes
    uniform = np.full((channels, 4, 3), 1.0 / max(classes, 2))
    np.testing.assert_allclose(entropy(uniform), 1.0, atol=1e-6)
    one_hot = np.zeros((channels, 4, 3))
    one_hot[-1] = 1.0  # binary: P(fg) = 1; K classes: class K-1 certain
    np.testing.assert_array_equal(entropy(one_hot), 0.0)
    if classes == 1:
        np.testing.assert_array_equal(entropy(np.zeros((1, 2, 2))), 0.0)  # P(fg) = 0 is certain too


def test_entropy_matches_formula_for_known_values() -> None:
    p = 0.1
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)
    assert entropy(np.array([[p]]))[0] == pytest.approx(h, rel=1e-6)
    assert entropy(np.array([[1 - p], [p]]))[0] == pytest.approx(h, rel=1e-6)  # K=2 == binary
    q = np.array([0.5, 0.25, 0.25, 0.0, 0.0])
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(5)
    assert entropy(q[:, None])[0] == pytest.approx(expected, rel=1e-6)


def test_margin_is_the_papers_linear_measure_for_binary() -> None:
    p = np.array([[0.0, 0.1, 0.5, 0.8, 1.0]])
    np.testing.assert_allclose(margin(p), 1 - 2 * np.abs(p[0] - 0.5), atol=1e-6)
    three = np.array([[0.6], [0.3], [0.1]])
    assert margin(three)[0] == pytest.approx(1 - (0.6 - 0.3))
    np.testing.assert_allclose(uncertainty_map(p, "margin"), margin(p))
    with pytest.raises(InputError, match="unknown uncertainty measure"):
        uncertainty_map(p, "variance")


def test_tile_scores_equal_brute_force_area_means(rng) -> None:
    u = rng.random((13, 17)).astype(np.float32)
    # Integer scale, tiles aligned on map pixels, edge tiles partial.
    scale = (4.0, 4.0)
    y_edges = np.array([0, 16, 32, 48, 52])
    x_edges = np.array([0, 16, 32, 48, 64, 68])
    scores = tile_scores(u, y_edges, x_edges, scale)
    full = np.kron(u, np.ones((4, 4)))  # the map at full resolution (52 x 68)
    for i in range(4):
        for j in range(5):
            block = full[y_edges[i] : y_edges[i + 1], x_edges[j] : x_edges[j + 1]]
            assert scores[i, j] == pytest.approx(block.mean(), rel=1e-5)


def test_tile_scores_with_fractional_footprints(rng) -> None:
    u = rng.random((10, 10))
    scale = (3.0, 3.0)  # tiles of 8 px do not fall on map pixels
    edges = np.array([0, 8, 16, 24, 30])
    scores = tile_scores(u, edges, edges, scale)
    full = np.kron(u, np.ones((3, 3)))
    for i in range(4):
        for j in range(4):
            block = full[edges[i] : edges[i + 1], edges[j] : edges[j + 1]]
            assert scores[i, j] == pytest.approx(block.mean(), rel=1e-5)


def test_threshold_selection() -> None:
    scores = np.array([[0.0, 0.2, 0.25], [0.3, 0.9, 1.0]])
    np.testing.assert_array_equal(TileSelection.threshold(0.25).select(scores), scores >= 0.25)
    assert TileSelection.threshold(0).select(scores).all()
    assert not TileSelection.threshold(1.01).select(scores).any()
    with pytest.raises(InputError):
        TileSelection.threshold(-0.1)


def test_top_n_picks_the_n_largest_with_stable_ties(rng) -> None:
    scores = rng.random((6, 7))
    for n in (0, 1, 5, 42, 100):
        chosen = TileSelection.top_n(n).select(scores)
        count = min(n, scores.size)
        assert chosen.sum() == count
        if 0 < count < scores.size:
            assert scores[chosen].min() > scores[~chosen].max()
    ties = np.array([0.5, 0.9, 0.5, 0.5])
    np.testing.assert_array_equal(TileSelection.top_n(2).select(ties), [True, True, False, False])


def test_budget_is_a_fraction_of_tiles(rng) -> None:
    scores = rng.random(30)
    chosen = TileSelection.budget(0.1).select(scores)
    assert chosen.sum() == 3
    np.testing.assert_array_equal(np.sort(np.argsort(-scores)[:3]), np.flatnonzero(chosen))
    assert TileSelection.budget(1.0).select(scores).all()
    assert not TileSelection.budget(0.0).select(scores).any()
    with pytest.raises(InputError):
        TileSelection.budget(1.5)
    assert TileSelection.budget(0.2).describe() == "budget 0.2"
    assert TileSelection.top_n(7).describe() == "top 7"


def test_highest_sampling_is_the_arg_max(rng) -> None:
    scores = rng.random((5, 5))
    picked = sample_tiles(scores, 1, "highest", rng)
    assert picked[0] == np.argmax(scores)
    picked = sample_tiles(scores, 3, "highest", rng)
    np.testing.assert_array_equal(picked, np.argsort(-scores.ravel())[:3])


def test_weighted_sampling_frequencies_are_proportional_to_scores() -> None:
    rng = np.random.default_rng(7)
    scores = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    draws = 40_000
    counts = np.bincount([sample_tiles(scores, 1, "weighted", rng)[0] for _ in range(draws)], minlength=5)
    expected = scores / scores.sum()
    assert counts[0] == 0  # a zero score is never drawn
    np.testing.assert_allclose(counts / draws, expected, atol=0.01)


def test_random_sampling_is_uniform_and_distinct() -> None:
    rng = np.random.default_rng(3)
    scores = np.array([0.0, 0.0, 1.0, 5.0])
    counts = np.bincount([sample_tiles(scores, 1, "random", rng)[0] for _ in range(20_000)], minlength=4)
    np.testing.assert_allclose(counts / 20_000, 0.25, atol=0.015)
    many = sample_tiles(scores, 4, "random", rng)
    assert sorted(many.tolist()) == [0, 1, 2, 3]
    with pytest.raises(InputError, match="unknown sampling"):
        sample_tiles(scores, 1, "greedy", rng)


def test_block_integrals_add_up_to_whole_map_scores(rng) -> None:
    from wsiseg.uncertainty import scores_from_integrals, tile_integrals

    u = rng.random((37, 29))
    scale = (3.0, 5.0)  # footprints straddle map pixels and blocks
    y_edges = np.array([0, 16, 32, 48, 64, 80, 96, 111])
    x_edges = np.array([0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 145])
    whole = tile_scores(u, y_edges, x_edges, scale)
    sums, areas = np.zeros(whole.shape), np.zeros(whole.shape)
    for by in range(0, 37, 10):
        for bx in range(0, 29, 8):
            block = u[by : by + 10, bx : bx + 8]
            r0, c0, s, a = tile_integrals(block, y_edges, x_edges, scale, origin=(by, bx))
            sums[r0 : r0 + s.shape[0], c0 : c0 + s.shape[1]] += s
            areas[r0 : r0 + a.shape[0], c0 : c0 + a.shape[1]] += a
    np.testing.assert_allclose(scores_from_integrals(sums, areas), whole, rtol=1e-5)
