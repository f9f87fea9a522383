"""ProntoQA-style deductive reasoning (Saparov & He 2023, "Language Models Are Greedy Reasoners"), generated offline.

ProntoQA is one of the three datasets of the sharpening paper (Huang et al. 2025, App. A.4). Its procedure, which we
follow:

1. A fictional ontology with made-up concept names (wumpus, yumpus, ...), so the model cannot answer from world
   knowledge: a chain of subsumption rules ("Every wumpus is a yumpus.") from the entity's concept upwards, and a
   property rule on every concept of the chain ("Yumpuses are not bitter."), each concept's property from a different
   property family so the ontology is consistent.
2. A fact about an entity ("Max is a wumpus.") and a true/false query about one property ("True or false: Max is not
   bitter."). The proof of the query has `depth` hops: depth - 1 subsumption steps, then the property rule, so
   `depth` is the number of rules the proof applies (1-5). Labels are balanced: the rule's polarity and the query's
   polarity are drawn independently.
3. Distractors: one concept above the proof's last one, with its own property, and a sibling concept under it that
   is *not* an ancestor of the entity ("Every dumpus is a yumpus.") carrying the opposite property ("Every dumpus is
   bitter."), so a model that matches the nearest mention of the property is misled. Sentences are shuffled, the fact comes last (as in ProntoQA).

The `proof` column holds the chain of thought ("Max is a wumpus. Every wumpus is a yumpus. Max is a yumpus. ...").
The answer is "True" or "False"; prompts ask for the answer directly (no chain of thought), which keeps completions
a few tokens long on CPU. Train and test examples are disjoint (distinct question texts).

    chat:     [{"role": "user", "content": "<context> True or false: Max is not bitter. Reply with only True or False."}]
    few_shot: "Q: <context> True or false: Fae is sweet.\\nA: True\\n\\n...Q: <context> True or false: Max is not bitter.\\nA:"
"""

from __future__ import annotations

import random
import re

from .common import chat_prompt, check_form, cut_at_stop, few_shot_prompt


# ProntoQA's fictional concept names, entity names and property families.
CONCEPTS = (
    "wumpus", "yumpus", "zumpus", "dumpus", "rompus", "numpus", "tumpus", "vumpus", "impus",
    "jompus", "gorpus", "shumpus", "lempus", "sterpus", "grimpus", "lorpus", "brimpus",
)  # fmt: skip
ENTITIES = ("Max", "Alex", "Sally", "Sam", "Fae", "Rex", "Polly", "Stella", "Wren")
PROPERTY_FAMILIES = (
    ("blue", "red", "brown", "orange"),
    ("small", "large"),
    ("metallic", "wooden", "luminous", "liquid"),
    ("transparent", "opaque"),
    ("nervous", "happy", "feisty", "shy"),
    ("bright", "dull"),
    ("sweet", "sour", "spicy", "bitter", "salty"),
    ("floral", "fruity", "earthy"),
    ("hot", "cold", "temperate"),
    ("kind", "mean", "angry", "amenable", "aggressive"),
)
DEPTHS = (1, 2, 3, 4, 5)
CHAT_INSTRUCTION = "Reply with only True or False."


def plural(concept: str) -> str:
    return concept + "es" if concept.endswith("s") else concept + "s"


def article(concept: str) -> str:
    return "an" if concept[0] in "aeiou" else "a"


def is_a_sentence(child: str, parent: str, rng: random.Random) -> str:
    """One of ProntoQA's surface forms of "every child is a parent"."""
    return rng.choice(
        (
            f"Every {child} is {article(parent)} {parent}.",
            f"Each {child} is {article(parent)} {parent}.",
            f"{plural(child).capitalize()} are {plural(parent)}.",
        )
    )


def property_sentence(concept: str, prop: str, positive: bool, rng: random.Random) -> str:
    neg = "" if positive else "not "
    return rng.choice(
        (
            f"Every {concept} is {neg}{prop}.",
            f"Each {concept} is {neg}{prop}.",
            f"{plural(concept).capitalize()} are {neg}{prop}.",
        )
    )


def generate_example(depth: int, rng: random.Random) -> dict:
    """One example whose proof has `depth` hops (see the module docstring for the procedure)."""
    if depth not in DEPTHS:
        raise ValueError(f"ProntoQA proofs have depth 1-5, got {depth}.")
    names = rng.sample(CONCEPTS, depth + 2)
    chain, sibling = names[: depth + 1], names[depth + 1]  # chain[depth] sits above the proof's last concept
    families = rng.sample(PROPERTY_FAMILIES, depth + 1)
    properties = [(rng.choice(family), rng.random() < 0.5) for family in families]  # one per chain concept
    entity = rng.choice(ENTITIES)
    query_property, rule_positive = properties[depth - 1]  # the rule on the proof's last concept
    query_positive = rng.random() < 0.5

    rules = [is_a_sentence(chain[i], chain[i + 1], rng) for i in range(depth)]
    rules += [property_sentence(chain[i], p, pos, rng) for i, (p, pos) in enumerate(properties)]
    # Distractor: a sibling of the proof's last concept (both under chain[depth]), not an ancestor of the entity, with
    # the opposite polarity of the query's rule. Hanging it above the property rule keeps the ontology consistent.
    rules.append(is_a_sentence(sibling, chain[depth], rng))
    rules.append(property_sentence(sibling, query_property, not rule_positive, rng))
    rng.shuffle(rules)
    context = " ".join([*rules, f"{entity} is {article(chain[0])} {chain[0]}."])
    query = f"{entity} is {'' if query_positive else 'not '}{query_property}."

    proof = [f"{entity} is {article(chain[0])} {chain[0]}."]
    for i in range(depth - 1):
        proof += [
            f"Every {chain[i]} is {article(chain[i + 1])} {chain[i + 1]}.",
            f"{entity} is {article(chain[i + 1])} {chain[i + 1]}.",
        ]
    neg = "" if rule_positive else "not "
    proof += [f"Every {chain[depth - 1]} is {neg}{query_property}.", f"{entity} is {neg}{query_property}."]
    return {
        "context": context,
        "query": query,
        "answer": "True" if rule_positive == query_positive else "False",
        "depth": depth,
        "proof": " ".join(proof),
    }


def question(example: dict) -> str:
    return f"{example['context']} True or false: {example['query']}"


def generate(
    form: str = "chat",
    num_train: int = 500,
    num_test: int = 100,
    depths: tuple[int, ...] = DEPTHS,
    num_shots: int = 2,
    max_shot_depth: int = 2,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Train and test examples, depths cycling through `depths` (balanced), True/False balanced in expectation.

    Few-shot prompts take `num_shots` train examples of depth <= `max_shot_depth` (short shots keep prompts short;
    the shallowest of `depths` when every depth is deeper).
    """
    check_form(form)
    depths = tuple(sorted(set(depths)))
    if not depths or any(d not in DEPTHS for d in depths):
        raise ValueError(f"--depths must be a subset of {DEPTHS}, got {depths}.")
    rng = random.Random(seed)
    examples, seen, misses = [], set(), 0
    while len(examples) < num_test + num_train:
        example = generate_example(depths[len(examples) % len(depths)], rng)
        if question(example) not in seen:  # distinct questions: the splits are disjoint
            seen.add(question(example))
            examples.append(example)
            misses = 0
        else:
            misses += 1
            if misses > 10_000:  # the depths' distinct questions are used up: never loop forever
                raise ValueError(
                    f"Found only {len(examples)} distinct questions for depths {depths}; lower --num_train/--num_test "
                    "or add depths."
                )
    test, train = examples[:num_test], examples[num_test:]
    shot_depth = max(max_shot_depth, depths[0])  # the shallowest generated depth when all are deeper
    shot_pool = [e for e in train if e["depth"] <= shot_depth]
    if form == "few_shot" and len(shot_pool) < num_shots + 1:
        raise ValueError(f"Too few train examples of depth <= {shot_depth} for {num_shots} shots; raise --num_train.")
    shot_rng = random.Random(seed + 1)

    def row(example: dict) -> dict:
        if form == "chat":
            prompt = chat_prompt(f"{question(example)} {CHAT_INSTRUCTION}")
        else:
            pool = [e for e in shot_pool if e is not example]
            shots = [(question(e), e["answer"]) for e in shot_rng.sample(pool, num_shots)]
            prompt = few_shot_prompt(shots, question(example))
        return {"prompt": prompt, **example}

    return {"train": [row(e) for e in train], "test": [row(e) for e in test]}


_ECHO = re.compile(r"true\s+or\s+false", re.IGNORECASE)
_VERDICT = re.compile(r"\b(true|false)\b", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """ "True" or "False": the first true/false word before the first stop string, ignoring an echoed "True or
    false"; None when there is none (e.g. "Yes")."""
    match = _VERDICT.search(_ECHO.sub(" ", cut_at_stop(text)))
    return None if match is None else match.group(1).capitalize()


def check_answer(completion: str, reference: str) -> bool:
    """Checker for `trl-sharpen eval --checker trl_sharpen.tasks.prontoqa:check_answer`."""
    return extract_answer(completion) == str(reference).strip().capitalize()
