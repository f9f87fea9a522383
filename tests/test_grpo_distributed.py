"""SelfRewardGRPOTrainer on 2 CPU processes under DeepSpeed ZeRO-2 and ZeRO-3, with the majority self-reward on
groups that TRL splits across the processes: the votes equal the single-process votes over whole groups, for the
trainer's reward and for the `get_self_reward("majority")` TRL callable, and training steps run on both ranks. (The
ZeRO-3 runs of recipes/grpo_sharpen.py and rloo_sharpen.py, and GRPO's ZeRO-3 resume, are in tests/test_distributed.py
and tests/test_resume.py.)"""

import json

import pytest

from tests.grpo_majority_check import GROUPS
from tests.launching import BACKENDS, EXPECTED_BACKEND, failure_output, launch, rank_lines
from trl_sharpen.self_rewards import MajorityReward


pytestmark = pytest.mark.distributed


def single_process_votes() -> list[float]:
    rows = [text for group in GROUPS for text in group]
    group_ids = [i // 4 for i in range(len(rows))]
    return MajorityReward().score(["x"] * len(rows), rows, [[0]] * len(rows), group_ids=group_ids)


@pytest.mark.parametrize("backend", ["zero2", "zero3"])
def test_majority_votes_over_whole_groups_split_across_processes(backend, tmp_path):
    result = launch(BACKENDS[backend], ["tests/grpo_majority_check.py"], [str(tmp_path)])
    assert result.returncode == 0, failure_output(result)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    measured = json.loads(line.removeprefix("RESULT "))
    expected = single_process_votes()
    assert expected == [0.5, 0.5, 0.25, 0.25, 0.5, 0.0, 0.5, 0.25]  # per-process votes would give 1.0 to rows 0, 1
    assert measured["world"] == 2
    assert measured["trainer"] == pytest.approx(expected)
    assert measured["callable"] == pytest.approx(expected)
    ranks = rank_lines(result.stdout)
    assert [(rank, name, steps) for rank, _, name, steps, _ in ranks] == [
        (0, EXPECTED_BACKEND[backend], 2),
        (1, EXPECTED_BACKEND[backend], 2),
    ]
    assert len({digest for *_, digest in ranks}) == 1
