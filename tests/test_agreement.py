"""The signal measures (`stability.py`): alpha's separation per search, and the agreement of searches across
seeds against random subsets. On the planted-signal problem of test_flexora the searches separate and agree
far beyond chance; on the same model with targets that no feature predicts they do neither."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest
import torch
from test_flexora import GOOD, NUM_BLOCKS, PlantedModel, _planted_search
from tiny import PointBatch

from flexora_tune.blocks import BlockSelection, attach_lora, find_blocks
from flexora_tune.flexora import BilevelLoop, SearchSettings, SelectionResult
from flexora_tune.stability import (
    SEPARATED,
    agreement_test,
    alpha_separation,
    common_k,
    expected_jaccard,
    expected_mean_pairwise_jaccard,
    format_p,
    mean_pairwise_jaccard,
    random_mean_pairwise_jaccards,
    search_agreement,
    separation_verdict,
)

SEEDS = range(8)


# ------------------------------------------------------------------------------------------- Jaccard and p


def _brute_expected(a: int, b: int, total: int) -> float:
    return statistics.fmean(len(set(x) & set(y)) / len(set(x) | set(y))
                            for x in itertools.combinations(range(total), a)
                            for y in itertools.combinations(range(total), b))


@pytest.mark.parametrize(("a", "b", "total"), [(1, 1, 4), (3, 3, 6), (2, 5, 7), (4, 3, 8), (6, 2, 6)])
def test_expected_jaccard_is_exact(a, b, total):
    assert expected_jaccard(a, b, total) == pytest.approx(_brute_expected(a, b, total), abs=1e-12)


def test_the_null_draws_are_seeded_and_average_to_the_exact_expectation():
    sizes, total = [3, 4, 2, 5], 10
    draws = random_mean_pairwise_jaccards(sizes, total, 50_000, seed=3)
    assert np.array_equal(draws, random_mean_pairwise_jaccards(sizes, total, 50_000, seed=3))
    assert not np.array_equal(draws, random_mean_pairwise_jaccards(sizes, total, 50_000, seed=4))
    expected = expected_mean_pairwise_jaccard(sizes, total)
    assert abs(draws.mean() - expected) < 4 * draws.std() / math.sqrt(len(draws))
    assert expected_mean_pairwise_jaccard([3, 3], 6) == pytest.approx(0.365)  # 9/100 + 9/40 + 1/20


def test_identical_selections_agree_beyond_chance_with_the_smallest_p():
    test = agreement_test([(0, 3, 4)] * 5, 6, draws=10_000)
    assert test.observed == 1.0 and test.expected == pytest.approx(0.365)
    assert test.p_value == pytest.approx(1 / 10_001) and test.beyond_chance
    assert test.verdict == "agree beyond chance (p<0.001)"
    assert test.to_dict()["verdict"] == test.verdict and test.to_dict()["sizes"] == [3] * 5


def test_disjoint_selections_get_p_one_and_the_plain_verdict():
    test = agreement_test([(0, 1), (2, 3), (4, 5)], 6)
    assert test.observed == 0.0 and test.p_value == 1.0 and not test.beyond_chance
    assert test.verdict == "no more agreement than random subsets (p=1)"
    assert format_p(0.0123) == "p=0.012" and format_p(0.4) == "p=0.4" and format_p(0.0004) == "p<0.001"


def test_independent_random_selections_give_roughly_uniform_p_values():
    rng = np.random.default_rng(11)
    total, p_values = 12, []
    for _ in range(300):
        sizes = rng.integers(2, 8, size=5)
        selections = [rng.choice(total, size=s, replace=False) for s in sizes]
        p_values.append(agreement_test(selections, total, draws=1_000, seed=int(rng.integers(1 << 30))).p_value)
    p = np.array(p_values)
    assert (p < 0.05).mean() <= 0.08  # valid (discrete Jaccards make it a little conservative)
    assert 0.35 <= np.median(p) <= 0.65 and (p < 0.5).mean() >= 0.35
    fixed = [rng.choice(total, size=4, replace=False) for _ in range(6)]
    assert agreement_test(fixed, total).p_value > 0.05


def test_search_agreement_compares_top_k_by_alpha_with_one_common_k():
    selections = [(0, 1), (0, 1, 2, 3), (0, 1, 2)]
    alphas = [[0.9, 0.8, 0.7, 0.1, 0.0, -1.0], [0.5, 0.4, 0.6, 0.3, 0.0, 0.0], [1.0, 0.9, 0.8, 0.0, 0.0, 0.0]]
    result = search_agreement(selections, 6, alphas, separations=[4.0, 1.0, 3.5], draws=2_000)
    assert common_k([2, 4, 3]) == 3 and common_k([2, 3]) == 3 and result.k == 3
    assert result.top_k.observed == 1.0 and result.top_k.sizes == (3, 3, 3)  # same top 3, different selections
    assert result.selections.observed == pytest.approx(mean_pairwise_jaccard(selections))
    assert result.line("flexora").startswith("flexora searches (3 seeds): Jaccard 0.639 vs ")
    assert "; top-3 by alpha 1.000 vs 0.365" in result.line() and "(2/3 searches separated)" in result.line()
    assert search_agreement(selections, 6, alphas, k=2).top_k.sizes == (2, 2, 2)
    with pytest.raises(ValueError, match="at least two"):
        agreement_test([(0, 1)], 6)
    with pytest.raises(ValueError, match="subset of 0..5"):
        agreement_test([(0, 6), (1,)], 6)


# ------------------------------------------------------------------------------------------------ separation


def _adam_walk(mean: np.ndarray, steps: int, seed: int, lr: float = 0.01) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    alpha = torch.zeros(len(mean), requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=lr)
    for _ in range(steps):
        alpha.grad = torch.as_tensor(mean, dtype=torch.float32) + torch.randn(len(mean), generator=gen)
        optimizer.step()
    return alpha.detach().tolist()


def test_separation_is_about_one_for_noise_and_sqrt_steps_for_a_steady_push():
    assert alpha_separation([0.3, -0.3], 9, 0.1) == pytest.approx(1.0)
    assert alpha_separation([1.3, 0.7], 9, 0.1, start=[1.0, 1.0]) == pytest.approx(1.0)
    noise = [alpha_separation(_adam_walk(np.zeros(24), steps, s), steps, 0.01) for s in range(20)
             for steps in (12, 60, 200)]
    assert 0.8 < statistics.fmean(noise) < 1.2 and max(noise) < 2.0
    steady = np.where(np.arange(24) % 2 == 0, 50.0, -50.0)
    assert alpha_separation(_adam_walk(steady, 60, 0), 60, 0.01) == pytest.approx(math.sqrt(60), rel=0.02)
    assert separation_verdict(5.43) == "separated (S=5.4)" and "noise gives about 1" in separation_verdict(1.2)
    with pytest.raises(ValueError, match="at least one step"):
        alpha_separation([0.0, 1.0], 0, 0.01)


# ---------------------------------------------------------------------------- planted signal, and no signal


def _noise_batch(seed: int, index: int, shifted: bool, n: int = 32) -> PointBatch:
    """Features and targets independent: no block can help."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 2 * index + int(shifted) + 77)
    return PointBatch(torch.randn(n, 2, generator=gen), torch.randn(n, generator=gen))


def _no_signal_search(seed: int) -> BilevelLoop:
    """test_flexora's planted model and search settings, on targets that no feature predicts."""
    torch.manual_seed(seed)
    model = PlantedModel([0 if b in GOOD else 1 for b in range(NUM_BLOCKS)])
    layout = find_blocks(model)
    selection = BlockSelection(range(NUM_BLOCKS), NUM_BLOCKS)
    model = attach_lora(model, selection, selection.to_lora_config(layout, r=1, lora_alpha=1), layout)
    config = SearchSettings(r=1, lora_alpha=1, lr=0.05, alpha_lr=0.05, batch_size=32, steps=60,
                            stop_when_stable=None)
    return BilevelLoop(model, layout, lambda m, b: ((m(b.x) - b.y) ** 2).mean(),
                       lambda i: _noise_batch(seed, i, False), lambda j: _noise_batch(seed, j, True), config,
                       total_steps=60, seed=seed)


def _agreement(results: list[SelectionResult]):
    return search_agreement([r.blocks for r in results], NUM_BLOCKS, [r.alpha for r in results],
                            separations=[r.alpha_separation for r in results])


def test_planted_signal_searches_separate_and_agree_far_beyond_chance():
    reports: list[dict] = []
    results = [_planted_search(seed).run(on_step=lambda m, save: reports.append(m)) for seed in SEEDS]
    assert all(r.blocks == GOOD for r in results)
    assert all(r.alpha_separation > 4.0 for r in results)  # at most sqrt(60) = 7.7
    assert reports[-1]["step"] == 60 and reports[-1]["alpha_separation"] == results[-1].alpha_separation
    agreement = _agreement(results)
    for test in (agreement.selections, agreement.top_k):
        assert test.observed == 1.0 and test.expected < 0.4 and test.p_value < 0.001 and test.beyond_chance
    assert "agree beyond chance" in agreement.line() and f"({len(SEEDS)}/{len(SEEDS)} searches separated)" in \
        agreement.line()


def test_no_signal_searches_neither_separate_nor_agree_beyond_chance():
    results = [_no_signal_search(seed).run() for seed in SEEDS]
    separations = [r.alpha_separation for r in results]
    assert max(separations) < SEPARATED and statistics.median(separations) < 2.0
    agreement = _agreement(results)
    for test in (agreement.selections, agreement.top_k):
        assert abs(test.observed - test.expected) < 0.1 and test.p_value > 0.05 and not test.beyond_chance
    assert "no more agreement than random subsets" in agreement.line()


def test_selection_json_from_before_separation_loads_and_gets_it_from_its_alpha():
    result = _planted_search(0, steps=10).run()
    assert result.alpha_separation == pytest.approx(alpha_separation(result.alpha, 10, 0.05))
    data = result.to_dict()
    assert SelectionResult.from_json(result.to_json()).alpha_separation == result.alpha_separation
    del data["alpha_separation"]
    assert SelectionResult.from_dict(data).alpha_separation == pytest.approx(result.alpha_separation)
    data["settings"] = {}
    assert SelectionResult.from_dict(data).alpha_separation is None
