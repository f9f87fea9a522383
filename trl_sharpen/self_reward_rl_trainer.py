r"""`SelfRewardGRPOTrainer` and `SelfRewardRLOOTrainer`: sharpening inside TRL's own online RL trainers.

RLHF-Sharpening (Huang et al. 2025, Sec. 2.2) is stated for any RL algorithm maximising

$$\mathbb{E}_{y\sim\pi}[\log \pi_{base}(y|x)] - \beta\,\mathrm{KL}(\pi\,\|\,\pi_{base}),$$

whose optimum is $\pi^\star \propto \pi_{base}^{1+1/\beta}$. GRPO or RLOO with the `logprob` self-reward and a KL
penalty to pi_base (TRL's reference model is the initial policy = pi_base) is that algorithm up to the estimator:
GRPO normalises rewards within each group (`scale_rewards`) and clips the ratio (`epsilon`), and RLOO uses a
leave-one-out baseline, so neither follows the exact policy-gradient of that objective and the optimum above is no
longer guaranteed (group normalisation makes the update invariant to the reward's scale, which is what ties beta to
the exponent). `SelfRewardDPOTrainer(loss_type="sharpen")` is the paper's Eq. 8.

A user's GRPO script becomes a sharpening script by changing two class names and dropping `reward_funcs`:

    >>> from trl_sharpen import SelfRewardGRPOConfig, SelfRewardGRPOTrainer
    >>> args = SelfRewardGRPOConfig(output_dir="out", self_reward="logprob", beta=0.04)
    >>> trainer = SelfRewardGRPOTrainer(model="Qwen/Qwen2.5-1.5B-Instruct", args=args, train_dataset=prompts)

Generation is TRL's own, run with the checkpoint's generation config set aside (as trl_sharpen's own sampling:
see `_generate_single_turn`): `use_vllm` works as in TRL. Only the reward is ours:
it is the first entry of TRL's `reward_funcs` (named after the self-reward in TRL's logs), and user `reward_funcs`
are added after it, with `reward_weights` = [self-reward's weight, then theirs].

Cost of each self-reward per completion, on top of TRL's own step:

| self_reward | extra forwards |
|---|---|
| `logprob`, `normalized_logprob` | 0 when TRL's reference pass computes log pi_base at temperature 1 (`beta > 0`, `temperature: 1`, no `mask_truncated_completions`): its `ref_per_token_logps` are summed. Otherwise 1 no-grad pi_base pass (`sequence_logprobs`, one shared prompt pass per group) |
| `majority` | 0 (answers of the group, gathered from all processes, vote) |
| `self_certainty`, `negative_entropy` | 1 no-grad forward of the current policy (full-vocabulary logits of the completion positions, chunked) |
| custom | what it computes; log pi_base as above when its signature names `base_logprobs` |

log pi_base is always at temperature 1 (the paper's reward): TRL's reference log-probs are at the sampling
temperature (its fused LM head divides the logits by it), so at `temperature != 1` they are not reused and the
pi_base pass runs instead. pi_base is TRL's reference model when it has one; with PEFT the adapter-disabled policy
(TRL's "ref" adapter when re-training an adapter), never a copy; with full fine-tuning and `beta: 0` (TRL then builds
no reference) one frozen copy is built, as TRL does for `beta > 0`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math

import torch
from accelerate.utils import gather_object, is_peft_model
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import GRPOTrainer, RLOOTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing, unwrap_model_for_generation
from trl.trainer.utils import create_model_from_path, get_config_model_id, use_adapter

from .answers import get_answer_extractor
from .generation import checkpoint_generation_defaults_off, eval_mode
from .logprobs import sequence_logprobs
from .monitoring import SharpeningMonitorMixin, is_prompt_only
from .policy_statistics import completion_token_statistics
from .sampling_arguments import answer_gating_on
from .self_reward_rl_config import SelfRewardGRPOConfig, SelfRewardRLOOConfig
from .self_rewards import SelfReward, get_self_reward


logger = logging.getLogger(__name__)


class TrainerSelfReward:
    """The trainer's self-reward as a TRL reward function (TRL calls it on every process, with this process's rows).

    It computes what the reward reads on this process (log pi_base, policy statistics), then gathers the step's rows
    of every process so that group rewards (`majority`) and answer gating see whole groups (TRL splits a prompt's
    `num_generations` completions across processes), scores them, and returns this process's rows."""

    def __init__(self, trainer, reward: SelfReward, gating: bool, answer_extractor=None):
        self.trainer = trainer
        self.reward = reward
        self.gating = gating
        self.extractor = get_answer_extractor(answer_extractor)
        self.__name__ = reward.name  # TRL logs `rewards/<name>/mean`

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        trainer, reward, local = self.trainer, self.reward, len(completion_ids)
        texts = [c[-1]["content"] if isinstance(c, list) and c else c for c in completions]
        columns = {"prompts": list(prompts), "completions": list(completions), "texts": texts}
        columns["ids"] = [list(map(int, ids)) for ids in completion_ids]
        if reward.requires_base_logprobs:
            columns["base"] = trainer._base_logprobs(prompts, completion_ids).tolist()
        if reward.requires_policy_statistics:
            statistics = trainer._policy_statistics(prompts, completion_ids)
            columns.update({f"stat:{key}": value.tolist() for key, value in statistics.items()})
        for key, value in kwargs.items():  # dataset columns, repeated per completion
            if isinstance(value, list) and len(value) == local:
                columns[f"kw:{key}"] = value
        world = trainer.accelerator.num_processes
        if world > 1:
            offset = sum(gather_object([local])[: trainer.accelerator.process_index])
            columns = {key: gather_object(value) for key, value in sorted(columns.items())}
        else:
            offset = 0
        total = len(columns["ids"])
        group_size = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        extra = {key: value for key, value in kwargs.items() if f"kw:{key}" not in columns and key != "log_extra"}
        extra.update({key[3:]: value for key, value in columns.items() if key.startswith("kw:")})
        if reward.requires_policy_statistics:
            extra["policy_statistics"] = {key[5:]: value for key, value in columns.items() if key.startswith("stat:")}
        rewards = reward(
            columns["prompts"],
            columns["completions"],
            columns["ids"],
            base_logprobs=columns.get("base"),
            group_ids=[i // group_size for i in range(total)],  # TRL's groups are consecutive rows
            **extra,
        )
        if self.gating:
            rewards = self._gate(rewards, columns["texts"], group_size, kwargs.get("log_metric"))
        return rewards[offset : offset + local]

    def _gate(self, rewards: list[float], texts: list[str], group_size: int, log_metric) -> list[float]:
        """A completion without an extractable answer gets its group's lowest reward (not NaN: it still counts in the
        group's mean and baseline, as the worst of the group)."""
        missing = [self.extractor(text) is None for text in texts]
        gated = list(rewards)
        for start in range(0, len(rewards), group_size):
            group = range(start, min(start + group_size, len(rewards)))
            lowest = min(rewards[i] for i in group)
            for i in group:
                if missing[i]:
                    gated[i] = lowest
        if log_metric is not None and missing:
            log_metric("self_reward/no_answer_ratio", sum(missing) / len(missing))
        return gated


class SelfRewardRLMixin(SharpeningMonitorMixin):
    """What `SelfRewardGRPOTrainer` and `SelfRewardRLOOTrainer` share: the self-reward as TRL's first reward function,
    pi_base (reused reference pass, or one scoring pass), policy statistics, and the label-free monitoring."""

    _config_class = SelfRewardGRPOConfig

    def __init__(self, model, reward_funcs=None, args=None, *positional, **kwargs):
        if positional:  # TRL's order after `args`: train_dataset, eval_dataset, processing_class, ...
            trl_trainer = next(c for c in type(self).__mro__ if c in (GRPOTrainer, RLOOTrainer))
            names = list(inspect.signature(trl_trainer.__init__).parameters)[4:]  # after self, model, funcs, args
            kwargs.update(zip(names, positional, strict=False))
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = self._config_class(f"{name.split('/')[-1]}-{type(self).__name__}")
        if not isinstance(args, self._config_class):
            raise ValueError(
                f"{type(self).__name__} needs a {self._config_class.__name__} (for its self-reward and monitoring "
                f"fields), got {type(args).__name__}."
            )
        user_funcs = (
            [] if reward_funcs is None else list(reward_funcs if isinstance(reward_funcs, list) else [reward_funcs])
        )
        reward = get_self_reward(args.self_reward, answer_extractor=args.answer_extractor)
        self._check_user_reward_funcs(user_funcs, reward, args)
        self.self_reward = reward
        self.reused_reference_rows = 0  # completions whose log pi_base came from TRL's reference pass
        self.base_scored_rows = 0  # completions scored by our own pi_base pass
        self.policy_scored_rows = 0  # completions scored by our own policy-statistics pass
        self._reference_pass = None
        gating = answer_gating_on(args.require_answer, args.answer_extractor)
        processing = kwargs.pop("reward_processing_classes", None)
        if processing is not None:
            processing = [None, *(processing if isinstance(processing, list) else [processing] * len(user_funcs))]
        super().__init__(
            model,
            [TrainerSelfReward(self, reward, gating, args.answer_extractor), *user_funcs],
            args=args,
            reward_processing_classes=processing,
            **kwargs,
        )
        self._train_sampler = None
        self.add_callback(_ReseedSamplerEachEpoch(self))
        unwrapped = self.accelerator.unwrap_model(self.model)
        needs_base = reward.requires_base_logprobs or is_prompt_only_or_none(kwargs.get("eval_dataset"))
        if self.ref_model is None and not is_peft_model(unwrapped) and needs_base:
            self.ref_model = self._frozen_base_copy(unwrapped, kwargs.get("quantization_config"))

    def _generate_single_turn(self, *args, **kwargs):
        """TRL's generation step, run with the checkpoint's generation config set aside (token ids kept): transformers
        5.x fills every field TRL's `generation_config` leaves None (no_repeat_ngram_size, typical_p, min_p, ...) from
        the checkpoint's, so a checkpoint's repetition penalty or n-gram ban changed what was sampled (issue 18 case
        1). TRL's own settings and `generation_kwargs` are used as given. (vLLM keeps its own sampling parameters.)"""
        config = getattr(self, "generation_config", None)  # TRL builds it only for transformers' generate
        if config is None:
            return super()._generate_single_turn(*args, **kwargs)
        with checkpoint_generation_defaults_off(self.model, config):
            return super()._generate_single_turn(*args, **kwargs)

    @staticmethod
    def _check_user_reward_funcs(user_funcs, reward, args) -> None:
        for func in user_funcs:
            if isinstance(func, SelfReward) and (func.model is not None or func.name == reward.name):
                raise ValueError(
                    f"reward_funcs holds the self-reward `{func.name}`"
                    + (
                        " built with its own model (a second copy of pi_base and an extra forward)"
                        if func.model
                        else ""
                    )
                    + f", and the trainer already computes self_reward={reward.name!r}: set `self_reward: {func.name}` "
                    "and drop it from reward_funcs."
                )
        if args.reward_weights is not None and len(args.reward_weights) != 1 + len(user_funcs):
            raise ValueError(
                f"reward_weights has {len(args.reward_weights)} values for {1 + len(user_funcs)} rewards: give the "
                f"self-reward's weight first, then one per reward_funcs entry ({len(user_funcs)})."
            )

    def _frozen_base_copy(self, policy, quantization_config):
        """pi_base for full fine-tuning when TRL built no reference (beta = 0): a frozen copy of the initial policy,
        loaded from its path like TRL's reference under DeepSpeed, else copied in memory."""
        if self.is_deepspeed_enabled:
            init_kwargs = dict(self.args.model_init_kwargs or {})
            init_kwargs["device_map"] = None
            init_kwargs.setdefault("dtype", policy.dtype)
            if quantization_config is not None:
                init_kwargs["quantization_config"] = quantization_config
            base = create_model_from_path(get_config_model_id(policy.config), **init_kwargs)
            base.eval().requires_grad_(False)
            return prepare_deepspeed(base, self.accelerator)
        base = copy.deepcopy(policy).eval().requires_grad_(False)
        return self.accelerator.prepare_model(base, evaluation_mode=True)

    def _get_train_sampler(self, dataset=None):
        self._train_sampler = super()._get_train_sampler(dataset)  # reseeded each epoch (`_ReseedSamplerEachEpoch`)
        return self._train_sampler

    # --------------------------------------------------------------------------------- TRL's reference pass, reused
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        output = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )
        if not torch.is_grad_enabled() and self._is_reference_pass(model):
            self._reference_pass = (input_ids, logits_to_keep, output[0])
        return output

    def _is_reference_pass(self, model) -> bool:
        if self.beta == 0.0:
            return False
        if self.ref_model is not None:
            return model is self.ref_model
        unwrapped = self.accelerator.unwrap_model(self.model)
        return is_peft_model(unwrapped) and (_adapters_disabled(unwrapped) or unwrapped.active_adapter == "ref")

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        try:
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            self._reference_pass = None  # never reused by a later batch

    def _reference_logprobs(self, completion_ids) -> torch.Tensor | None:
        """log pi_base(y|x) summed from TRL's reference pass of this batch, when it is log pi_base at temperature 1 of
        exactly these completions; else None."""
        if self._reference_pass is None or self.temperature != 1.0 or self.args.mask_truncated_completions:
            return None
        input_ids, keep, per_token = self._reference_pass
        if per_token.size(0) != len(completion_ids) or any(len(ids) > keep for ids in completion_ids):
            return None
        lengths = torch.tensor([len(ids) for ids in completion_ids], device=per_token.device)
        for row, ids in enumerate(completion_ids):  # the same rows in the same order, or no reuse
            if input_ids[row, -keep:][: len(ids)].tolist() != list(map(int, ids)):
                return None
        mask = torch.arange(keep, device=per_token.device).unsqueeze(0) < lengths.unsqueeze(1)
        return (per_token.float() * mask).sum(dim=1).cpu()

    # ------------------------------------------------------------------------------------------ our scoring passes
    def _base_logprobs(self, prompts, completion_ids) -> torch.Tensor:
        """log pi_base(y|x) at temperature 1 per completion (CPU float32): TRL's reference pass when reusable, else one
        no-grad pass of pi_base with one shared prompt pass per group."""
        reused = self._reference_logprobs(completion_ids)
        if reused is not None:
            self.reused_reference_rows += len(completion_ids)
            return reused
        prompt_ids = self._tokenize_prompts(prompts)[0]  # TRL's own tokenisation (chat template included)
        if self.ref_model is not None:
            model, context = self.ref_model, contextlib.nullcontext()
        else:  # PEFT: the adapter-disabled policy (TRL's "ref" adapter when re-training one)
            model = self.accelerator.unwrap_model(self.model)
            context = contextlib.ExitStack()
            context.enter_context(use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None))
            context.enter_context(disable_gradient_checkpointing(model, self.args.gradient_checkpointing_kwargs))
        with torch.no_grad(), context, self.accelerator.autocast():
            logps = sequence_logprobs(
                model,
                [list(ids) for ids in prompt_ids],
                [list(ids) for ids in completion_ids],
                micro_batch_size=self.args.scoring_batch_size or self.args.per_device_train_batch_size,
            )
        self.base_scored_rows += len(completion_ids)
        return logps.float().cpu()

    def _policy_statistics(self, prompts, completion_ids) -> dict[str, torch.Tensor]:
        """Mean self-certainty and entropy of the current policy over each completion's tokens (one no-grad pass)."""
        prompt_ids = self._tokenize_prompts(prompts)[0]
        model = self.accelerator.unwrap_model(self.model)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(model, self.args.gradient_checkpointing_kwargs),
            self.accelerator.autocast(),
        ):
            statistics = completion_token_statistics(
                model,
                [list(ids) for ids in prompt_ids],
                [list(ids) for ids in completion_ids],
                micro_batch_size=self.args.scoring_batch_size or self.args.per_device_train_batch_size,
            )
        self.policy_scored_rows += len(completion_ids)
        return statistics

    # ---------------------------------------------------------------------------------------------- monitoring
    @contextlib.contextmanager
    def _monitoring_model(self, from_base: bool):
        """For `trainer.evaluate()` on prompts (`trl_sharpen.monitoring`): the policy, or pi_base (reference model, or
        the adapter-disabled policy)."""
        if from_base and self.ref_model is not None:
            ref_model = self.accelerator.unwrap_model(self.ref_model)
            gather = contextlib.nullcontext()
            if is_deepspeed_zero3_enabled():  # the frozen reference is sharded too; gather it for generation
                import deepspeed

                gather = deepspeed.zero.GatheredParameters(list(ref_model.parameters()))
            with gather, eval_mode(ref_model):
                yield ref_model
            return
        with unwrap_model_for_generation(
            self.model_wrapped,
            self.accelerator,
            gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        ) as model:
            base = contextlib.nullcontext()
            if from_base:
                if not is_peft_model(model):
                    raise RuntimeError("pi_base is needed for the sharpening evaluation but was not kept.")
                base = use_adapter(model, "ref" if "ref" in model.peft_config else None)
            with eval_mode(model), base:
                yield model


class _ReseedSamplerEachEpoch(TrainerCallback):
    """TRL's `RepeatSampler` draws each epoch's order from one generator seeded once, so a run resumed after an epoch
    boundary (whose first epoch is then the sampler's first draw) trains on another order than the uninterrupted run.
    Seeding it with `seed + epoch` at every epoch start gives each epoch the same order in both."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        sampler = self.trainer._train_sampler
        if getattr(sampler, "generator", None) is not None and getattr(sampler, "seed", None) is not None:
            sampler.generator.manual_seed(sampler.seed + math.floor((state.epoch or 0) + 1e-6))


def is_prompt_only_or_none(dataset) -> bool:
    """Whether `dataset` will be evaluated by the monitoring (a prompt-only dataset, or a dict holding one)."""
    if dataset is None:
        return False
    if isinstance(dataset, dict):
        return any(is_prompt_only(d) for d in dataset.values())
    return is_prompt_only(dataset)


def _adapters_disabled(peft_model) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(m.disable_adapters for m in peft_model.modules() if isinstance(m, BaseTunerLayer))


class SelfRewardGRPOTrainer(SelfRewardRLMixin, GRPOTrainer):
    """TRL's `GRPOTrainer` whose reward is a self-reward (`args.self_reward`, default `logprob` = log pi_base(y|x)),
    on a prompt-only dataset, with no `reward_funcs` needed. See the module docstring for the cost of each reward,
    which temperature log pi_base is computed at, and how GRPO's optimum relates to the paper's pi_base^(1+1/beta)."""

    _tag_names = ["trl", "grpo", "trl-sharpen", "rlhf-sharpening"]
    _config_class = SelfRewardGRPOConfig


class SelfRewardRLOOTrainer(SelfRewardRLMixin, RLOOTrainer):
    """TRL's `RLOOTrainer` with a self-reward, as `SelfRewardGRPOTrainer`. RLOO's default `beta` is 0.05, so at
    temperature 1 log pi_base comes from TRL's reference pass with no extra forward."""

    _tag_names = ["trl", "rloo", "trl-sharpen", "rlhf-sharpening"]
    _config_class = SelfRewardRLOOConfig
