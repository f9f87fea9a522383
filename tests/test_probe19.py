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


# Data files: named bad lines, the same rows whatever the line endings ---------------------------------------------------

TOY_ROWS = [{"prompt": "Q : 1 + 2 = ?", "answer": "3"}, {"prompt": "Q : 2 + 2 = ?", "answer": "4"}]


def write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_a_prompts_file_that_is_not_json_lines_is_named_with_its_line(tmp_path):
    from trl_sharpen.data import load_prompts

    good = json.dumps(TOY_ROWS[0]) + "\n"
    cases = {
        "text.jsonl": (b"hello world\n", "text.jsonl, line 1: not valid JSON (Expecting value, column 1)"),
        "list.jsonl": ((good + "\n[1, 2]\n").encode(), "list.jsonl, line 3: a JSON list, not an object"),
        "latin1.jsonl": (b'{"prompt": "caf\xe9"}\n', "latin1.jsonl, line 1: not UTF-8 text (byte 0xe9"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(ValueError, match="^" + str(tmp_path / message).replace("(", r"\(").replace(")", r"\)")):
            load_prompts(write(tmp_path / name, data))


def test_a_folder_mixing_data_formats_is_refused(tmp_path):
    from trl_sharpen.data import load_prompts

    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "a.jsonl", (json.dumps(TOY_ROWS[0]) + "\n").encode())
    write(folder / "b.csv", b"prompt,answer\nQ : 2 + 2 = ?,4\n")  # was: silently dropped, one row read
    with pytest.raises(ValueError, match=r"holds \.csv and \.jsonl files: `datasets` would read only one kind"):
        load_prompts(str(folder))


@pytest.mark.parametrize("variant", ["bom", "crlf", "blank_lines"])
def test_bom_crlf_and_blank_lines_read_the_same_prompts(tmp_path, variant):
    from trl_sharpen.data import load_prompts
    from trl_sharpen.samples_file import load_samples_file

    body = "".join(json.dumps({**r, "completions": [" 3", " 4"]}) + "\n" for r in TOY_ROWS)
    data = {"bom": "\ufeff" + body, "crlf": body.replace("\n", "\r\n"), "blank_lines": body.replace("\n", "\n\n")}
    path = write(tmp_path / "p.jsonl", data[variant].encode())
    assert load_prompts(path)["prompt"] == [r["prompt"] for r in TOY_ROWS]
    assert [row["prompt"] for row in load_samples_file(path).rows] == [
        r["prompt"] for r in TOY_ROWS
    ]  # a BOM was refused here


def test_samples_file_that_is_a_folder_missing_or_has_an_empty_prompt(tmp_path):
    from trl_sharpen.samples_file import load_samples_file

    with pytest.raises(FileNotFoundError, match=f"^--samples_file {tmp_path} is a folder: pass the JSON-lines file"):
        load_samples_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="none.jsonl does not exist"):
        load_samples_file(tmp_path / "none.jsonl")
    path = write(tmp_path / "s.jsonl", (json.dumps({"prompt": "  ", "completions": [" 1"]}) + "\n").encode())
    with pytest.raises(ValueError, match=r"s\.jsonl, line 1: `prompt` is empty \(or only whitespace\)"):
        load_samples_file(path)  # was: "Prompt 0 is empty" from the scorer, no file, 0-based


# YAML values of the wrong type, training counts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "yaml, message",
    [
        ("dataset_name: 5\n", "dataset_name must be text, got 5 (int): quote it in the YAML file"),
        ("output_dir: null\n", "output_dir is null (None), but it needs a value"),
        ("self_rewards: logprob\n", "self_rewards must be a list, got the string 'logprob', which would be read one"),
        ("output_dir: 7\n", "output_dir must be text, got 7 (int)"),
        ("num_samples: [1,\n", "the --config file is not valid YAML: while parsing"),
    ],
)
def test_yaml_values_of_the_wrong_type_get_one_line(tmp_path, capsys, yaml, message):
    from trl_sharpen.toy import TOY_MODEL_PATH

    config = tmp_path / "c.yaml"
    config.write_text(yaml)
    command = "bon" if "output_dir" in yaml else "eval"  # bon needs an output_dir; self_rewards is eval's
    argv = [command, "--model_name_or_path", TOY_MODEL_PATH, "--config", str(config)]
    if "output_dir" not in yaml:
        argv = [*argv, "--output_dir", str(tmp_path / "out")]
    if "dataset_name" not in yaml:
        argv = [*argv, "--dataset_name", "x.jsonl"]  # never read: the check runs first
    code, line = run_cli(argv, capsys)
    assert code == 1 and line.startswith(f"trl-sharpen: error: {message}"), line


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be >= 1, got 0"),  # ZeroDivisionError
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be >= 1, got 0"),
        ({"num_train_epochs": -1}, "num_train_epochs must be > 0 when max_steps is unset, got -1"),  # exit 0, 0 steps
    ],
)
def test_training_counts_that_train_nothing_or_crash_are_refused(tmp_path, settings, message):
    from trl_sharpen import BoNSFTConfig, SelfRewardDPOConfig

    for config_class in (SelfRewardDPOConfig, BoNSFTConfig):
        with pytest.raises(ValueError, match=f"^{message}"):
            config_class(output_dir=str(tmp_path), use_cpu=True, **settings)
    SelfRewardDPOConfig(output_dir=str(tmp_path), use_cpu=True, num_train_epochs=0, max_steps=3)  # max_steps rules


# Another model's files ---------------------------------------------------------------------------------------------------


def tiny_llama(path, vocab_size, hidden_size=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def test_eval_refuses_a_base_model_of_another_vocabulary(tmp_path, capsys):
    base = tiny_llama(tmp_path / "other", vocab_size=30)
    code, line = run_cli([*EVAL, "--base_model_name_or_path", base], capsys)  # was: IndexError
    assert code == 1
    assert line.startswith(f"trl-sharpen: error: --base_model_name_or_path {base} has 30 token embeddings, fewer ")


def test_resuming_a_checkpoint_of_another_model_is_refused_by_name(tmp_path, toy_model):
    from trl_sharpen.checkpoints import check_same_model

    checkpoint = tmp_path / "checkpoint-1"
    tiny_llama(checkpoint, vocab_size=toy_model.config.vocab_size, hidden_size=32)
    with pytest.raises(ValueError, match=rf"^Checkpoint {checkpoint} is of another model \(hidden_size 32 there, 64 "):
        check_same_model(checkpoint, toy_model)  # was: load_state_dict's size-mismatch RuntimeError
    toy_model.save_pretrained(tmp_path / "same")
    check_same_model(tmp_path / "same", toy_model)


def test_a_recipe_never_replaces_the_users_model_card_or_config(tmp_path):
    """The saved model's README.md (model card), config.json and training_args.bin replaced a user's same-named files
    (exit 0, 'Model saved'): a folder of the user's is refused, and --overwrite_output_dir only writes beside it."""
    from tests.test_output_dirs import recipe_args
    from trl_sharpen.script_utils import RUN_FILE, claim_output_dir

    mine = user_file(tmp_path / "out", "README.md")
    with pytest.raises(ValueError, match=r"already holds files that a trl-sharpen recipe did not write \(README.md\)"):
        claim_output_dir(*recipe_args(mine.parent))
    with pytest.raises(ValueError, match="holds README.md, which a trl-sharpen recipe did not write: it is never"):
        claim_output_dir(*recipe_args(mine.parent, overwrite_output_dir=True))
    assert mine.read_text() == "the user's own file\n" and not (mine.parent / RUN_FILE).exists()

    notes = user_file(tmp_path / "beside", "notes.txt")
    claim_output_dir(*recipe_args(notes.parent, overwrite_output_dir=True))  # written beside the user's file
    (notes.parent / "README.md").write_text("our model card")  # what the run's save_model writes
    claim_output_dir(*recipe_args(notes.parent))  # a folder of this recipe's: no flag needed again
    assert notes.read_text() == "the user's own file\n"


def test_eval_refuses_a_base_model_with_another_tokenizer(tmp_path, capsys):
    """Same vocabulary size, two token ids swapped: pi_base would score the model's ids as other text (exit 0)."""
    import shutil

    from trl_sharpen.toy import TOY_MODEL_PATH

    base = tmp_path / "swapped"
    shutil.copytree(TOY_MODEL_PATH, base)
    tokenizer = json.loads((base / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
    (base / "tokenizer.json").write_text(json.dumps(tokenizer))
    code, line = run_cli([*EVAL, "--base_model_name_or_path", str(base)], capsys)
    assert code == 1
    assert line.startswith(f"trl-sharpen: error: --base_model_name_or_path {base} has another tokenizer than the ")


def test_an_adapter_whose_base_is_gone_is_named(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": "/nonexistent/base", "task_type": "CAUSAL_LM"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, line = run_cli(["eval", "--model_name_or_path", str(adapter), *EVAL[3:]], capsys)  # was: "Repo id must be"
    assert code == 1
    assert line.startswith(f"trl-sharpen: error: --model_name_or_path {adapter} is a PEFT adapter whose base model ")


def test_ctrl_c_gets_one_line_with_the_way_to_resume(tmp_path, capsys, monkeypatch):
    from trl_sharpen import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "bon", (cli.COMMANDS["bon"][0], interrupted))
    code, line = run_cli([*BON, "--output_dir", str(tmp_path / "out")], capsys)  # was: a KeyboardInterrupt traceback
    assert code == 130
    assert line == "trl-sharpen: interrupted. bon keeps the shards it wrote: the same command resumes from them."
