"""The non-public TRL / transformers internals our trainers override or call, checked against the installed versions.

A TRL upgrade that renames one of them, changes its parameters, or changes the behaviour we build on fails here, by
name, instead of silently changing what the trainers train.
"""

import contextlib
import dataclasses
import inspect

import pytest
import torch
import transformers.trainer_utils
import trl
import trl.models.utils
import trl.trainer.base_trainer
import trl.trainer.utils
from transformers import Trainer
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference


def leading_parameters(function, count):
    return list(inspect.signature(function).parameters)[:count]


# Called by several trainers (listed once each, named in the lists below)
UNWRAP_MODEL_FOR_GENERATION = (
    trl.models.utils,
    "unwrap_model_for_generation",
    ["model", "accelerator", "gather_deepspeed3_params", "generation_kwargs", "gradient_checkpointing_kwargs"],
)
GET_CONFIG_MODEL_ID = (trl.trainer.utils, "get_config_model_id", ["config"])

# SelfRewardDPOTrainer (trl_sharpen/self_reward_dpo_trainer.py): (owner, name, leading parameters)
SELF_REWARD_DPO_INTERNALS = [
    # overridden
    (DPOTrainer, "_prepare_dataset", ["self", "dataset", "processing_class", "args", "dataset_name"]),
    (DPOTrainer, "_set_signature_columns_if_needed", ["self"]),
    (DPOTrainer, "_precompute_ref_logps", ["self", "dataset", "name", "batch_size"]),
    (Trainer, "_prepare_inputs", ["self", "inputs"]),
    # called
    (trl.trainer.utils, "use_adapter", ["model", "adapter_name"]),
    GET_CONFIG_MODEL_ID,
    (
        trl.trainer.utils,
        "print_prompt_completions_sample",
        ["prompts", "completions", "rewards", "advantages", "step", "num_samples", "extra"],
    ),
    UNWRAP_MODEL_FOR_GENERATION,  # also GreedyReportCallback (trl_sharpen/callbacks.py)
    (trl.models.utils, "disable_gradient_checkpointing", ["model", "gradient_checkpointing_kwargs"]),
]


def test_self_reward_dpo_relies_on_dpo_loss_reading_reference_logps_from_the_batch():
    source = inspect.getsource(DPOTrainer._compute_loss)
    # `precompute_ref_logps` switches DPO's loss to the batch's reference log-probs (we set it per trainer)
    assert "if self.precompute_ref_logps:" in source
    assert 'inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]' in source
    # every other batch key is passed to the model, so our own keys are popped before calling it
    assert '_non_model_keys = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}' in source
    # the loss list we strip `sharpen` from, and the fused-head forward whose `log_probs` we capture with a hook
    assert "zip(self.loss_types, self.loss_weights, strict=True)" in source
    assert "model(**model_kwargs, labels=labels, fused_lm_head=True)" in source
    assert "outputs.log_probs" in source
    assert "log_probs" in {field.name for field in dataclasses.fields(trl.trainer.utils.FusedCausalLMOutput)}
    # DPO sets these in __init__ and we read or replace them
    init = inspect.getsource(DPOTrainer.__init__)
    for attribute in (
        "self.precompute_ref_logps",
        "self.loss_types",
        "self.loss_weights",
        "self._tokenizer",
        "self.beta",
    ):
        assert f"{attribute} =" in init, attribute
    assert "SyncRefModelCallback(ref_model=self.ref_model" in init  # re-anchoring (reanchor_steps)
    assert "self._signature_columns = None" in inspect.getsource(Trainer.__init__)


def test_self_reward_dpo_config_fields_it_builds_on():
    fields = {field.name for field in dataclasses.fields(DPOConfig)}
    for name in ("sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps", "precompute_ref_log_probs"):
        assert name in fields
    assert leading_parameters(DataCollatorForPreference, 2) == ["pad_token_id", "max_length"]
    assert "pad_to_multiple_of" in inspect.signature(DataCollatorForPreference).parameters


# BoNSFTTrainer (trl_sharpen/bon_sft_trainer.py): (owner, name, leading parameters)
BON_SFT_INTERNALS = [
    # overridden
    (
        trl.SFTTrainer,
        "_prepare_dataset",
        ["self", "dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"],
    ),
    # called
    UNWRAP_MODEL_FOR_GENERATION,
    (trl.models.utils, "prepare_deepspeed", ["model", "accelerator"]),
    (trl.trainer.utils, "create_model_from_path", ["model_id", "architecture"]),  # also GreedyReportCallback
    GET_CONFIG_MODEL_ID,
    (trl.trainer.base_trainer._BaseTrainer, "create_model_card", ["self", "model_name", "dataset_name", "tags"]),
]


def test_bon_sft_keeps_sft_trainer_signature_and_relies_on_its_init_order():
    from trl_sharpen.bon_sft_trainer import BoNSFTTrainer

    assert list(inspect.signature(BoNSFTTrainer.__init__).parameters) == list(
        inspect.signature(trl.SFTTrainer.__init__).parameters
    )
    init = inspect.getsource(trl.SFTTrainer.__init__)
    # The train dataset reaches `_prepare_dataset` as the object we passed (we defer it by identity), before
    # `Trainer.__init__`, and `_metrics` (where our `bon/` metrics go) is created afterwards, in `__init__`
    prepare = init.index(
        "train_dataset = self._prepare_dataset(\n                train_dataset, processing_class, args"
    )
    assert prepare < init.index("super().__init__(") < init.index('self._metrics = {"train": defaultdict(list)')
    assert "self.completion_only_loss = args.completion_only_loss" in init
    # Pre-tokenized rows get their labels from `completion_mask` when `completion_only_loss` is on
    assert 'if self.completion_only_loss and "completion_mask" in column_names:' in inspect.getsource(
        trl.SFTTrainer._prepare_dataset
    )
    # `log` averages `_metrics[mode]` into the logged record, then clears it
    log = inspect.getsource(trl.SFTTrainer.log)
    assert "self._metrics[mode].items()" in log and "self._metrics[mode].clear()" in log
    # Model cards read the class attributes we set
    card = inspect.getsource(trl.trainer.base_trainer._BaseTrainer.create_model_card)
    assert "self._tag_names" in card and 'self._paper.get("citation")' in card and "self._name" in card


def test_bon_sft_current_policy_relies_on_the_training_loop_order():
    """`sampling_policy="current"` swaps the rows behind the train dataset in `on_epoch_begin`: the dataloader must
    hold the dataset object itself (not a copy) and be iterated only after the callback ran."""
    dataloader = inspect.getsource(Trainer._get_dataloader)
    assert "DataLoader(dataset, **dataloader_params)" in dataloader
    loop = inspect.getsource(Trainer._inner_training_loop)
    assert loop.index("self.callback_handler.on_epoch_begin(") < loop.index("self._run_epoch(")
    assert "epoch_iterator = iter(train_dataloader)" in inspect.getsource(Trainer._run_epoch)
    # Trainer attributes read to find the model to sample from and whether ZeRO-3 partitions it
    init = inspect.getsource(Trainer.__init__)
    assert "self.model_wrapped = model" in init
    assert "self.is_deepspeed_enabled" in init and "self.is_model_parallel" in init
    # Under DeepSpeed / FSDP the model is placed only when training starts: sampling in `__init__` places it itself
    assert "self.place_model_on_device = False" in init


# XPOTrainer (trl_sharpen/xpo_trainer.py): (owner, name, leading parameters). It builds on SelfRewardDPOTrainer (the
# internals above) and adds these.
XPO_INTERNALS = [
    # overridden
    (Trainer, "_prepare_inputs", ["self", "inputs"]),
    (Trainer, "train", ["self", "resume_from_checkpoint", "trial", "ignore_keys_for_eval"]),
    (Trainer, "_save_checkpoint", ["self", "model", "trial"]),
    # called
    (transformers.trainer_utils, "get_last_checkpoint", ["folder"]),
]


def test_xpo_relies_on_trainer_epoch_checkpoint_and_metrics_behaviour():
    from trl_sharpen.xpo_trainer import XPOTrainer

    # `XPOTrainer.train` passes exactly these on: a new `Trainer.train` parameter must be added there too
    assert list(inspect.signature(Trainer.train).parameters) == list(inspect.signature(XPOTrainer.train).parameters)
    assert list(inspect.signature(XPOTrainer.__init__).parameters) == list(
        inspect.signature(DPOTrainer.__init__).parameters
    )
    # A per-epoch alpha is read from `state.epoch`, the fractional progress set after each step: its integer part is
    # the running (0-based) epoch
    assert "self.state.epoch = epoch + (step + 1) / steps_in_epoch" in inspect.getsource(Trainer._run_epoch)
    # The replay buffer is saved by `_save_checkpoint` (overridden, as DPOTrainer does) into the folder it wrote
    assert transformers.trainer_utils.PREFIX_CHECKPOINT_DIR == "checkpoint"
    assert 'checkpoint_folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"' in inspect.getsource(
        Trainer._save_checkpoint
    )
    assert "super()._save_checkpoint(model, trial)" in inspect.getsource(DPOTrainer._save_checkpoint)
    # Metrics go to DPO's `_metrics`, averaged and cleared in its `log`
    assert 'self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}' in inspect.getsource(
        DPOTrainer.__init__
    )
    log = inspect.getsource(DPOTrainer.log)
    assert "self._metrics[mode].items()" in log and "self._metrics[mode].clear()" in log


# Multi-process, PEFT and logging paths (trl_sharpen/distributed.py, report_tables.py, fingerprints.py and the online
# trainers' multi-process code): (owner, name, leading parameters)
def _setup_devices_source():
    from transformers import TrainingArguments

    return inspect.getsource(TrainingArguments._setup_devices.func)


SCALE_OUT_INTERNALS = [
    # the LM head whose `log_probs` SelfRewardDPOTrainer captures; DPO adds it in __init__
    (trl.trainer.utils, "add_fused_lm_head", ["model", "temperature", "cast_lm_head_to_fp32", "outputs"]),
    (trl.models.utils, "_unwrap_model_for_generation", ["model", "accelerator", "gather_deepspeed3_params"]),
    (DataCollatorForPreference, "__init__", ["self", "pad_token_id", "max_length"]),
    (Trainer, "_save_rng_state", ["self", "output_dir"]),
    (Trainer, "_load_rng_state", ["self", "checkpoint"]),
]


def test_greedy_report_callback_relies_on_the_training_loop_order():
    """GreedyReportCallback (trl_sharpen/callbacks.py) reports in `on_train_begin`: the model must already be prepared
    (placed, wrapped, sharded) and a resumed state loaded by then, so it reads `state.global_step` and
    `model_wrapped`."""
    loop = inspect.getsource(Trainer._inner_training_loop)
    begin = loop.index("self.callback_handler.on_train_begin(")
    assert loop.index("self._init_training_state(") < begin  # a resumed run's state (global_step) is loaded
    assert loop.index("self._prepare_for_training(") < begin  # the model is placed / wrapped / sharded


def test_scale_out_relies_on_accelerate_transformers_and_trl_behaviour():
    from accelerate.state import AcceleratorState, PartialState
    from transformers import PreTrainedModel
    from transformers.integrations import TensorBoardCallback

    # distributed.check_launch: with cpu (ACCELERATE_USE_CPU) accelerate does not turn DeepSpeed on
    assert 'os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not cpu' in inspect.getsource(
        AcceleratorState.__init__
    )
    # distributed.distributed_state: PartialState(cpu=True) is what sets up gloo for CPU processes...
    assert list(inspect.signature(PartialState.__init__).parameters)[:2] == ["self", "cpu"]
    assert "DistributedType.MULTI_CPU" in inspect.getsource(PartialState._prepare_backend)
    # ...and what a training config's use_cpu asks for (recipes on CPU processes need it: check_training_args)
    assert 'accelerator_state_kwargs["cpu"] = True' in _setup_devices_source()
    # SelfRewardDPOTrainer keeps the pair count equal across processes: DPO's loss all-gathers per-pair tensors
    assert "self.accelerator.gather(chosen_rewards)" in inspect.getsource(DPOTrainer._compute_loss)
    # ...and syncs generation when ZeRO-3 weights are left partitioned
    unwrap = inspect.getsource(trl.models.utils._unwrap_model_for_generation)
    assert "if not gather_deepspeed3_params:" in unwrap and "deepspeed.zero.GatheredParameters(" in unwrap
    # LoRA under gradient checkpointing keeps its input gradients when generation toggles checkpointing off and on
    assert "unwrapped_model.gradient_checkpointing_enable(" in unwrap
    assert "self.enable_input_require_grads()" in inspect.getsource(PreTrainedModel._activation_checkpointing_enable)
    # report_tables.log_table writes through the Trainer's own tensorboard writer
    assert "self.tb_writer.add_scalar" in inspect.getsource(TensorBoardCallback.on_log)


# SelfRewardGRPOTrainer / SelfRewardRLOOTrainer (trl_sharpen/self_reward_rl_trainer.py): (owner, name, leading
# parameters), for both TRL trainers. No generation method is overridden (test below).
SELF_REWARD_RL_INTERNALS = [
    entry
    for trainer in (trl.GRPOTrainer, trl.RLOOTrainer)
    for entry in (
        # overridden (wrapped: super() is called with the same arguments)
        (
            trainer,
            "_get_per_token_logps_and_entropies",
            ["self", "model", "input_ids", "attention_mask", "logits_to_keep"],
        ),
        (trainer, "_calculate_rewards", ["self", "inputs", "prompts", "completions", "completion_ids_list"]),
        (trainer, "_get_train_sampler", ["self", "dataset"]),
        # called
        (trainer, "_tokenize_prompts", ["self", "prompts"]),
        (trainer, "__init__", ["self", "model", "reward_funcs", "args"]),
    )
] + [
    (trl.trainer.utils, "use_adapter", ["model", "adapter_name"]),
    (trl.trainer.utils, "create_model_from_path", ["model_id"]),
    (trl.models, "prepare_deepspeed", ["model", "accelerator"]),
    (trl.models.utils, "disable_gradient_checkpointing", ["model", "gradient_checkpointing_kwargs"]),
    UNWRAP_MODEL_FOR_GENERATION,
]


@pytest.mark.parametrize("trainer", [trl.GRPOTrainer, trl.RLOOTrainer], ids=lambda t: t.__name__)
def test_self_reward_rl_relies_on_the_reference_pass_preceding_the_rewards(trainer):
    from trl_sharpen.self_reward_rl_trainer import SelfRewardRLMixin

    source = inspect.getsource(trainer._generate_and_score_completions)
    # TRL's reference log-probs (beta != 0) are computed, through `_get_per_token_logps_and_entropies` on the
    # reference model or on the adapter-disabled policy, before the rewards: we sum them into log pi_base
    reference = source.index("if self.beta != 0.0:\n                if self.ref_model is not None:")
    assert reference < source.index("self._calculate_rewards(inputs, prompts, completions, completion_ids_list)")
    assert 'use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)' in source
    assert "prompt_completion_ids = torch.cat([prompt_ids, completion_ids], dim=1)" in source
    assert "logits_to_keep = completion_ids.size(1)" in source
    # rewards are gathered after the reward functions ran, and grouped as consecutive rows of num_generations
    assert "rewards_per_func = gather(rewards_per_func)" in inspect.getsource(trainer._calculate_rewards)
    assert "view(-1, num_generations)" in source
    assert 'num_generations = self.num_generations if mode == "train" else self.num_generations_eval' in source
    # the reference's fused LM head divides the logits by the sampling temperature (so we reuse only at T = 1)
    init = inspect.getsource(trainer.__init__)
    assert "add_fused_lm_head(self.ref_model,temperature=self.temperature" in "".join(init.split())
    for attribute in ("self.temperature", "self.beta", "self.ref_model", "self.num_generations_eval"):
        assert f"{attribute} =" in init, attribute
    # `_tokenize_prompts` is what `_generate` tokenises with (our pi_base pass reads the same prompt ids)
    assert "prompt_ids, images, multimodal_fields = self._tokenize_prompts(prompts)" in inspect.getsource(
        trainer._generate
    )
    # the train sampler draws every epoch's order from one generator seeded once (we reseed it per epoch, for resume)
    assert "seed=self.args.seed" in inspect.getsource(trainer._get_train_sampler)
    sampler = inspect.getsource(trl.trainer.utils.RepeatSampler)
    assert "self.generator = torch.Generator()" in sampler and "generator=self.generator" in sampler
    # generation stays TRL's own (use_vllm keeps working): the mixin replaces none of it, and wraps only
    # `_generate_single_turn`, in the context that sets the checkpoint's generation config aside (issue 18 case 1)
    generation = {"_generate", "_generate_and_score_completions", "_prepare_inputs"}
    assert not generation & set(vars(SelfRewardRLMixin))
    wrapper = inspect.getsource(SelfRewardRLMixin._generate_single_turn)
    assert wrapper.count("return super()._generate_single_turn(*args, **kwargs)") == 2
    assert "self.generation_config" in inspect.getsource(trainer._generate_single_turn)  # what `generate` is given


INTERNALS = {
    "self_reward_rl": SELF_REWARD_RL_INTERNALS,
    "self_reward_dpo": SELF_REWARD_DPO_INTERNALS,
    "bon_sft": BON_SFT_INTERNALS,
    "xpo": XPO_INTERNALS,
    "scale_out": SCALE_OUT_INTERNALS,
}


@pytest.mark.parametrize(
    "owner, name, parameters",
    [pytest.param(*entry, id=f"{group}-{entry[1]}") for group, entries in INTERNALS.items() for entry in entries],
)
def test_internals_exist_with_their_parameters(owner, name, parameters):
    assert hasattr(owner, name), f"{owner.__name__}.{name} is gone"
    assert leading_parameters(getattr(owner, name), len(parameters)) == parameters


def test_fingerprints_rely_on_deepspeed_gathered_status():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters, ZeroParamStatus

    from trl_sharpen.fingerprints import _gathered

    # fingerprints._gathered skips parameters an enclosing context already gathered: nesting is refused
    assert "Nested GatheredParameters contexts cannot overlap" in inspect.getsource(GatheredParameters.__enter__)
    # ...which it tells by DeepSpeed's status of the (here simulated) partitioned parameter
    param = torch.nn.Parameter(torch.zeros(3))
    param.ds_id, param.ds_status = 0, ZeroParamStatus.AVAILABLE
    assert isinstance(_gathered(param), contextlib.nullcontext)
    param.ds_status = ZeroParamStatus.NOT_AVAILABLE
    assert isinstance(_gathered(param), GatheredParameters)
