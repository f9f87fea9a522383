"""The real tasks (trl_sharpen/tasks): labels checked independently, splits disjoint, extractors, CLI."""

import json
import re

import pytest

from trl_sharpen.answers import answers_match, get_answer_extractor
from trl_sharpen.tasks import STOP_STRINGS, TASKS, arithmetic, cut_at_stop, extractor_path, generate_task, prontoqa
from trl_sharpen.tasks.__main__ import main as tasks_main


def prompt_text(row) -> str:
    return row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]


# A forward-chaining reasoner written independently of the generator: it only reads the sentences. ----------------

_PLURALS = {prontoqa.plural(c): c for c in prontoqa.CONCEPTS}
_CONCEPTS = set(prontoqa.CONCEPTS)


def parse_theory(context: str):
    """(is_a edges child -> parents, property rules concept -> {(prop, positive)}, entity, entity's concept)."""
    is_a, props, fact = {}, {}, None
    for sentence in re.findall(r"[^.]+\.", context):
        sentence = sentence.strip()
        if m := re.fullmatch(r"(?:Every|Each) (\w+) is (?:a|an) (\w+)\.", sentence):
            is_a.setdefault(m[1], set()).add(m[2])
        elif (m := re.fullmatch(r"(\w+) are (\w+)\.", sentence)) and m[2] in _PLURALS:
            is_a.setdefault(_PLURALS[m[1].lower()], set()).add(_PLURALS[m[2]])
        elif m := re.fullmatch(r"(?:Every|Each) (\w+) is (not )?(\w+)\.", sentence):
            props.setdefault(m[1], set()).add((m[3], m[2] is None))
        elif m := re.fullmatch(r"(\w+) are (not )?(\w+)\.", sentence):
            props.setdefault(_PLURALS[m[1].lower()], set()).add((m[3], m[2] is None))
        elif m := re.fullmatch(r"([A-Z]\w+) is (?:a|an) (\w+)\.", sentence):
            assert m[2] in _CONCEPTS and fact is None, sentence
            fact = (m[1], m[2])
        else:
            raise AssertionError(f"unparsed sentence {sentence!r}")
    return is_a, props, fact


def forward_chain(context: str) -> dict[tuple[str, bool], int]:
    """Every property literal derivable for the entity, with the fewest rule applications (hops) that derive it."""
    is_a, props, (_, concept) = parse_theory(context)
    hops_to_concept, frontier = {concept: 0}, [concept]
    while frontier:  # breadth-first: the first time a concept is reached is its fewest hops
        nxt = []
        for c in frontier:
            for parent in is_a.get(c, ()):
                if parent not in hops_to_concept:
                    hops_to_concept[parent] = hops_to_concept[c] + 1
                    nxt.append(parent)
        frontier = nxt
    derived = {}
    for c, hops in hops_to_concept.items():
        for literal in props.get(c, ()):
            derived[literal] = min(derived.get(literal, 99), hops + 1)
    return derived


@pytest.fixture(scope="module")
def pronto():
    return generate_task("prontoqa", form="chat", num_train=300, num_test=100, seed=0)


def test_prontoqa_labels_and_depth_by_forward_chaining(pronto):
    for row in pronto["train"] + pronto["test"]:
        derived = forward_chain(row["context"])
        entity = parse_theory(row["context"])[2][0]
        m = re.fullmatch(rf"{entity} is (not )?(\w+)\.", row["query"])
        prop, query_positive = m[2], m[1] is None
        literals = {positive for (p, positive) in derived if p == prop}
        assert len(literals) == 1, f"the query property must be derivable and consistent: {row['context']}"
        (rule_positive,) = literals
        assert row["answer"] == ("True" if rule_positive == query_positive else "False")
        assert derived[(prop, rule_positive)] == row["depth"], row  # the proof has exactly `depth` hops
        # The proof column is that derivation: fact, then one (rule, conclusion) pair per hop.
        assert len(re.findall(r"[^.]+\.", row["proof"])) == 1 + 2 * row["depth"]
        # The distractor: the opposite literal appears in the context but does not apply to the entity.
        assert (prop, not rule_positive) in {
            lit for rules in parse_theory(row["context"])[1].values() for lit in rules
        }


def test_prontoqa_depths_labels_and_prompts(pronto):
    rows = pronto["test"]
    assert sorted({r["depth"] for r in rows}) == [1, 2, 3, 4, 5]
    assert [sum(r["depth"] == d for r in rows) for d in range(1, 6)] == [20] * 5
    trues = sum(r["answer"] == "True" for r in pronto["train"] + rows)
    assert 0.4 < trues / 400 < 0.6
    assert rows[0]["prompt"][0]["role"] == "user"
    assert prompt_text(rows[0]).endswith(prontoqa.CHAT_INSTRUCTION)
    assert all(word not in prompt_text(r).lower() for r in rows for word in ("cat", "dog", "mammal"))


def test_prontoqa_splits_disjoint_and_deterministic(pronto):
    test_questions = {prontoqa.question(r) for r in pronto["test"]}
    assert len(test_questions) == 100
    assert not test_questions & {prontoqa.question(r) for r in pronto["train"]}
    again = generate_task("prontoqa", form="chat", num_train=300, num_test=100, seed=0)
    assert again == pronto
    other = generate_task("prontoqa", form="chat", num_train=300, num_test=100, seed=1)
    assert other["test"] != pronto["test"]


def test_prontoqa_few_shot_prompts():
    splits = generate_task("prontoqa", form="few_shot", num_train=60, num_test=20, num_shots=2, depths=(3,), seed=0)
    train_questions = {prontoqa.question(r) for r in splits["train"]}
    for row in splits["test"]:
        blocks = row["prompt"].split("\n\n")
        assert len(blocks) == 3 and blocks[-1] == f"Q: {prontoqa.question(row)}\nA:"
        for block in blocks[:-1]:
            q, a = block.removeprefix("Q: ").split("\nA: ")
            assert q in train_questions and a in ("True", "False")  # shots come from the train split only
    assert {r["depth"] for r in splits["test"]} == {3}
    with pytest.raises(ValueError, match="depth"):
        generate_task("prontoqa", depths=(6,))


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("False", "False"),
        (" true.", "True"),
        ("The statement is false.", "False"),
        ("True or false: Max is bitter. False", "False"),  # an echoed question is not an answer
        (" True\n\nQ: Every wumpus is sweet. True or false: Max is sweet.\nA: False", "True"),  # stops at the stop
        (" False\nQ: next", "False"),
        ("Yes, Max is bitter.", None),
        ("", None),
    ],
)
def test_prontoqa_extract_answer(completion, expected):
    assert prontoqa.extract_answer(completion) == expected


def test_prontoqa_checker_through_the_project_extractor_path():
    extractor = get_answer_extractor(extractor_path("prontoqa"))
    assert extractor is prontoqa.extract_answer
    assert answers_match("False.", "False", extractor) and not answers_match("True", "False", extractor)
    assert prontoqa.check_answer(" false", "False") and not prontoqa.check_answer("maybe", "False")


# Arithmetic ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", list(arithmetic.LEVELS))
def test_arithmetic_answers_digits_and_disjoint_splits(level):
    spec = arithmetic.LEVELS[level]
    num_train, num_test = (60, 30) if len(spec.problems()) >= 90 else (30, 20)  # sub1 has 55 problems
    splits = generate_task("arithmetic", level=level, form="chat", num_train=num_train, num_test=num_test, seed=3)
    for row in splits["train"] + splits["test"]:
        a, op, b = re.search(r"What is (\d+) ([-+*]) (\d+)\?", prompt_text(row)).groups()
        assert (int(a), int(b)) == (row["a"], row["b"]) and op == spec.operator
        assert int(row["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert int(row["answer"]) >= 0
        if spec.up_to:  # operands of at most so many digits
            assert len(a) <= spec.digits_a and len(b) <= spec.digits_b
        else:
            assert (len(a), len(b)) == (spec.digits_a, spec.digits_b)
    pairs = lambda rows: {(r["a"], r["b"]) for r in rows}  # noqa: E731
    assert len(pairs(splits["test"])) == num_test and len(pairs(splits["train"])) == num_train
    assert not pairs(splits["test"]) & pairs(splits["train"])


def test_arithmetic_few_shot_prompts_and_determinism():
    splits = generate_task("arithmetic", level="add2", form="few_shot", num_train=50, num_test=20, num_shots=3)
    train = {(r["a"], r["b"]) for r in splits["train"]}
    for row in splits["test"] + splits["train"]:
        blocks = row["prompt"].split("\n\n")
        assert len(blocks) == 4 and blocks[-1] == f"Q: What is {row['a']} + {row['b']}?\nA:"
        for block in blocks[:-1]:
            a, b, result = map(int, re.fullmatch(r"Q: What is (\d+) \+ (\d+)\?\nA: (\d+)", block).groups())
            assert a + b == result and (a, b) in train and (a, b) != (row["a"], row["b"])
    assert generate_task("arithmetic", level="add2", form="few_shot", num_train=50, num_test=20) == splits
    # The test split does not move when the train split grows (comparable evaluations).
    bigger = generate_task("arithmetic", level="add2", form="chat", num_train=200, num_test=20)
    smaller = generate_task("arithmetic", level="add2", form="chat", num_train=50, num_test=20)
    assert bigger["test"] == smaller["test"]


def test_arithmetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="level"):
        generate_task("arithmetic", level="add9")
    with pytest.raises(ValueError, match="distinct problems"):
        generate_task("arithmetic", level="add1", num_train=90, num_test=20)  # only 100 one-digit pairs
    with pytest.raises(ValueError, match="form"):
        generate_task("arithmetic", form="zero_shot")
    with pytest.raises(ValueError, match="Unknown task"):
        generate_task("gsm8k")


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("145", "145"),
        ("The answer is 145.", "145"),
        ("98 + 47 = 145", "145"),
        (" 145\n\nQ: What is 3 + 4?\nA: 7", "145"),  # only up to the stop string
        (" 1,450", "1450"),
        ("I don't know", None),
    ],
)
def test_arithmetic_extract_answer(completion, expected):
    assert arithmetic.extract_answer(completion) == expected


def test_cut_at_stop_matches_the_stop_strings():
    for stop in STOP_STRINGS:
        assert cut_at_stop(f" 7{stop}rest") == " 7"
    assert cut_at_stop("no stop here") == "no stop here"


def test_cli_writes_jsonl_splits(tmp_path, capsys):
    tasks_main(
        ["prontoqa", "--form", "few_shot", "--num_train", "30", "--num_test", "10", "--output_dir", str(tmp_path)]
    )
    rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and {"prompt", "answer"} <= set(rows[0])
    assert rows == generate_task("prontoqa", form="few_shot", num_train=30, num_test=10)["test"]
    assert "trl_sharpen.tasks.prontoqa:extract_answer" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tasks_main(["arithmetic", "--level", "add1", "--num_train", "99", "--output_dir", str(tmp_path)])
    assert set(TASKS) == {"arithmetic", "prontoqa"}


SHIPPED = {
    "arithmetic_add1_chat": ("arithmetic", dict(level="add1", form="chat", num_train=60, num_test=40)),
    "prontoqa_chat": ("prontoqa", dict(form="chat", num_train=200, num_test=200)),
    "arithmetic_mixed1_chat": ("arithmetic", dict(level="mixed1", form="chat", num_train=55, num_test=200)),
}


def test_widened_one_digit_task_has_200_test_prompts_disjoint_from_train():
    """Setting (a) of the real-model table: 1-digit arithmetic widened (addition, subtraction without negative
    results, multiplication: 255 problems) so that 200 test prompts are 200 distinct problems that no train prompt
    repeats (one prompt is 0.005, not add1's 0.025)."""
    splits = generate_task("arithmetic", **SHIPPED["arithmetic_mixed1_chat"][1])
    problems = lambda rows: {(r["level"], r["a"], r["b"]) for r in rows}  # noqa: E731
    test, train = problems(splits["test"]), problems(splits["train"])
    assert len(test) == 200 and len(train) == 55 and not test & train
    assert {prompt_text(r) for r in splits["test"]}.isdisjoint(prompt_text(r) for r in splits["train"])
    assert test | train == {
        (name, a, b) for name in ("add1", "sub1", "mul1") for a, b in arithmetic.LEVELS[name].problems()
    }
    assert {level for level, _, _ in test} == {"add1", "sub1", "mul1"}
    for row in splits["test"] + splits["train"]:  # each row's question and answer follow its own level
        a, op, b = re.search(r"What is (\d) ([-+*]) (\d)\?", prompt_text(row)).groups()
        assert op == arithmetic.LEVELS[row["level"]].operator
        assert row["answer"] == str(arithmetic.LEVELS[row["level"]].result(int(a), int(b)))
    with pytest.raises(ValueError, match="distinct problems"):
        generate_task("arithmetic", level="mixed1", num_train=56, num_test=200)
    few_shot = generate_task("arithmetic", level="mixed1", form="few_shot", num_train=55, num_test=5)
    assert all(row["prompt"].count("Q: ") == 4 for row in few_shot["test"])


@pytest.mark.parametrize("folder", list(SHIPPED))
def test_shipped_task_data_is_what_the_generator_writes(folder):
    """The recipes' datasets (trl_sharpen/tasks/data/*) are reproducible: python -m trl_sharpen.tasks writes them."""
    from pathlib import Path

    data = Path(arithmetic.__file__).parent / "data" / folder
    task, options = SHIPPED[folder]
    expected = generate_task(task, **options)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]
        assert rows == expected[split]
