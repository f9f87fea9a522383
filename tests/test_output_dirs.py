"""Output folders (issue 19, D1-D4): no command deletes or mixes into a folder it did not write.

- D1 `convert --output_dir` replaces only a folder holding a previous conversion (and nothing else);
- D2 an empty or current-directory output_dir (or one above it, home, /) is refused everywhere;
- D3 a second `bon` / `eval` on a folder another run holds is refused, naming that run;
- D4 recipes lock their folder too, and refuse another run's checkpoints unless they resume or overwrite;
- the destructive-path test: every command that writes a folder, run against a folder holding a user file, leaves
  that file in place (or refuses).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.test_real_models import write_tiny_gguf
from tests.trainer_args import cpu_test_args
from trl_sharpen import cli, real_models
from trl_sharpen.output_dir import LOCK_FILE, acquire_output_dir, file_lock, read_lock_holder
from trl_sharpen.toy import TOY_DATA_DIR, TOY_MODEL_PATH


TEST_JSONL = f"{TOY_DATA_DIR}/test.jsonl"
FAST = ["--num_prompts", "2", "--num_samples", "2", "--max_completion_length", "8"]
BON = ["bon", "--model_name_or_path", TOY_MODEL_PATH, "--dataset_name", TEST_JSONL, *FAST]
EVAL = ["eval", "--model_name_or_path", TOY_MODEL_PATH, "--dataset_name", TEST_JSONL, *FAST, "--plots", "false"]


def run_cli(argv, capsys):
    """`trl-sharpen ARGV` in-process: (exit code, last stderr line)."""
    code = 0
    try:
        cli.main(list(argv))
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("the user's own file\n")
    return path


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of a folder, as a second run would find it."""
    processes = []

    def start(folder):
        code = (
            "import sys, time; from trl_sharpen.output_dir import acquire_output_dir; "
            f"acquire_output_dir({str(folder)!r}); print('held', flush=True); time.sleep(120)"
        )
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "held"
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()


# D1: convert ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def toy_as_gguf(monkeypatch):
    """`load_gguf` returning the toy model, so that `convert_gguf` runs whole (save, marker, replace) in milliseconds;
    the GGUF files themselves are small well-formed ones (the file checks and the SHA-256 see real files)."""

    def load(path):
        return AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH), AutoTokenizer.from_pretrained(TOY_MODEL_PATH)

    monkeypatch.setattr(real_models, "load_gguf", load)


def test_convert_replaces_a_previous_conversion_and_never_a_user_folder(tmp_path, toy_as_gguf, capsys):
    first, second = write_tiny_gguf(tmp_path / "a.gguf", 1.0), write_tiny_gguf(tmp_path / "b.gguf", 2.0)
    out = tmp_path / "converted"
    assert run_cli(["convert", str(first), "--output_dir", str(out)], capsys)[0] == 0
    assert json.loads((out / "conversion.json").read_text())["gguf_sha256"] == real_models.file_sha256(first)
    # A previous conversion (only its own files) is replaced by the new one, atomically: no temporary folder is left
    assert run_cli(["convert", str(second), "--output_dir", str(out)], capsys)[0] == 0
    assert json.loads((out / "conversion.json").read_text())["gguf_sha256"] == real_models.file_sha256(second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "converted"]
    # A conversion with a file of the user's in it, or a folder of the user's: refused, the file stays
    user_folder(out)
    code, line = run_cli(["convert", str(first), "--output_dir", str(out)], capsys)
    assert code == 1 and "holds a previous conversion plus files it did not write (notes.txt)" in line
    mine = user_folder(tmp_path / "mine")
    code, line = run_cli(["convert", str(first), "--output_dir", str(mine)], capsys)
    assert code == 1 and line.startswith(f"trl-sharpen: error: output_dir {mine} already holds files that are not")
    assert (out / "notes.txt").exists() and (mine / "notes.txt").exists()


def test_convert_names_bad_gguf_files_and_the_cache_variable(tmp_path, monkeypatch, capsys):
    good = write_tiny_gguf(tmp_path / "good.gguf")
    data = good.read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[:-100])
    (tmp_path / "header.gguf").write_bytes(data[:24])
    (tmp_path / "text.gguf").write_text("not a model")
    cases = {
        "missing.gguf": f"The GGUF file {tmp_path}/missing.gguf does not exist: check the path.",
        "truncated.gguf": f"{tmp_path}/truncated.gguf is a damaged or truncated GGUF file (",
        "header.gguf": f"{tmp_path}/header.gguf is a damaged or truncated GGUF file (",
        "text.gguf": f"{tmp_path}/text.gguf is not a GGUF file",
    }
    for name, message in cases.items():
        code, line = run_cli(["convert", str(tmp_path / name)], capsys)
        assert code == 1 and line.startswith(f"trl-sharpen: error: {message}"), line
    code, line = run_cli(["convert", "not-a-model"], capsys)  # was `error: ...` without the program name
    assert code == 1 and line.startswith("trl-sharpen: error: 'not-a-model' is neither a .gguf file")
    monkeypatch.setenv(real_models.CACHE_ENV, "/proc/trl_sharpen_cache")
    code, line = run_cli(["convert", str(good)], capsys)
    assert code == 1 and f"comes from {real_models.CACHE_ENV}" in line, line


def test_a_held_conversion_lock_says_whom_it_waits_for(tmp_path, capsys):
    lock = tmp_path / ".model.lock"
    code = (
        "import time; from trl_sharpen.output_dir import file_lock\n"
        f"with file_lock({str(lock)!r}):\n    print('held', flush=True); time.sleep(1.5)"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    with file_lock(lock, what=" (converting x into y)"):
        pass
    process.wait()
    assert f"Waiting for pid {process.pid} on " in capsys.readouterr().err


# D2: '', '.', a folder above it ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", ".", "..", "~"])
@pytest.mark.parametrize("command", ["convert", "bon", "eval"])
def test_current_directory_and_above_are_refused(tmp_path, monkeypatch, capsys, command, value):
    work = user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    gguf = write_tiny_gguf(tmp_path / "m.gguf")
    argv = {"convert": ["convert", str(gguf)], "bon": BON, "eval": EVAL}[command]
    code, line = run_cli([*argv, "--output_dir", value], capsys)
    assert code == 1 and line.startswith("trl-sharpen: error: output_dir "), line
    assert any(text in line for text in ("is empty", "current directory", "home folder")), line
    assert sorted(os.listdir(work)) == ["notes.txt"]


def test_configs_and_the_tasks_writer_refuse_the_current_directory(tmp_path, monkeypatch):
    from trl_sharpen import SelfRewardDPOConfig
    from trl_sharpen.tasks.__main__ import main as tasks_main

    monkeypatch.chdir(user_folder(tmp_path))
    for value in ("", "."):
        with pytest.raises(ValueError, match="output_dir"):
            cpu_test_args(SelfRewardDPOConfig, value)
        with pytest.raises(SystemExit):
            tasks_main(["arithmetic", "--output_dir", value])
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_best_of_n_from_python_refuses_the_current_directory(toy_model, toy_tokenizer, tmp_path, monkeypatch):
    from trl_sharpen import best_of_n

    monkeypatch.chdir(user_folder(tmp_path))
    for value in ("", ".", tmp_path):
        with pytest.raises(ValueError, match="output_dir"):
            best_of_n(
                toy_model, toy_tokenizer, ["Q : 1 + 2 = ?"], num_samples=2, max_completion_length=8, output_dir=value
            )
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


# D3: two runs on one folder ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [BON, EVAL], ids=["bon", "eval"])
def test_a_second_run_on_a_held_folder_is_refused_naming_the_first(tmp_path, capsys, holder, monkeypatch, argv):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    first = holder(out)
    code, line = run_cli([*argv, "--output_dir", str(out)], capsys)
    assert code == 1, line
    assert line.startswith(f"trl-sharpen: error: output_dir {out} is in use by another run (pid {first.pid} on ")
    assert "Wait for it to finish, or pass another output_dir" in line


def test_a_lock_left_by_a_dead_run_is_taken_over_and_released(tmp_path, holder):
    out = tmp_path / "out"
    first = holder(out)
    first.send_signal(signal.SIGKILL)  # killed: its lock file stays, naming a pid that no longer exists
    first.wait()
    assert read_lock_holder(out)["pid"] == first.pid
    release = acquire_output_dir(out)
    assert read_lock_holder(out)["pid"] == os.getpid()
    assert acquire_output_dir(out) is not None  # re-entrant within this process
    release()
    assert (out / LOCK_FILE).exists()  # still held once
    release()
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow  # two processes that each import torch and load the toy model (~14 s on 2 busy cores)
def test_two_bon_runs_started_together_one_refused(tmp_path):
    """The issue's D3 as it happened: two `bon` processes on one folder with different temperatures. One runs, the
    other is refused; the dataset and bon_run.json are the first run's only."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "trl_sharpen.cli", *BON, "--output_dir", str(out)]
    runs = [
        subprocess.Popen([*argv, "--temperature", t], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for t in ("1.0", "0.5")
    ]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    if codes == [0, 0]:  # the first finished before the second reached its lock: run one after the other
        pytest.skip("the runs did not overlap on this machine")
    assert codes == [0, 1], results
    refused = next(err for code, err in results if code == 1)
    assert "is in use by another run" in refused.strip().splitlines()[-1]


# D4: recipes ---------------------------------------------------------------------------------------------------------


def recipe_args(output_dir, **overrides):
    """(training_args, script_args, model_args) of a DPO recipe run into `output_dir`."""
    from trl import ModelConfig

    from trl_sharpen import SelfRewardDPOConfig
    from trl_sharpen.script_utils import SharpenScriptArguments

    script = SharpenScriptArguments(overwrite_output_dir=overrides.pop("overwrite_output_dir", False))
    return (
        cpu_test_args(SelfRewardDPOConfig, output_dir, **overrides),
        script,
        ModelConfig(),
    )  # claim_output_dir's order


def test_recipes_lock_and_refuse_another_runs_checkpoints(tmp_path, holder):
    from trl_sharpen.script_utils import RUN_FILE, claim_output_dir

    out = tmp_path / "out"
    training, script, model = recipe_args(out)
    first = holder(out)
    with pytest.raises(ValueError, match=rf"output_dir {out} is in use by another run \(pid {first.pid} on "):
        claim_output_dir(training, script, model)
    first.kill()
    first.wait()

    # A first run: recorded; its checkpoints then stand in the folder
    claim_output_dir(training, script, model)
    assert json.loads((out / RUN_FILE).read_text())["learning_rate"] == training.learning_rate
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")  # what makes it a Trainer checkpoint
    user_folder(out)
    claim_output_dir(training, script, model)  # the same arguments again: allowed

    other, script, model = recipe_args(out, learning_rate=0.5)
    with pytest.raises(ValueError) as error:
        claim_output_dir(other, script, model)
    assert str(error.value).startswith(
        f"output_dir {out} holds checkpoint-2 of a run with other arguments (learning_rate: 0.001 -> 0.5): this run "
        "would overwrite them. Resume that run with --resume_from_checkpoint true, discard its checkpoints with "
        "--overwrite_output_dir true, or pass another --output_dir."
    )
    claim_output_dir(*recipe_args(out, learning_rate=0.5, resume_from_checkpoint="true"))  # resuming: allowed
    other, script, model = recipe_args(out, learning_rate=0.5, overwrite_output_dir=True)
    claim_output_dir(other, script, model)
    assert not (out / "checkpoint-2").exists() and (out / "notes.txt").exists()

    # Checkpoints of an unrecorded run (plain HF Trainer): refused too
    bare = user_folder(tmp_path / "bare")
    (bare / "checkpoint-5").mkdir()
    with pytest.raises(ValueError, match="holds checkpoint-5 of another run whose arguments were not recorded"):
        claim_output_dir(*recipe_args(bare))


def test_resume_true_without_a_checkpoint_is_refused(tmp_path):
    from trl_sharpen.script_utils import claim_output_dir

    training, script, model = recipe_args(tmp_path / "empty", resume_from_checkpoint="true")
    with pytest.raises(ValueError, match="resume_from_checkpoint=true, but output_dir .* holds no checkpoint-<step>"):
        claim_output_dir(training, script, model)


# The destructive-path test ---------------------------------------------------------------------------------------------


def test_no_command_deletes_a_user_file_in_its_output_folder(tmp_path, toy_as_gguf, capsys):
    """Every command that writes or replaces a folder, run against a folder holding a user file: it runs or refuses,
    and the file is still there, unchanged."""
    from trl_sharpen.script_utils import claim_output_dir
    from trl_sharpen.tasks.__main__ import main as tasks_main

    commands = {
        "convert": lambda out: cli.main(
            ["convert", str(write_tiny_gguf(tmp_path / "m.gguf")), "--output_dir", str(out)]
        ),
        "bon": lambda out: cli.main([*BON, "--output_dir", str(out)]),
        "bon --overwrite": lambda out: cli.main([*BON, "--output_dir", str(out), "--overwrite"]),
        "eval": lambda out: cli.main([*EVAL, "--output_dir", str(out)]),
        "tasks": lambda out: tasks_main(["arithmetic", "--output_dir", str(out)]),
        "tasks --overwrite": lambda out: tasks_main(["arithmetic", "--output_dir", str(out), "--overwrite"]),
        "recipe": lambda out: claim_output_dir(*recipe_args(out)),
        "recipe --overwrite_output_dir": lambda out: claim_output_dir(*recipe_args(out, overwrite_output_dir=True)),
    }
    outcomes = {}
    for name, command in commands.items():
        out = user_folder(tmp_path / name.replace(" ", "_"))
        for ours in ("checkpoint-3", "shards"):  # folders named like ours, holding the user's files too
            (out / ours).mkdir()
            (out / ours / "notes.txt").write_text("kept\n")
        try:
            command(out)
            outcomes[name] = "ran"
        except (SystemExit, ValueError) as error:
            outcomes[name] = f"refused ({getattr(error, 'code', error)})"
        assert (out / "notes.txt").read_text() == "the user's own file\n", name
        assert (out / "checkpoint-3" / "notes.txt").exists(), name  # not a Trainer checkpoint: never discarded
        assert (out / "shards" / "notes.txt").exists(), name
    capsys.readouterr()
    assert outcomes["tasks"] == "ran", outcomes
    for name in ("convert", "recipe", "recipe --overwrite_output_dir", "bon", "eval", "bon --overwrite"):
        assert outcomes[name].startswith("refused"), outcomes  # bon --overwrite: the user's `shards` is in the way


def test_a_recipe_never_saves_into_the_model_or_dataset_it_reads(tmp_path):
    import shutil

    from trl_sharpen.script_utils import claim_output_dir

    model = tmp_path / "model"
    shutil.copytree(TOY_MODEL_PATH, model)
    training, script, model_args = recipe_args(model, overwrite_output_dir=True)
    model_args.model_name_or_path = str(model)
    with pytest.raises(ValueError, match=f"output_dir {model} is the --model_name_or_path folder"):
        claim_output_dir(training, script, model_args)
    assert sorted(os.listdir(model)) == sorted(os.listdir(TOY_MODEL_PATH))


def test_a_lock_file_left_by_another_machine_is_refused_with_the_way_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = {"pid": 4242, "hostname": "gpu-node-7", "command": "trl-sharpen bon ...", "started": "2026-12-03"}
    (out / LOCK_FILE).write_text(json.dumps(holder))
    with pytest.raises(ValueError) as error:
        acquire_output_dir(out)
    assert str(error.value) == (
        f"output_dir {out} is in use by a run on another machine (pid 4242 on gpu-node-7, started 2026-12-03: "
        f"`trl-sharpen bon ...`). Wait for it to finish, or pass another output_dir; if that run is gone, delete "
        f"{(out / LOCK_FILE).resolve()}."
    )
    (out / LOCK_FILE).unlink()
    acquire_output_dir(out)()  # the way out works


@pytest.mark.parametrize("command", ["bon", "eval"])
def test_bon_and_eval_never_write_into_the_model_folder(tmp_path, capsys, monkeypatch, command):
    import shutil

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    model = tmp_path / "model"
    shutil.copytree(TOY_MODEL_PATH, model)
    argv = [a if a != TOY_MODEL_PATH else str(model) for a in (BON if command == "bon" else EVAL)]
    code, line = run_cli([*argv, "--output_dir", str(model)], capsys)
    assert (
        code == 1
        and line
        == f"trl-sharpen: error: output_dir {model} is the model's folder: pass another folder for the results."
    )
    assert sorted(os.listdir(model)) == sorted(os.listdir(TOY_MODEL_PATH))
