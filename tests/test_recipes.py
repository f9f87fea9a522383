"""Every recipe under recipes/: its YAMLs parse with its own parser (unknown keys are errors), `--help` exits 0, and it
takes part in the distributed tests."""

import subprocess
import sys

import pytest

from tests.launching import RECIPES, REPO, parse_recipe_yaml


SCRIPTS = sorted((REPO / "recipes").glob("*.py"))
YAMLS = sorted(path for script in SCRIPTS for path in (script.parent / script.stem).glob("*.yaml"))


def test_every_recipe_has_yamls_and_runs_in_the_distributed_tests():
    assert SCRIPTS, "no recipes found"
    for script in SCRIPTS:
        assert (script.parent / script.stem / "toy_cpu.yaml").exists(), f"{script.name} has no toy_cpu.yaml"
    assert {script.stem for script in SCRIPTS} <= {recipe.name for recipe in RECIPES}, (
        "add the new recipe to tests/launching.py RECIPES"
    )


@pytest.mark.parametrize("yaml_path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_yaml_parses_with_its_scripts_parser(yaml_path):
    parsed = parse_recipe_yaml(yaml_path)
    training_args = next(value for value in parsed if hasattr(value, "output_dir"))
    assert training_args.output_dir.startswith("outputs/"), "recipes write under outputs/ (git-ignored)"


def test_every_recipe_help_exits_0():
    # Concurrently: each process spends its time importing TRL
    processes = {
        script.name: subprocess.Popen(
            [sys.executable, str(script), "--help"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script in SCRIPTS
    }
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name} --help: {stderr[-2000:]}"
        assert "--output_dir" in stdout and "--use_peft" in stdout, name


def test_greedy_report_reads_answers_with_the_runs_answer_extractor():
    """The recipes' before/after report checks greedy outputs with the run's `answer_extractor`: with the default
    (last number) every ProntoQA output ("True."/"False.") would count as wrong."""
    from types import SimpleNamespace

    from datasets import Dataset, DatasetDict

    from trl_sharpen.script_utils import SharpenScriptArguments, add_greedy_report

    test = Dataset.from_dict({"prompt": ["Is Max a wumpus? True or false?"], "answer": ["True"]})
    callbacks = []
    for extractor in (None, "trl_sharpen.tasks.prontoqa:extract_answer"):
        trainer = SimpleNamespace(args=SimpleNamespace(answer_extractor=extractor), add_callback=callbacks.append)
        add_greedy_report(trainer, DatasetDict(test=test), SharpenScriptArguments(dataset_test_split="test"))
    default, prontoqa = (callback.checker for callback in callbacks)
    assert not default("True.", "True")
    assert prontoqa("True.", "True") and not prontoqa("False.", "True")
    # and samples the policy itself, k = 8 per prompt, at the run's temperature and at the field's T = 1
    trainer = SimpleNamespace(
        args=SimpleNamespace(answer_extractor=None, temperature=0.7), add_callback=callbacks.append
    )
    add_greedy_report(trainer, DatasetDict(test=test), SharpenScriptArguments(dataset_test_split="test"))
    assert (callbacks[-1].num_samples, callbacks[-1].temperatures) == (8, [0.7, 1.0])
    with pytest.raises(ValueError, match="report_num_samples"):
        add_greedy_report(trainer, DatasetDict(test=test), SharpenScriptArguments(report_num_samples=-1))
