r"""`SelfRewardDPOTrainer`: RLHF-Sharpening (Huang et al. 2025, Sec. 2.2 / 4.2) as a drop-in `trl.DPOTrainer`. The
objective, Eq. 8, and which setting is the paper's are stated once, in the class docstring.

Where the time goes, per step: one generation, one no-grad pi_base pass over the k samples, one policy forward and
backward over the pairs. With reference = pi_base, the `logprob` self-reward log pi_base(y|x) *is* DPO's reference
log-probability, so the one pi_base pass serves both: its values enter the batch as `ref_chosen_logps` /
`ref_rejected_logps`, which DPO's loss reads instead of running its own reference forward. With `sample_from="base"`
even that pass disappears: the samples' log pi_base(y|x) are recorded during generation.

Hooks for subclasses (XPO builds on them): `_generate`, `_base_logprobs`, `_self_rewards`, `_pair_batch` build the
batch in `_prepare_inputs`; `_auxiliary_loss` receives the policy's sequence log-probs of the loss forward *with
gradients* (captured from DPO's own forward, no second pass) and adds to DPO's loss.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, is_peft_model
from datasets import Dataset, IterableDataset
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import EvalPrediction
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing, unwrap_model_for_generation
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import get_config_model_id, print_prompt_completions_sample, use_adapter

from .best_of_n_sampling import answer_flags
from .data import is_conversational_prompt, tokenize_prompt, validate_prompt_dataset
from .generation import Completions, eval_mode, generate_completions, sampling_config
from .logprobs import add_cpu_lm_head, sequence_logprobs
from .monitoring import SharpeningMonitorMixin
from .pairs import PairSelection, select_pairs
from .paper import SHARPENING_PAPER
from .real_models import resolve_model_name_or_path
from .report_tables import log_table
from .sampling_arguments import answer_gating_on
from .self_reward_dpo_config import SHARPEN_LOSS, SelfRewardDPOConfig
from .self_rewards import get_self_reward


if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import BitsAndBytesConfig

logger = logging.getLogger(__name__)

# Keys of a pair batch that DPO's `_compute_loss` reads; anything else a batch carries is ours and is popped first
_DPO_BATCH_KEYS = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def collate_prompts(examples: list[dict]) -> dict[str, list]:
    """Prompt-only examples as a dict of lists: the pairs are built per step, in `_prepare_inputs`."""
    return {key: [example[key] for example in examples] for key in examples[0]}


def _tokenize_prompt_column(example, tokenizer):
    return {"prompt_ids": tokenize_prompt(tokenizer, example["prompt"])}


def _context_length(model: str | PreTrainedModel, args) -> int | None:
    """The model's positional limit (`max_position_embeddings`), from its config; None when it declares none."""
    if isinstance(model, str):
        init_kwargs = (args.model_init_kwargs if args is not None else None) or {}
        config = AutoConfig.from_pretrained(
            model,
            revision=init_kwargs.get("revision"),
            trust_remote_code=init_kwargs.get("trust_remote_code", getattr(args, "trust_remote_code", False)),
        )
    else:
        config = model.config
    return getattr(config.get_text_config(), "max_position_embeddings", None)


class SelfRewardDPOTrainer(SharpeningMonitorMixin, DPOTrainer):
    r"""RLHF-Sharpening with TRL's DPO losses: online pairs ranked by a self-reward, reference = pi_base.

    Same keyword signature as `trl.DPOTrainer`, with a prompt-only `train_dataset` (TRL's standard or conversational
    format) and a [`SelfRewardDPOConfig`]. pi_base is the reference model (loaded from the policy's path when
    `ref_model` is None), or the adapter-disabled policy with PEFT.

    Each step samples k = `num_generations` completions per prompt, from the policy or (`sample_from="base"`) from
    pi_base, scores them with the self-reward r (default r(y|x) = log pi_base(y|x)), and trains on one pair per
    prompt, (y, y') = (best, worst) by `trl_sharpen.pairs.select_pairs`: a complete sample ranks above a truncated
    one (a prefix's log-probability bounds that of every completion extending it, so a cut sample is never chosen over
    a complete one), then by reward; ties are skipped or kept (`ties`). Every TRL DPO `loss_type` works, plus
    `"sharpen"`, the paper's Eq. 8:

    $$\mathcal{L} = \big(\beta \log\tfrac{\pi(y|x)}{\pi_{base}(y|x)} - \beta \log\tfrac{\pi(y'|x)}{\pi_{base}(y'|x)}
    - (r(y|x) - r(y'|x))\big)^2.$$

    The paper's setting and the default differ. The paper's RLHF-Sharpening maximizes
    $\mathbb{E}_{y\sim\pi}[\log \pi_{base}(y|x)] - \beta\,\mathrm{KL}(\pi\|\pi_{base})$, whose optimum
    $\pi^*_\beta \propto \pi_{base}^{1+1/\beta}$ sharpens as $\beta \to 0$; Eq. 8 is a regression whose minimizer over
    pairs drawn from pi_base is that optimum. So the optimum holds for `loss_type="sharpen"` with
    `sample_from="base"` and `self_reward="logprob"`: the paper's setting, selected together by `preset="paper"`.
    The default is online DPO instead: TRL's `sigmoid` loss on the pairs of policy samples. With rank labels the
    logistic loss keeps widening the margin and has no finite optimum (only beta's KL anchor and the number of steps
    bound it), so it is a pragmatic sharpener, not the paper's estimator. It is the default because it sharpened the
    bundled toy task most, with the recipe's 20 steps (greedy accuracy and log-likelihood lift of the greedy outputs
    over 3 seeds; `python benchmarks/sharpening_table.py --methods dpo dpo-sharpen dpo-paper`): sigmoid on policy
    samples 0.960 ± 0.057 (+2.58 nats), Eq. 8 on policy samples 0.918 ± 0.055 (+2.28), the paper's setting
    0.773 ± 0.146 (-0.35), from 0.095 for the base (a likely reason, not measured apart: pi_base's samples do not
    follow the policy as it sharpens, so later steps keep fitting pairs the policy no longer produces).

    Metrics, besides DPO's (`rewards/*`, `logps/*`, ...): `self_reward/chosen`, `self_reward/rejected` (mean
    self-reward of the trained pairs), `self_reward/margin` (their mean difference), `self_reward/ties_skipped`
    (pairs skipped as ties per step, all processes), `self_reward/sharpen_loss` (with the sharpen loss),
    `completions/mean_length` (tokens) and `completions/clipped_ratio` (share of samples cut at
    `max_completion_length`). A prompt-only `eval_dataset` gets the label-free sharpening metrics (`eval_objective`
    = J_beta, ...; see `trl_sharpen.monitoring`) instead of DPO's pair loss.
    """

    _tag_names = ["trl", "trl-sharpen", "rlhf-sharpening"]
    _name = "Self-Reward DPO (RLHF-Sharpening)"
    _paper = SHARPENING_PAPER
    _config_class = SelfRewardDPOConfig  # subclasses name their own: `args` must be one (default: `<model>-<name>`)

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        ref_model: PreTrainedModel | None = None,
        args: SelfRewardDPOConfig | None = None,
        data_collator: Callable[[list[dict]], dict] | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: BitsAndBytesConfig | None = None,
        peft_config: PeftConfig | None = None,
    ):
        # A GGUF file or model package: its converted folder (converted once, cached)
        model, ref_model = resolve_model_name_or_path(model), resolve_model_name_or_path(ref_model)
        config_name = self._config_class.__name__
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = self._config_class(f"{name.split('/')[-1]}-{config_name.removesuffix('Config')}")
        elif not isinstance(args, self._config_class):
            raise TypeError(f"args must be a {config_name}, got {type(args).__name__}.")
        if args.reanchor_steps and (peft_config is not None or is_peft_model(model)):
            raise ValueError(
                f"reanchor_steps={args.reanchor_steps} needs a separate pi_base to overwrite, but with PEFT pi_base "
                "is the adapter-disabled policy. Train without PEFT, or set reanchor_steps=0."
            )
        if train_dataset is not None:
            first = next(iter(train_dataset))
            if "image" in first or "images" in first:
                raise ValueError("Prompts with images are not supported: pass text prompts (standard or chat).")
        # Read by `_prepare_dataset`, which DPO calls before the model is stored on the trainer
        self._context_length = _context_length(model, args)
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator or collate_prompts,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        # How this trainer plugs into DPO's loss (`DPOTrainer._compute_loss`), and why this way. It needs two things
        # DPO has no public hook for: (1) reference log-probs it computed itself (once per step, shared with the
        # self-reward), and (2) the policy's log-probs *with gradients* for `_auxiliary_loss`.
        # (1) `precompute_ref_logps` is DPO's switch for "the batch carries `ref_chosen_logps`/`ref_rejected_logps`";
        #     we fill them per step in `_pair_batch` instead of over the dataset, so `_precompute_ref_logps` (the
        #     dataset pass) has nothing to do. (2) `compute_loss` captures `log_probs` from DPO's own fused-LM-head
        #     forward with a forward hook.
        # The alternatives are worse: overriding `_compute_loss` means copying ~300 lines (16 loss types, metrics)
        # that change with every TRL release, and a second policy forward doubles the cost of the step. Both lines
        # we rely on are pinned by tests/test_trl_compat.py, so a TRL change fails there by name.
        self.precompute_ref_logps = True
        # DPO's policy forward on CPU: a chunked log-softmax over the completion tokens instead of TRL's fused kernel,
        # which without Triton costs about twice as much; on GPUs the fused kernel stays (see `add_cpu_lm_head`).
        # The outputs are the ones `DPOTrainer.__init__` asks of its fused head.
        head_outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
        head_outputs += ("log_sum_sq_probs",) if self.use_weighting else ()
        add_cpu_lm_head(self.model.get_base_model() if is_peft_model(self.model) else self.model, head_outputs)
        # DPO's loss rejects unknown loss types: it runs the others, `_auxiliary_loss` adds the regression
        weights = list(zip(self.loss_types, self.loss_weights, strict=True))
        self.sharpen_weight = sum(weight for loss_type, weight in weights if loss_type == SHARPEN_LOSS)
        self.loss_types = [loss_type for loss_type, _ in weights if loss_type != SHARPEN_LOSS]
        self.loss_weights = [weight for loss_type, weight in weights if loss_type != SHARPEN_LOSS]
        self._check_base_tokenizer(ref_model)

        self.self_reward = get_self_reward(
            args.self_reward, tokenizer=self._tokenizer, answer_extractor=args.answer_extractor
        )
        self.generation_config = sampling_config(
            self.accelerator.unwrap_model(self.model),
            self._tokenizer,
            **args.sampling_config_kwargs(),  # temperature, top_p, top_k, max_completion_length (GenerationArguments)
            **(args.generation_kwargs or {}),
        )
        # Prompts are never truncated: `_prepare_dataset` keeps only prompts with room for a full completion, so the
        # policy scores exactly the tokens pi_base scored
        self.pair_collator = DataCollatorForPreference(
            pad_token_id=self._tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of
        )
        self._logged_pairs: dict[str, list] = {}  # the last step's pairs, for `log_completions`
        self._train_batches, self._pairs_trained = 0, 0  # of this `train()` call, all processes: see `train`

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        # A run whose every step was all ties trained on nothing: fail instead of saving pi_base as "sharpened"
        self._train_batches, self._pairs_trained = 0, 0
        output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        if self._train_batches and not self._pairs_trained:
            raise RuntimeError(
                f"Training ran {self._train_batches} batches on zero pairs: every pair was a tie, so the "
                f"model did not change. The self-reward {self.self_reward.name!r} gave all "
                f"{self.args.num_generations} samples of every prompt the same value: use more samples "
                "(num_generations), another self_reward, or ties='keep'."
            )
        return output

    # ------------------------------------------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        first = next(iter(dataset))
        if "prompt_ids" in first:  # already prepared (`evaluate` prepares the datasets it is given again)
            return dataset
        validate_prompt_dataset(dataset if isinstance(dataset, Dataset) else Dataset.from_list([first]))
        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
        with PartialState().main_process_first():
            dataset = dataset.map(_tokenize_prompt_column, fn_kwargs={"tokenizer": self._tokenizer}, **map_kwargs)
            # A prompt needs room for a whole completion, within max_length and within the model's positions: the pairs
            # are never truncated (see `pair_collator`), and the model cannot attend beyond its context
            limit = self._prompt_limit(args)
            kept = dataset.filter(lambda example: 0 < len(example["prompt_ids"]) <= limit, **map_kwargs)
        if isinstance(dataset, Dataset) and len(kept) < len(dataset):
            logger.warning(
                "Dropped %d of %d %s prompts that are empty or longer than %s tokens (max_length=%s and the model's "
                "context of %s positions, less max_completion_length=%d).",
                len(dataset) - len(kept),
                len(dataset),
                dataset_name,
                limit,
                args.max_length,
                self._context_length,
                args.max_completion_length,
            )
        if isinstance(kept, Dataset) and len(kept) == 0:
            raise ValueError(
                f"No {dataset_name} prompt fits: every prompt is empty or longer than {limit} tokens (max_length="
                f"{args.max_length}, model context {self._context_length}, max_completion_length="
                f"{args.max_completion_length}). Lower max_completion_length or use shorter prompts."
            )
        return kept

    def _prompt_limit(self, args) -> float:
        """The longest prompt that leaves room for `max_completion_length` tokens in max_length and the context."""
        limits = [limit for limit in (args.max_length, self._context_length) if limit is not None]
        limit = min(limits, default=float("inf")) - args.max_completion_length
        if limit < 1:
            raise ValueError(
                f"max_completion_length={args.max_completion_length} leaves no room for a prompt in the model's "
                f"context of {self._context_length} positions (max_length={args.max_length}): lower "
                "max_completion_length."
            )
        return limit

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt", "prompt_ids"]

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # Prompt-only data: nothing to precompute (see `precompute_ref_logps` in `__init__`)
        return dataset

    # ----------------------------------------------------------------------------------------- per-step pairs
    def _prepare_inputs(self, inputs):
        """Sample k completions per prompt, score them, select the pairs, and return DPO's pair batch."""
        if "input_ids" in inputs:  # already a pair batch
            return inputs
        k, from_base = self.args.num_generations, self.args.sample_from == "base"
        samples = self._generate(inputs["prompt_ids"], k, from_base=from_base)
        row_prompt_ids = [inputs["prompt_ids"][i] for i in samples.prompt_index]
        # Sampled from pi_base: generation recorded log pi_base(y|x). Otherwise one pi_base pass, shared with DPO.
        # Under ZeRO-3 every rank must run as many forwards as the others, so all samples are scored there.
        base_logps = torch.tensor(samples.logprobs) if from_base else None
        if base_logps is None and (self.self_reward.requires_base_logprobs or is_deepspeed_zero3_enabled()):
            base_logps = self._base_logprobs(row_prompt_ids, samples.completion_ids)
        rewards = self._self_rewards(inputs, samples, base_logps)
        selection = self._select_pairs(rewards, samples)
        chosen, rejected = (torch.tensor(indices) for indices in selection.batch_pairs)
        if base_logps is None:  # a self-reward that does not read pi_base: score only the selected pairs
            both = torch.cat([chosen, rejected])
            base_logps = torch.zeros(len(samples))
            base_logps[both] = self._base_logprobs(
                [row_prompt_ids[i] for i in both], [samples.completion_ids[i] for i in both]
            )
        self._log_samples(inputs, samples, rewards, selection)
        return self._pair_batch(
            [row_prompt_ids[i] for i in chosen],
            [samples.completion_ids[i] for i in chosen],
            [samples.completion_ids[i] for i in rejected],
            base_logps[chosen],  # DPO's reference log-probs
            base_logps[rejected],
            chosen_rewards=rewards[chosen],
            rejected_rewards=rewards[rejected],
            loss_scale=torch.tensor(selection.loss_scale),
        )

    def _answer_flags(self, samples: Completions) -> list[bool] | None:
        """Per sample, complete with an extractable answer (answer gating, `require_answer`); None when gating is off."""
        if not answer_gating_on(self.args.require_answer, self.args.answer_extractor):
            return None
        texts = self._tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)
        return answer_flags(texts, samples.truncated, self.args.answer_extractor, self.args.require_answer)

    def _select_pairs(self, rewards: torch.Tensor, samples: Completions) -> PairSelection:
        """`select_pairs` (complete before truncated, then by reward; ties), with equal pair counts on all processes."""
        selection = select_pairs(
            rewards.tolist(),
            self.args.num_generations,
            truncated=samples.truncated,
            completion_ids=samples.completion_ids,
            ties=self.args.ties,
            tie_tolerance=self.args.tie_tolerance,
            has_answer=self._answer_flags(samples),
        )
        if self.accelerator.num_processes > 1:
            # DPO's loss gathers per-pair tensors across processes (`rewards/*`, `logps/*`), which needs the same
            # number of pairs everywhere: each process keeps as many of its pairs as the process with the fewest
            count = torch.tensor([len(selection.pairs)], device=self.accelerator.device)
            selection = selection.first(int(self.accelerator.gather(count).min()))
        return selection

    @contextlib.contextmanager
    def _generation_model(self, from_base: bool):
        """The model to sample from: the policy, or pi_base (reference model, or adapter-disabled policy)."""
        if from_base and self.ref_model is not None:
            ref_model = self.accelerator.unwrap_model(self.ref_model)
            gather = contextlib.nullcontext()
            if is_deepspeed_zero3_enabled():  # the frozen reference is sharded too; gather it for generation
                import deepspeed

                gather = deepspeed.zero.GatheredParameters(list(ref_model.parameters()))
            with gather:
                yield ref_model
            return
        with unwrap_model_for_generation(
            self.model_wrapped,
            self.accelerator,
            gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        ) as model:
            with eval_mode(model), self._base_adapter(model) if from_base else contextlib.nullcontext():
                yield model

    def _monitoring_model(self, from_base: bool):
        """For `trainer.evaluate()` on prompts (`trl_sharpen.monitoring`): the policy or pi_base, as for sampling."""
        return self._generation_model(from_base)

    def _generate(self, prompt_ids: list[list[int]], num_samples: int, from_base: bool) -> Completions:
        """`num_samples` completions per prompt (prompt-major); from pi_base they carry log pi_base(y|x)."""
        # ZeRO-3 weights left partitioned (ds3_gather_for_generation=False) are fetched layer by layer in every forward:
        # the processes must keep stepping together. Only pi_base as a separate reference model is always gathered.
        gathered = self.args.ds3_gather_for_generation or (from_base and self.ref_model is not None)
        synced_gpus = is_deepspeed_zero3_enabled() and not gathered
        with self._generation_model(from_base) as model:
            return generate_completions(
                model,
                prompt_ids,
                self.generation_config,
                num_samples=num_samples,
                batch_size=len(prompt_ids) * num_samples,
                record_logprobs=from_base,
                synced_gpus=synced_gpus,
                tokenizer=self._tokenizer,  # reads the completions when the config has stop strings
            )

    def _base_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> torch.Tensor:
        """log pi_base(y|x) of each completion (CPU float32): one no-grad forward, micro-batched for memory."""
        if self.ref_model is not None:
            model, context = self.ref_model, contextlib.nullcontext()
        else:  # PEFT: pi_base is the policy with its adapter disabled (or DPO's frozen "ref" adapter)
            model = self.accelerator.unwrap_model(self.model)
            context = contextlib.ExitStack()
            context.enter_context(self._base_adapter(model))
            context.enter_context(disable_gradient_checkpointing(model, self.args.gradient_checkpointing_kwargs))
            context.enter_context(eval_mode(model))  # the policy is in train mode mid-step: no dropout in pi_base
        with torch.no_grad(), context, self.accelerator.autocast():
            logps = sequence_logprobs(
                model,
                prompt_ids,
                completion_ids,
                micro_batch_size=self.args.scoring_batch_size or max(1, len(completion_ids)),
            )
        return logps.float().cpu()

    def _self_rewards(self, inputs: dict, samples: Completions, base_logps: torch.Tensor | None) -> torch.Tensor:
        """Self-reward of each sample (TRL reward protocol: extra dataset columns are passed as keyword arguments),
        minus `missing_eos_penalty` for truncated samples."""
        rows = samples.prompt_index
        prompts = [inputs["prompt"][i] for i in rows]
        completions = self._tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)
        if is_conversational_prompt(prompts[0]):
            completions = [[{"role": "assistant", "content": text}] for text in completions]
        extra = {
            key: [values[i] for i in rows] for key, values in inputs.items() if key not in ("prompt", "prompt_ids")
        }
        # Only a self-reward that reads log pi_base(y|x) gets it (others may not accept the keyword)
        wants_base = self.self_reward.requires_base_logprobs and base_logps is not None
        rewards = self.self_reward(
            prompts,
            completions,
            samples.completion_ids,
            base_logprobs=base_logps.tolist() if wants_base else None,
            group_ids=rows,
            trainer_state=self.state,
            **extra,
        )
        rewards = torch.tensor(rewards, dtype=torch.float32)
        if self.args.missing_eos_penalty is not None:
            rewards[torch.tensor(samples.truncated)] -= self.args.missing_eos_penalty
        return rewards

    def _pair_batch(self, prompt_ids, chosen_ids, rejected_ids, ref_chosen_logps, ref_rejected_logps, **extras):
        """DPO's collated pair batch (chosen rows, then rejected rows) on the device, plus our per-pair `extras`.

        Built here rather than by `Trainer._prepare_inputs`, which under DeepSpeed would cast the float32 reference
        log-probs to bf16 (too coarse for sums of tens of nats)."""
        examples = [
            {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
            for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids, strict=True)
        ]
        batch = self.pair_collator(examples)
        batch.update(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, **extras)
        return {key: value.to(self.accelerator.device) for key, value in batch.items()}

    # -------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        extras = {key: inputs.pop(key) for key in list(inputs) if key not in _DPO_BATCH_KEYS}
        # The policy's per-token log-probs (with gradients) of DPO's own forward, for `_auxiliary_loss` (why a hook:
        # see `precompute_ref_logps` in `__init__`)
        captured = []

        def capture(module, args, output):
            if not captured:
                captured.append(output.log_probs)

        handle = self.accelerator.unwrap_model(model).register_forward_hook(capture)
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        loss, outputs = result if return_outputs else (result, None)
        completion_mask = inputs["completion_mask"][:, 1:]
        # Zero outside the completion (labels -100); prompt-learning PEFT prepends positions, hence the right slice
        logps = captured[0][:, -completion_mask.size(1) :].sum(dim=1)
        loss = loss + self._auxiliary_loss(*logps.chunk(2), inputs, extras)
        loss = loss * extras.get("loss_scale", 1.0)
        return (loss, outputs) if return_outputs else loss

    def _auxiliary_loss(self, chosen_logps, rejected_logps, inputs, extras):
        r"""Loss added to DPO's: here the paper's regression (Eq. 8) when `"sharpen"` is among the loss types.

        `chosen_logps` / `rejected_logps` are log pi(y|x) summed over completion tokens, with gradients, from the same
        forward as DPO's loss. Subclasses (XPO's bonus alpha * sum log pi(y~|x)) extend this.
        """
        if not self.sharpen_weight:
            return 0.0
        mode = "train" if self.model.training else "eval"
        chosen_logratios = chosen_logps - inputs["ref_chosen_logps"]
        rejected_logratios = rejected_logps - inputs["ref_rejected_logps"]
        residual = self.beta * (chosen_logratios - rejected_logratios) - (
            extras["chosen_rewards"] - extras["rejected_rewards"]
        )
        delta = self.args.sharpen_huber_delta
        # Huber, scaled to equal r^2 inside [-delta, delta] (the paper's loss there; the tangent beyond)
        sharpen_loss = (
            residual.pow(2).mean()
            if delta is None
            else 2 * torch.nn.functional.huber_loss(residual, torch.zeros_like(residual), delta=delta)
        )
        gathered = self.accelerator.gather(torch.stack([sharpen_loss.detach(), residual.detach().pow(2).mean()]))
        gathered = gathered.view(-1, 2).mean(0)
        self._metrics[mode]["self_reward/sharpen_loss"].append(gathered[0].item())
        self._metrics[mode]["self_reward/sharpen_residual_sq"].append(gathered[1].item())  # Eq. 8 itself
        return self.sharpen_weight * sharpen_loss

    # ----------------------------------------------------------------------------------------------- logging
    def _log_samples(self, inputs, samples: Completions, rewards: torch.Tensor, selection: PairSelection) -> None:
        mode = "train" if self.model.training else "eval"
        chosen = [c for c, _ in selection.pairs]  # the pairs trained on (not the zero-weight fallback)
        rejected = [r for _, r in selection.pairs]
        lengths = [len(ids) for ids in samples.completion_ids]
        local = [rewards[chosen].sum(), rewards[rejected].sum(), len(chosen), selection.ties_skipped]
        local += [sum(lengths), len(lengths), sum(samples.truncated)]
        stats = self.accelerator.gather(torch.tensor(local, dtype=torch.float64, device=self.accelerator.device))
        r_chosen, r_rejected, pairs, ties, length, count, clipped = stats.view(-1, len(local)).sum(0).tolist()
        metrics = self._metrics[mode]
        if pairs > 0:
            metrics["self_reward/chosen"].append(r_chosen / pairs)
            metrics["self_reward/rejected"].append(r_rejected / pairs)
            metrics["self_reward/margin"].append((r_chosen - r_rejected) / pairs)
        metrics["self_reward/ties_skipped"].append(ties)
        metrics["completions/mean_length"].append(length / count)
        metrics["completions/clipped_ratio"].append(clipped / count)
        if mode == "train":
            self._train_batches += 1
            self._pairs_trained += int(pairs)
            if pairs == 0 and self.accelerator.is_main_process:
                logger.warning(
                    "Step %d trains on zero pairs (%d of %d prompts' pairs were ties; self_reward=%r, "
                    "num_generations=%d, tie_tolerance=%g): this step changes nothing.",
                    self.state.global_step + 1,
                    int(ties),
                    int(count) // self.args.num_generations,
                    self.self_reward.name,
                    self.args.num_generations,
                    self.args.tie_tolerance,
                )
        if self.args.log_completions:
            texts = self._tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)
            columns = {
                "prompt": [inputs["prompt"][samples.prompt_index[i]] for i in chosen],
                "chosen": [texts[i] for i in chosen],
                "rejected": [texts[i] for i in rejected],
                "self_reward/chosen": rewards[chosen].tolist(),
                "self_reward/rejected": rewards[rejected].tolist(),
            }
            self._logged_pairs = {key: gather_object(values) for key, values in columns.items()}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        pairs = self._logged_pairs
        if not (self.args.log_completions and self.accelerator.is_main_process and pairs):
            return
        rewards = {key: pairs[key] for key in ("self_reward/chosen", "self_reward/rejected")}
        with contextlib.suppress(ImportError):  # rich is optional
            print_prompt_completions_sample(
                pairs["prompt"], pairs["chosen"], rewards, None, self.state.global_step,
                self.args.num_completions_to_print, extra={"rejected": pairs["rejected"]},
            )  # fmt: skip
        log_table(self, "completions", pairs)  # wandb and tensorboard

    # ------------------------------------------------------------------------------------------------ helpers
    def _base_adapter(self, peft_model):
        """With PEFT, pi_base is the policy with adapters disabled, or DPO's frozen copy `"ref"` of a given adapter."""
        return use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None)

    def _check_base_tokenizer(self, ref_model) -> None:
        """pi_base scores (and with `sample_from="base"` writes) the policy's token ids: refuse another tokenizer."""
        if ref_model is None:
            return  # pi_base is loaded from the policy's own path, or is the adapter-disabled policy
        sizes = [m.config.get_text_config().vocab_size for m in (self.accelerator.unwrap_model(self.model), ref_model)]
        problem = None if sizes[0] == sizes[1] else f"vocabulary sizes differ (policy {sizes[0]}, pi_base {sizes[1]})"
        with contextlib.suppress(OSError, ValueError):  # no tokenizer saved next to pi_base: the size check must do
            if problem is None:
                base_vocab = AutoTokenizer.from_pretrained(ref_model.name_or_path, local_files_only=True).get_vocab()
                if base_vocab != self._tokenizer.get_vocab():
                    problem = f"the tokenizer saved with pi_base ({ref_model.name_or_path}) has another vocabulary"
        if problem is not None:
            raise ValueError(
                f"The reference model pi_base does not share the policy's tokenizer: {problem}. Sharpening scores the "
                "policy's token ids with pi_base (and with sample_from='base' decodes pi_base's samples with the "
                "policy's tokenizer), so both must use the same tokenizer."
            )
