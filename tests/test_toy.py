"""The bundled toy base: a task on which sharpening provably matters, shipped as a normal checkpoint."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_sharpen import best_of_n
from trl_sharpen.evaluation import evaluate_greedy
from trl_sharpen.toy import TOY_DATA_DIR, TOY_MODEL_PATH, check_answer, load_toy_prompts
from trl_sharpen.toy.data import prompt_rows
from trl_sharpen.toy.pretrain import pretrain
from trl_sharpen.toy.task import DEFAULT_TASK, careful_solution, format_prompt, terms_from_prompt


def test_bundled_base_needs_sharpening(toy_model, toy_tokenizer):
    """On the 200 held-out prompts: greedy <= 0.3, pass@16 >= 0.9, BoN@16 by log-probability >= 0.75."""
    test = load_toy_prompts("test")
    assert len(test) == 200
    torch.manual_seed(0)
    greedy = evaluate_greedy(toy_model, toy_tokenizer, test["prompt"], test["answer"], max_new_tokens=48)
    bon = best_of_n(
        toy_model, toy_tokenizer, test, num_samples=16, max_new_tokens=48, generation_batch_size=512, progress=False
    )
    pass_at_16 = sum(any(check_answer(c, r["answer"]) for c in r["completions"]) for r in bon) / len(bon)
    bon_at_16 = sum(check_answer(r["selected_completion"], r["answer"]) for r in bon) / len(bon)
    print(f"greedy {greedy.accuracy:.3f}  pass@16 {pass_at_16:.3f}  BoN@16 {bon_at_16:.3f}")
    assert greedy.accuracy <= 0.3
    assert pass_at_16 >= 0.9
    assert bon_at_16 >= 0.75


def test_greedy_fails_at_the_first_token_and_the_careful_solution_is_the_argmax(toy_model, toy_tokenizer):
    """The mechanism of Prop. 3.1: the first token `answer` carries more mass than the careful path, yet the careful
    sequence is far more likely than any single shortcut."""
    prompt = "Q : 4 + 3 + 9 + 1 = ?"
    ids = toy_tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = toy_model(ids).logits[0, -1].softmax(-1)
    answer_id = toy_tokenizer.convert_tokens_to_ids("answer")
    assert first[answer_id] > 0.5
    careful = toy_tokenizer(careful_solution([4, 3, 9, 1]))["input_ids"] + [toy_tokenizer.eos_token_id]
    shortcut = toy_tokenizer("answer 16")["input_ids"] + [toy_tokenizer.eos_token_id]
    from trl_sharpen import sequence_logprobs

    careful_lp, shortcut_lp = sequence_logprobs(toy_model, [ids[0].tolist()] * 2, [careful, shortcut]).tolist()
    assert careful_lp > shortcut_lp + 2.0


def test_checkpoint_loads_like_a_hub_model_and_the_tokenizer_round_trips():
    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL_PATH)
    model = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH)
    assert model.config.model_type == "llama" and tokenizer.pad_token and tokenizer.eos_token
    text = "Q : 12 + 7 = ? 12 + 7 = 19 . answer 19"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1 + 2 = ?"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|user|> 1 + 2 = ? <|assistant|>"
    assert tokenizer.unk_token_id not in tokenizer(chat)["input_ids"]


def test_committed_prompt_files_match_the_generator_and_splits_are_disjoint():
    for split in ("train", "test"):
        with open(f"{TOY_DATA_DIR}/{split}.jsonl") as f:
            assert [json.loads(line) for line in f] == prompt_rows(split)
    train = {r["prompt"] for r in prompt_rows("train")}
    test = {r["prompt"] for r in prompt_rows("test")}
    assert len(train) == 1000 and len(test) == 200 and not train & test
    for row in prompt_rows("test"):
        assert sum(terms_from_prompt(row["prompt"])) == int(row["answer"])
    assert format_prompt([3, 5]) == "Q : 3 + 5 = ?"
    assert sum(DEFAULT_TASK.terms_weights.values()) == 1.0


def test_pretraining_script_produces_a_loadable_checkpoint(tmp_path):
    out = pretrain(output_dir=tmp_path / "toy", steps=3, batch_size=8, log_every=1)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer) == 113
