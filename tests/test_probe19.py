"""Issue 19 held-out probe (PROBE-19): what a new user's bad inputs found after the first round, each fixed as a class.

- `bon` / `eval` write only into a folder that is new, empty or theirs (a file manifest): a user's same-named
  `report.json` or `data-*.arrow` is never replaced, with or without --overwrite;
- `best_of_n(output_dir=...)` and a trainer's `train()` called from Python lock their output folder as the CLI does;
- the odd values of tests/BAD_INPUTS.md's "Issue 19 held-out probe" section.
"""

import json

import pytest

from tests.test_output_dirs import BON, EVAL, holder, run_cli  # noqa: F401 (holder: a fixture)
from trl_sharpen.output_dir import MANIFEST


def user_file(folder, name, text="the user's own file\n"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


# Output folders: only what we wrote is replaced ------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [EVAL, BON], ids=["eval", "bon"])
def test_a_folder_of_the_users_is_refused_before_the_model_loads(tmp_path, capsys, argv):
    notes = user_file(tmp_path / "out", "notes.txt")
    code, line = run_cli([*argv, "--output_dir", str(notes.parent)], capsys)
    assert code == 1
    assert line.startswith(f"trl-sharpen: error: output_dir {notes.parent} already holds files that trl-sharpen ")
    assert "did not write (notes.txt): pass a new or empty folder, or --overwrite" in line
    assert sorted(p.name for p in notes.parent.iterdir()) == ["notes.txt"]  # nothing written, not even a lock


@pytest.mark.parametrize(
    "argv, name", [(EVAL, "report.json"), (EVAL, "samples.jsonl"), (BON, "data-00000-of-00001.arrow")]
)
def test_a_same_named_user_file_is_never_replaced_even_with_overwrite(tmp_path, capsys, argv, name):
    mine = user_file(tmp_path / "out", name)
    code, line = run_cli([*argv, "--output_dir", str(mine.parent), "--overwrite"], capsys)
    assert code == 1
    assert line == (
        f"trl-sharpen: error: output_dir {mine.parent} holds {name}, which trl-sharpen {argv[0]} did not write: it is "
        "never replaced. Move it away, or pass another output_dir."
    )
    assert mine.read_text() == "the user's own file\n"


def test_eval_writes_beside_user_files_with_overwrite_then_reruns_over_its_own(tmp_path, capsys):
    notes = user_file(tmp_path / "out", "notes.txt")
    out = notes.parent
    assert run_cli([*EVAL, "--output_dir", str(out), "--overwrite"], capsys)[0] == 0
    assert json.loads((out / MANIFEST).read_text()) == {"eval": ["report.json", "samples.jsonl"]}
    (out / "report.json").write_text("stale")
    assert run_cli([*EVAL, "--output_dir", str(out)], capsys)[0] == 0  # its own files: replaced without --overwrite
    assert json.loads((out / "report.json").read_text())["model"]
    assert notes.read_text() == "the user's own file\n"
    # bon into eval's folder: eval's files are not bon's
    code, line = run_cli([*BON, "--output_dir", str(out)], capsys)
    assert code == 1 and "already holds files that trl-sharpen bon did not write" in line


def test_bon_reruns_over_its_own_final_dataset_and_keeps_other_arrow_files(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli([*BON, "--output_dir", str(out)], capsys)[0] == 0
    ours = json.loads((out / MANIFEST).read_text())["bon"]
    assert "bon_run.json" in ours and "shards" in ours and any(n.startswith("data-") for n in ours)
    code, _ = run_cli([*BON, "--output_dir", str(out), "--overwrite", "--num_samples", "3"], capsys)
    assert code == 0
    # A folder written before the manifest (its bon_run.json names it as Best-of-N's) is still resumed
    (out / MANIFEST).unlink()
    assert run_cli([*BON, "--output_dir", str(out), "--num_samples", "3"], capsys)[0] == 0


# Python API: the same lock as the command line -------------------------------------------------------------------------


def test_best_of_n_from_python_takes_the_output_folder_lock(tmp_path, holder, toy_model, toy_tokenizer):  # noqa: F811
    from trl_sharpen import best_of_n

    out = tmp_path / "out"
    first = holder(out)
    with pytest.raises(ValueError, match=rf"output_dir {out} is in use by another run \(pid {first.pid} on "):
        best_of_n(toy_model, toy_tokenizer, ["Q : 1 + 2 = ?"], num_samples=2, max_completion_length=8, output_dir=out)
    assert not (out / "shards").exists() and not (out / "bon_run.json").exists()


def test_a_trainer_called_from_python_takes_the_output_folder_lock(tmp_path, holder, toy_model, toy_tokenizer):  # noqa: F811
    from tests.trainer_args import online_trainer
    from trl_sharpen import SelfRewardDPOTrainer

    trainer = online_trainer(SelfRewardDPOTrainer, tmp_path / "out", toy_model, toy_tokenizer)
    first = holder(tmp_path / "out")
    with pytest.raises(ValueError, match=r"is in use by another run \(pid " + str(first.pid)):
        trainer.train()
    assert trainer.state.global_step == 0
