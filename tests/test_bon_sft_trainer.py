"""BoNSFTTrainer on the bundled toy base: quality, PEFT, resume, adaptive sampling, the current policy, bad input."""

import pytest
import torch
from datasets import Dataset, load_from_disk
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.utils import GenerationMixin
from trl import SFTConfig

from trl_sharpen import BoNSFTConfig, BoNSFTTrainer, best_of_n, sequence_logprobs
from trl_sharpen.bon_sft_trainer import _as_bon_config
from trl_sharpen.evaluation import evaluate_greedy
from trl_sharpen.toy import TOY_MODEL_PATH, check_answer, load_toy_prompts

from .launching import launch_toy_recipe, parse_recipe_yaml, recipe_yamls, yaml_values_not_applied
from .trainer_args import cpu_test_args


def make_config(tmp_path, **overrides):
    defaults = dict(num_samples=4, generation_batch_size=512, per_device_train_batch_size=16)
    return cpu_test_args(BoNSFTConfig, tmp_path, **{**defaults, **overrides})


def make_trainer(
    tmp_path, tokenizer, model=TOY_MODEL_PATH, train_dataset=None, eval_dataset=None, peft_config=None, **overrides
):
    return BoNSFTTrainer(
        model=model,
        args=make_config(tmp_path, **overrides),
        train_dataset=train_dataset if train_dataset is not None else load_toy_prompts("train", limit=32),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


@pytest.fixture
def generate_calls(monkeypatch):
    """Counts `generate` calls (the real generation still runs)."""
    calls = []
    original = GenerationMixin.generate

    def counting_generate(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", counting_generate)
    return calls


def lora_config():
    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.mark.slow
def test_bon_sft_sharpens_toy_base(tmp_path, toy_model, toy_tokenizer):
    """The issue's acceptance test: greedy accuracy after SFT-Sharpening >= 0.8 x the base's BoN@16 accuracy, and the
    mean log pi_base of greedy outputs rises (the paper's log-likelihood lift, Table 1)."""
    test = load_toy_prompts("test")
    bon = best_of_n(toy_model, toy_tokenizer, test, 16, max_new_tokens=40, generation_batch_size=512, progress=False)
    bon_accuracy = sum(map(check_answer, bon["selected_completion"], bon["answer"])) / len(bon)
    before = evaluate_greedy(toy_model, toy_tokenizer, test["prompt"], test["answer"], base_model=toy_model)

    trainer = make_trainer(
        tmp_path,
        toy_tokenizer,
        train_dataset=load_toy_prompts("train", limit=300),
        num_samples=16,
        per_device_train_batch_size=32,
        num_train_epochs=1,
        max_steps=-1,
        logging_steps=5,
        gradient_checkpointing=False,
        answer_extractor="default",
    )
    trainer.train()
    after = evaluate_greedy(trainer.model, toy_tokenizer, test["prompt"], test["answer"], base_model=toy_model)

    print(f"BoN@16 {bon_accuracy:.3f}; greedy {before.accuracy:.3f} -> {after.accuracy:.3f}; ", end="")
    print(f"mean log pi_base(greedy) {before.mean_base_logprob:.3f} -> {after.mean_base_logprob:.3f}")
    assert bon_accuracy >= 0.9 > before.accuracy
    assert after.accuracy >= 0.8 * bon_accuracy
    assert after.mean_base_logprob > before.mean_base_logprob + 1.0
    losses = logged(trainer, "loss")
    assert losses[-1] < losses[0]
    # Best-of-N statistics, logged once for the one round of data
    assert logged(trainer, "bon/samples_per_prompt") == [16.0]
    assert logged(trainer, "bon/reward_gap")[0] > 0
    assert 1 < logged(trainer, "bon/distinct_answers")[0] <= 16
    assert len(logged(trainer, "bon/selected_reward")) == 1


def test_trains_on_the_exact_sampled_tokens(tmp_path, toy_tokenizer):
    """Conversational prompts; each row is prompt_ids + selected_completion_ids with the loss on the completion only,
    and the Best-of-N data is saved under the output directory as a `datasets` dataset."""
    trainer = make_trainer(tmp_path, toy_tokenizer, train_dataset=load_toy_prompts("train", True, limit=32))
    bon = trainer.bon_dataset
    assert bon["selected_reward"] == [max(rewards) for rewards in bon["rewards"]]
    assert toy_tokenizer.convert_tokens_to_ids("<|assistant|>") == bon[0]["prompt_ids"][-1]  # chat template applied
    rows = {tuple(row["input_ids"]): row["labels"] for row in trainer.train_dataset}
    for row in bon:
        labels = rows[tuple(row["prompt_ids"] + row["selected_completion_ids"])]
        assert labels == [-100] * len(row["prompt_ids"]) + row["selected_completion_ids"]
    assert load_from_disk(str(tmp_path / "bon_data"))["selected_completion_ids"] == bon["selected_completion_ids"]


def test_peft_trains_adapter_and_keeps_base(tmp_path, toy_tokenizer, generate_calls):
    """LoRA with TRL's default gradient checkpointing: the adapter changes, base weights do not, and no second copy of
    the model is made; the model card carries the method tag and the paper."""
    base = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).state_dict().items()}
    trainer = make_trainer(tmp_path, toy_tokenizer, peft_config=lora_config(), learning_rate=1e-2)
    assert trainer._frozen_base is None
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.args.gradient_checkpointing
    assert all(not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    merged = {
        k.removeprefix("base_model.model.").replace(".base_layer", ""): v
        for k, v in trainer.model.state_dict().items()
        if "lora_" not in k
    }
    assert merged.keys() == base.keys()
    assert all(torch.equal(merged[k], base[k]) for k in base)
    assert logged(trainer, "loss")
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "sft-sharpening" in card and "trl-sharpen" in card and "huang2025sharpening" in card


def test_resume_reuses_saved_bon_data(tmp_path, toy_tokenizer, generate_calls):
    first = make_trainer(tmp_path, toy_tokenizer, save_strategy="steps", save_steps=2)
    assert generate_calls
    first.train()
    generate_calls.clear()

    resumed = make_trainer(tmp_path, toy_tokenizer, save_strategy="steps", save_steps=2, max_steps=4)
    assert resumed.bon_dataset["selected_completion_ids"] == first.bon_dataset["selected_completion_ids"]
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    assert not generate_calls  # neither at init nor during training

    # Other sampling arguments on the same output directory are refused, not silently mixed
    with pytest.raises(ValueError, match="other arguments.*num_samples"):
        make_trainer(tmp_path, toy_tokenizer, num_samples=6)


def test_adaptive_sampling_spends_less_on_confident_prompts(tmp_path, toy_tokenizer):
    """App. D: 2-term prompts (careful solution with prob 0.85) stop early; 4-5-term prompts (0.30-0.35) do not."""
    trainer = make_trainer(
        tmp_path,
        toy_tokenizer,
        train_dataset=load_toy_prompts("train", limit=200),
        num_samples=16,
        adaptive_sampling=True,
        adaptive_delta=0.1,
    )
    bon = trainer.bon_dataset
    samples = {k: [n for n, t in zip(bon["num_samples"], bon["num_terms"]) if t == k] for k in (2, 3, 4, 5)}
    mean = {k: sum(v) / len(v) for k, v in samples.items()}
    assert mean[2] <= 6 < mean[4] and mean[2] < mean[5]
    assert trainer._metrics["train"]["bon/samples_per_prompt"] == [sum(bon["num_samples"]) / len(bon)]
    assert sum(bon["num_samples"]) < 16 * len(bon)


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_current_policy_regenerates_each_epoch(tmp_path, toy_tokenizer, generate_calls, use_peft):
    """sampling_policy="current": round 1 is sampled from the trained policy, still ranked under pi_base."""
    trainer = make_trainer(
        tmp_path,
        toy_tokenizer,
        peft_config=lora_config() if use_peft else None,
        sampling_policy="current",
        max_steps=-1,
        num_train_epochs=2,
        learning_rate=1e-2 if use_peft else 3e-3,
        gradient_checkpointing=False,
        answer_extractor="default",
    )
    round0 = trainer.bon_dataset
    assert (trainer._frozen_base is None) == use_peft
    # The dataloader reads through the swappable dataset, so swapping its rows changes what is trained on
    assert trainer.get_train_dataloader().dataset is trainer.train_dataset
    calls_at_init = len(generate_calls)
    trainer.train()

    assert len(generate_calls) > calls_at_init
    round1 = load_from_disk(str(tmp_path / "bon_data_round1"))
    assert trainer.bon_dataset["completion_ids"] == round1["completion_ids"] != round0["completion_ids"]
    assert trainer.train_dataset.dataset["input_ids"] == [
        p + c for p, c in zip(round1["prompt_ids"], round1["selected_completion_ids"])
    ]
    assert len(logged(trainer, "bon/selected_reward")) == 2
    # The policy sharpened after one epoch: fewer distinct answers among its samples than among the base's
    first, second = logged(trainer, "bon/distinct_answers")
    assert second < first
    # Round 1's rewards are log pi_base(y|x), not the sampler's log-probabilities
    base = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH)
    rows = round1.select(range(8))
    prompts = [p for row in rows for p in [row["prompt_ids"]] * len(row["completion_ids"])]
    completions = [c for row in rows for c in row["completion_ids"]]
    expected = sequence_logprobs(base, prompts, completions)
    recorded = torch.tensor([lp for row in rows for lp in row["base_logprobs"]])
    torch.testing.assert_close(recorded, expected, atol=1e-4, rtol=1e-4)


def test_pregenerated_bon_dataset_skips_generation(tmp_path, toy_model, toy_tokenizer, generate_calls):
    """A dataset from `best_of_n` / `trl-sharpen bon` (or its directory) is trained on as is; one generated by another
    model or tokenizer is refused."""
    bon_dir = tmp_path / "bon"
    prompts = load_toy_prompts("train", limit=32)
    bon = best_of_n(toy_model, toy_tokenizer, prompts, 4, max_new_tokens=40, output_dir=bon_dir, progress=False)
    generate_calls.clear()
    for train_dataset in (str(bon_dir), load_from_disk(str(bon_dir))):
        # A Best-of-N dataset also serves as an eval set: the SFT loss on its selected completions
        trainer = make_trainer(tmp_path / "train", toy_tokenizer, train_dataset=train_dataset, eval_dataset=bon)
        assert not generate_calls
        assert trainer.bon_dataset["selected_completion_ids"] == bon["selected_completion_ids"]
        assert not (tmp_path / "train" / "bon_data").exists()
    assert trainer.evaluate()["eval_loss"] > 0
    trainer.train()

    other_model = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH)
    with torch.no_grad():
        other_model.model.norm.weight.mul_(1.01)
    with pytest.raises(ValueError, match="different model"):
        make_trainer(tmp_path / "other", toy_tokenizer, model=other_model, train_dataset=str(bon_dir))
    other_tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL_PATH)
    other_tokenizer.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ValueError, match="different tokenizer"):
        make_trainer(tmp_path / "other", other_tokenizer, train_dataset=str(bon_dir))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_samples": 0}, "num_samples must be an integer >= 1, got 0"),
        ({"adaptive_sampling": True, "adaptive_delta": 0.0}, r"adaptive_delta must be in \(0, 1\), got 0.0"),
        ({"adaptive_sampling": True, "adaptive_delta": 1.5}, r"adaptive_delta must be in \(0, 1\), got 1.5"),
        ({"self_reward": "confidence"}, "Unknown self-reward 'confidence'"),
        ({"truncated_completions": "skip"}, "truncated_completions must be one of .*got .skip."),
        ({"sampling_policy": "policy"}, "Unknown sampling_policy 'policy'"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"sampling_policy": "current", "packing": True}, "packing=True is not supported"),
        ({"sampling_policy": "current", "truncated_completions": "drop"}, "'drop' is not supported"),
    ],
)
def test_bad_config_raises(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **overrides)


@pytest.mark.parametrize(
    ("dataset", "match"),
    [
        ({"question": ["Q : 1 + 2 = ?"]}, "no `prompt` column"),
        ({"prompt": ["Q : 1 + 2 = ?"], "chosen": ["3"], "rejected": ["4"]}, "preference dataset"),
        ({"prompt": ["Q : 1 + 2 = ?"], "completion": ["answer 3"]}, "prompt-completion dataset"),
        ({"messages": [[{"role": "user", "content": "1 + 2 = ?"}]]}, "a `messages` column holds whole conversations"),
    ],
)
def test_bad_train_dataset_raises(tmp_path, toy_tokenizer, dataset, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, toy_tokenizer, train_dataset=Dataset.from_dict(dataset))


def test_prompt_only_eval_dataset_gets_the_sharpening_metrics(tmp_path, toy_tokenizer):
    # Held-out prompts are monitored label-free (trl_sharpen.monitoring; tests/test_monitoring.py), not refused
    trainer = BoNSFTTrainer(
        model=TOY_MODEL_PATH,
        args=make_config(tmp_path, eval_num_prompts=4, eval_num_samples=2),
        train_dataset=load_toy_prompts("train", limit=8),
        eval_dataset=load_toy_prompts("test", limit=8),
        processing_class=toy_tokenizer,
    )
    assert {"eval_objective", "eval_greedy_accuracy"} <= set(trainer.evaluate())


def test_sft_config_is_accepted():
    """Swapping only the trainer class keeps an SFTConfig's values, with our sampling defaults added."""
    args = SFTConfig(output_dir="out", use_cpu=True, report_to="none", learning_rate=1e-4, completion_only_loss=None)
    converted = _as_bon_config(args, TOY_MODEL_PATH)
    assert isinstance(converted, BoNSFTConfig)
    assert converted.learning_rate == 1e-4 and converted.use_cpu and converted.completion_only_loss
    assert converted.num_samples == 50 and converted.temperature == 1.0


@pytest.mark.parametrize("yaml_path", recipe_yamls("sft_sharpen"), ids=lambda p: p.name)
def test_recipe_yaml_parses(yaml_path):
    parsed = parse_recipe_yaml(yaml_path)
    assert yaml_values_not_applied(yaml_path, parsed) == {}
    script_args, training_args, model_args = parsed
    if yaml_path.name.startswith("qwen"):
        assert (training_args.num_samples, training_args.learning_rate, training_args.max_grad_norm) == (50, 3e-4, 0.1)
        assert model_args.use_peft and model_args.lora_r == 16 and script_args.prompt_column == "question"


@pytest.mark.slow
def test_toy_recipe_runs_with_accelerate_launch(tmp_path):
    accuracy = launch_toy_recipe("sft_sharpen", tmp_path, "--num_train_prompts", "300")
    assert accuracy["before"] < 0.2 and accuracy["after"] >= 0.8
    assert (tmp_path / "bon_data" / "bon_run.json").exists() and (tmp_path / "model.safetensors").exists()
    assert "sft-sharpening" in (tmp_path / "README.md").read_text()
