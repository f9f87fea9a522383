"""select_pairs: which (chosen, rejected) pair each prompt gives the online trainers (pure, no model)."""

import pytest

from trl_sharpen.pairs import select_pairs


def test_one_pair_per_prompt_best_and_worst_by_reward():
    rewards = [0.1, 0.9, 0.5, -1.0, -3.0, -2.0]  # two prompts, k = 3
    selection = select_pairs(rewards, 3)
    assert selection.pairs == ((1, 0), (3, 4))
    assert selection.ties_skipped == 0
    assert selection.batch_pairs == ([1, 3], [0, 4])
    assert selection.loss_scale == 1.0


def test_truncated_sample_is_never_chosen_over_a_complete_one():
    # The truncated sample (index 1) has the highest log-prob, as prefixes do: it must be the rejected side
    selection = select_pairs([-5.0, -1.0, -4.0], 3, truncated=[False, True, False])
    assert selection.pairs == ((2, 1),)
    # Complete samples only: by reward; all truncated: by reward among the prefixes
    assert select_pairs([-5.0, -1.0], 2, truncated=[False, False]).pairs == ((1, 0),)
    assert select_pairs([-5.0, -1.0], 2, truncated=[True, True]).pairs == ((1, 0),)
    # With k = 2, a complete sample of lower reward is chosen over a truncated one
    assert select_pairs([-5.0, -1.0], 2, truncated=[False, True]).pairs == ((0, 1),)


def test_complete_and_truncated_sample_with_equal_rewards_is_not_a_tie():
    selection = select_pairs([-2.0, -2.0], 2, truncated=[True, False], ties="skip")
    assert selection.pairs == ((1, 0),) and selection.ties_skipped == 0


def test_ties_are_skipped_or_kept():
    rewards = [1.0, 1.00001, 2.0, 0.0]
    skipped = select_pairs(rewards, 2, ties="skip", tie_tolerance=1e-4)
    assert skipped.pairs == ((2, 3),) and skipped.ties_skipped == 1
    kept = select_pairs(rewards, 2, ties="keep", tie_tolerance=1e-4)
    assert kept.pairs == ((1, 0), (2, 3)) and kept.ties_skipped == 0


def test_identical_samples_are_a_tie_whatever_their_rewards():
    # Scored in different micro-batches, identical samples can differ by round-off beyond the tolerance
    selection = select_pairs([1.0, 1.5], 2, completion_ids=[[4, 5, 2], [4, 5, 2]], tie_tolerance=0.0)
    assert selection.pairs == () and selection.ties_skipped == 1


def test_all_equal_with_keep_pairs_the_first_sample_with_the_next():
    # XPO's k = 2 layout: on a tie the policy sample y (first) stays chosen
    assert select_pairs([3.0, 3.0], 2, ties="keep").pairs == ((0, 1),)
    assert select_pairs([3.0, 3.0, 3.0], 3, ties="keep").pairs == ((0, 1),)


def test_all_ties_leave_a_zero_weight_fallback_pair():
    selection = select_pairs([1.0, 1.0, 2.0, 2.0], 2)
    assert selection.pairs == () and selection.ties_skipped == 2
    assert selection.batch_pairs == ([0], [1])  # one pair, so every process still runs forward and backward
    assert selection.loss_scale == 0.0


def test_first_equalizes_pair_counts_across_processes():
    selection = select_pairs([2.0, 1.0, 4.0, 3.0, 6.0, 5.0], 2)
    assert selection.first(2).pairs == ((0, 1), (2, 3))
    assert selection.first(2).ties_skipped == 0
    # A process with no pair anywhere: all processes keep zero pairs and run the fallback at zero weight
    none = selection.first(0)
    assert none.batch_pairs == ([0], [1]) and none.loss_scale == 0.0


@pytest.mark.parametrize(
    "args, match",
    [
        (([1.0, 2.0], 1), "at least 2 samples"),
        (([1.0, 2.0, 3.0], 2), "do not split"),
        (([1.0, 2.0], 2, [True]), "truncation flags"),
    ],
)
def test_bad_arguments_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        select_pairs(*args)


def test_unknown_tie_handling_is_refused():
    with pytest.raises(ValueError, match="ties='drop'"):
        select_pairs([1.0, 2.0], 2, ties="drop")


def test_answer_gating_never_chooses_a_sample_without_an_answer_over_one_with_an_answer():
    # The echo of the question (index 0) has the highest self-reward but no answer: it must be the rejected side
    rewards = [-1.0, -6.0, -3.0]
    assert select_pairs(rewards, 3).pairs == ((0, 1),)  # without gating, by reward
    gated = select_pairs(rewards, 3, has_answer=[False, True, True])
    assert gated.pairs == ((2, 0),)
    # With k = 2, an answer of lower reward is chosen over a higher-reward sample without one
    assert select_pairs([-1.0, -9.0], 2, has_answer=[False, True]).pairs == ((1, 0),)
    # No sample has an answer (or all have one): by completeness, then reward, as without gating
    assert select_pairs(rewards, 3, has_answer=[False] * 3).pairs == ((0, 1),)
    assert select_pairs(rewards, 3, has_answer=[True] * 3).pairs == ((0, 1),)


def test_answer_and_no_answer_with_equal_rewards_is_not_a_tie():
    selection = select_pairs([-2.0, -2.0], 2, has_answer=[False, True], ties="skip")
    assert selection.pairs == ((1, 0),) and selection.ties_skipped == 0
    with pytest.raises(ValueError, match="answer flags"):
        select_pairs([-2.0, -2.0], 2, has_answer=[True])
