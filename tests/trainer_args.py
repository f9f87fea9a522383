"""Training arguments shared by the trainer tests: short, exact (float32) runs of the toy model on CPU."""

# TRL configs default to bf16 autocast, also on CPU; float32 keeps policy and reference log-probs comparable to ~1e-6.
CPU_TEST_ARGS = dict(
    use_cpu=True,
    bf16=False,
    report_to="none",
    per_device_train_batch_size=8,
    learning_rate=1e-3,
    max_steps=2,
    logging_steps=1,
    save_strategy="no",
    max_completion_length=40,  # toy completions are at most ~30 tokens
    seed=0,
)


def cpu_test_args(config_class, output_dir, **overrides):
    """`config_class(output_dir=..., **CPU_TEST_ARGS)` with `overrides` applied."""
    return config_class(output_dir=str(output_dir), **{**CPU_TEST_ARGS, **overrides})


def online_trainer(trainer_class, tmp_path, model, tokenizer, train_dataset=None, **overrides):
    """`trainer_class` (SelfRewardDPOTrainer, XPOTrainer) with `cpu_test_args` of its config class, on the first 64
    toy training prompts unless `train_dataset` is given."""
    from trl_sharpen.toy import load_toy_prompts

    return trainer_class(
        model=model,
        args=cpu_test_args(trainer_class._config_class, tmp_path, **overrides),
        train_dataset=train_dataset if train_dataset is not None else load_toy_prompts("train").select(range(64)),
        processing_class=tokenizer,
    )


def train_and_check_basics(trainer, tags, metrics) -> list[dict]:
    """Train; require some policy weight to change, the reference model (pi_base) to stay the bundled base, the model
    tags, and each of `metrics` to be logged. Returns the log history."""
    import torch
    from transformers import AutoModelForCausalLM

    from trl_sharpen.toy import TOY_MODEL_PATH

    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters()), "nothing trained"
    base = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).state_dict()
    for name, p in trainer.ref_model.state_dict().items():
        assert torch.equal(p, base[name]), f"reference parameter {name} changed"
    assert set(tags) <= set(trainer.model.model_tags)
    history = trainer.state.log_history
    missing = [key for key in metrics if not any(key in entry for entry in history)]
    assert not missing, f"metrics not logged: {missing}"
    return history
