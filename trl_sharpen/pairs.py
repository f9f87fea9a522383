"""Which (chosen, rejected) pairs the online trainers train on: a pure function of the step's self-rewards.

The Best-of-N counterpart is `best_of_n_sampling.select_best`; both rank samples by the same order: a complete
sample (ended by EOS) before a truncated one (cut at the length limit), then by self-reward. A truncated sample is a
prefix, and the log-probability of a prefix is an upper bound on that of every completion extending it, so ranking by
reward alone would prefer cut-off text to complete answers. Hence, in a pair:

- a truncated sample is never chosen over a complete one (it is the rejected side whenever the prompt has one);
- when all samples of a prompt are truncated (or all complete), they are ranked by reward alone.

Answer gating (`require_answer`, given here as `has_answer`) adds one level above: a complete sample with an
extractable answer ranks above every sample without one, so text that games the self-reward without answering (an
echo of the question) is never the chosen side against an answer.

`SelfRewardDPOTrainer._prepare_inputs` calls `select_pairs` on every process, makes the pair counts equal across
processes with `PairSelection.first` (DPO's loss gathers per-pair tensors, which needs equal sizes), and trains on
`PairSelection.batch_pairs`, weighted by `loss_scale`. `XPOTrainer` orients its (y, y~) pairs with the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace


TIE_HANDLING = ("skip", "keep")


@dataclass(frozen=True)
class PairSelection:
    """The pairs of one step, as flat indices into the step's samples (prompt-major, `num_samples` per prompt)."""

    pairs: tuple[tuple[int, int], ...]  # (chosen, rejected) of each pair to train on, in prompt order
    ties_skipped: int  # prompts whose pair was dropped as a tie
    fallback: tuple[int, int]  # the pair run at zero weight when `pairs` is empty (every process must run a step)

    def first(self, count: int) -> PairSelection:
        """Only the first `count` pairs: every process keeps as many pairs as the process with the fewest."""
        return replace(self, pairs=self.pairs[: max(count, 0)])

    @property
    def batch_pairs(self) -> tuple[list[int], list[int]]:
        """(chosen indices, rejected indices) to put in the batch: the pairs, or the zero-weight fallback."""
        pairs = self.pairs or (self.fallback,)
        return [chosen for chosen, _ in pairs], [rejected for _, rejected in pairs]

    @property
    def loss_scale(self) -> float:
        """1.0, or 0.0 when the batch holds only the fallback pair (nothing to learn from this step)."""
        return 1.0 if self.pairs else 0.0


def select_pairs(
    rewards: Sequence[float],
    num_samples: int,
    truncated: Sequence[bool] | None = None,
    completion_ids: Sequence[Sequence[int]] | None = None,
    ties: str = "skip",
    tie_tolerance: float = 0.0,
    has_answer: Sequence[bool] | None = None,
) -> PairSelection:
    """One pair per prompt: (best, worst) of its `num_samples` samples, ranked complete-first, then by reward.

    Args:
        rewards: self-reward of each sample, prompt-major (`num_samples` consecutive samples per prompt).
        num_samples: samples per prompt (k >= 2).
        truncated: whether each sample was cut at the length limit (None: all complete).
        completion_ids: the samples' token ids; identical samples always count as a tie (None: not checked).
        ties: `"skip"` drops a tied pair, `"keep"` trains on it. A pair is a tie when both samples are identical,
            or equally complete with rewards at most `tie_tolerance` apart; a complete and a truncated sample never
            tie. With `"keep"`, a prompt whose samples all rank equal pairs its first sample (chosen) with the next.
        tie_tolerance: rewards this close count as equal.
        has_answer: under answer gating, whether each sample is complete with an extractable answer
            (`best_of_n_sampling.answer_flags`); such a sample ranks above any other, and never ties with one.
            None: gating off.

    The first maximum is chosen and the first minimum rejected, so with k = 2 and equal rewards the first sample is
    chosen (XPO's policy sample y).
    """
    if num_samples < 2:
        raise ValueError(f"num_samples={num_samples}: a pair needs at least 2 samples per prompt.")
    if len(rewards) % num_samples:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of num_samples={num_samples}.")
    if ties not in TIE_HANDLING:
        raise ValueError(f"ties={ties!r}; expected one of {list(TIE_HANDLING)}.")
    truncated = [False] * len(rewards) if truncated is None else list(truncated)
    if len(truncated) != len(rewards):
        raise ValueError(f"Got {len(truncated)} truncation flags for {len(rewards)} rewards.")
    answered = [False] * len(rewards) if has_answer is None else [bool(flag) for flag in has_answer]
    if len(answered) != len(rewards):
        raise ValueError(f"Got {len(answered)} answer flags for {len(rewards)} rewards.")

    def rank(i: int) -> tuple[bool, bool, float]:
        return (answered[i], not truncated[i], float(rewards[i]))

    pairs, ties_skipped, fallback = [], 0, None
    for start in range(0, len(rewards), num_samples):
        group = range(start, start + num_samples)
        chosen = max(group, key=rank)  # the first maximum
        rejected = min(group, key=rank)  # the first minimum
        if chosen == rejected:  # every sample ranks equal
            rejected = start + (chosen - start + 1) % num_samples
        same = completion_ids is not None and list(completion_ids[chosen]) == list(completion_ids[rejected])
        tie = same or (rank(chosen)[:2] == rank(rejected)[:2] and rewards[chosen] - rewards[rejected] <= tie_tolerance)
        fallback = fallback or (chosen, rejected)
        if tie and ties == "skip":
            ties_skipped += 1
        else:
            pairs.append((chosen, rejected))
    return PairSelection(pairs=tuple(pairs), ties_skipped=ties_skipped, fallback=fallback)
