r"""`BoNSFTTrainer`: SFT-Sharpening (Huang et al. 2025, Sec. 2.1 / 4.1, App. D) as a drop-in `trl.SFTTrainer`.

For training prompts x_1..x_n, draw y_{i,1..N} ~ pi_base(.|x_i), keep y_i^BoN = argmax_j r(y_{i,j}|x_i) with the
self-reward r = log pi_base(y|x), and maximize sum_i log pi(y_i^BoN|x_i): inference-time Best-of-N amortized into the
weights, so that greedy decoding afterwards does what BoN@N did.

How it sits on TRL: `SFTTrainer.__init__` loads the model, wraps PEFT and prepares the datasets. The Best-of-N data
needs the model in place (on its device, under its distributed wrapper), so our `_prepare_dataset` leaves the
prompt-only train dataset alone; once `SFTTrainer.__init__` is done, `trl_sharpen.best_of_n_sampling` samples and selects
(saving resumable shards under `<output_dir>/bon_data`), and the selected sequences become TRL's pre-tokenized format
(`input_ids` = prompt ids + the exact sampled completion ids, `completion_mask` on the completion), which
`SFTTrainer._prepare_dataset` turns into labels. Training is then TRL's own.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, load_from_disk
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import SFTTrainer
from trl.models.utils import prepare_deepspeed, unwrap_model_for_generation
from trl.trainer.utils import create_model_from_path, get_config_model_id

from .answers import get_answer_extractor
from .best_of_n_sampling import BON_FEATURES, RUN_FILE, best_of_n
from .bon_sft_config import BoNSFTConfig
from .data import is_saved_dataset, validate_prompt_dataset
from .fingerprints import model_fingerprint, tokenizer_fingerprint
from .logprobs import sequence_logprobs
from .monitoring import SharpeningMonitorMixin, is_prompt_only
from .paper import SHARPENING_PAPER
from .real_models import resolve_model_name_or_path
from .report_tables import log_table
from .self_rewards import base_scoring_context


if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import BitsAndBytesConfig
    from transformers.trainer_utils import EvalPrediction


logger = logging.getLogger(__name__)

BON_DATA_DIR = "bon_data"
BON_TABLE_ROWS = 8  # selected samples per round in the logged table


def is_bon_dataset(dataset) -> bool:
    """Whether `dataset` holds Best-of-N results (from `best_of_n` or `trl-sharpen bon`)."""
    columns = getattr(dataset, "column_names", None) or []
    return {"prompt_ids", "selected_completion_ids", "selected_index"} <= set(columns)


def selected_sequences(bon: Dataset, max_length: int | None = None) -> Dataset:
    """TRL's pre-tokenized SFT format from Best-of-N results: `input_ids` = prompt ids + the selected completion's
    exact sampled ids (never re-tokenized text), `completion_mask` = 1 on the completion. Prompts without a selection
    (every sample dropped as truncated) are left out, and so are sequences longer than `max_length`, with a warning
    that counts them: TRL would cut them silently, and the model would learn an answer without its end."""
    rows = [
        (list(prompt), list(completion))
        for prompt, completion, index in zip(bon["prompt_ids"], bon["selected_completion_ids"], bon["selected_index"])
        if index >= 0
    ]
    if not rows:
        raise ValueError(
            "No prompt has a selected completion (every sample was truncated and truncated_completions='drop'): "
            "raise max_completion_length, or use truncated_completions='penalize'."
        )
    if max_length is not None:
        fitting = [(prompt, completion) for prompt, completion in rows if len(prompt) + len(completion) <= max_length]
        if len(fitting) < len(rows):
            longest = max(len(prompt) + len(completion) for prompt, completion in rows)
            logger.warning(
                "Dropped %d of %d Best-of-N rows whose prompt + selected completion is longer than max_length=%d "
                "tokens (longest: %d): TRL would cut them, and the model would learn answers without their end. "
                "Raise max_length to keep them.",
                len(rows) - len(fitting),
                len(rows),
                max_length,
                longest,
            )
        if not fitting:
            raise ValueError(
                f"Every Best-of-N row is longer than max_length={max_length} tokens (prompt + selected completion, "
                f"up to {longest}): nothing is left to train on. Raise max_length."
            )
        rows = fitting
    return Dataset.from_dict(
        {
            "input_ids": [prompt + completion for prompt, completion in rows],
            "completion_mask": [[0] * len(prompt) + [1] * len(completion) for prompt, completion in rows],
        }
    )


def bon_metrics(bon: Dataset, answer_extractor=None) -> dict[str, float]:
    """Dataset-level statistics of one round of Best-of-N data (logged under `bon/`):

    - `bon/selected_reward`: mean over prompts of r(y^BoN|x);
    - `bon/reward_gap`: mean over prompts of r(y^BoN|x) - (1/N) sum_j r(y_j|x), what selection gains over sampling;
    - `bon/samples_per_prompt`: mean number of samples drawn (below N under adaptive sampling);
    - `bon/distinct_answers`: mean number of distinct final answers among a prompt's samples (with an extractor).
    """
    selected = [(s, r) for s, r in zip(bon["selected_reward"], bon["rewards"]) if s is not None]
    metrics = {
        "bon/selected_reward": fmean(s for s, _ in selected),
        "bon/reward_gap": fmean(s - fmean(r) for s, r in selected),
        "bon/samples_per_prompt": fmean(bon["num_samples"]),
    }
    if answer_extractor is not None:
        extract = get_answer_extractor(answer_extractor)
        metrics["bon/distinct_answers"] = fmean(
            len({a for a in map(extract, completions) if a is not None}) for completions in bon["completions"]
        )
    return metrics


def bon_run_metadata(bon: Dataset) -> dict | None:
    """The `bon_run.json` saved next to a Best-of-N dataset loaded from disk (None for an in-memory dataset)."""
    for cache_file in bon.cache_files:
        run_file = Path(cache_file["filename"]).parent / RUN_FILE
        if run_file.exists():
            return json.loads(run_file.read_text())
    return None


class _SwappableDataset(torch.utils.data.Dataset):
    """The train dataset under `sampling_policy="current"`: the dataloader keeps this object, and each regeneration
    swaps the rows behind it (same number of rows, so the epoch length and the LR schedule stay valid)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]


class _RegenerateCallback(TrainerCallback):
    """`sampling_policy="current"`: at the start of every K-th epoch, new Best-of-N data from the current policy."""

    def __init__(self, trainer: BoNSFTTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        # `state.epoch` is fractional when resuming mid-epoch; its floor is the epoch about to run
        epoch = math.floor((state.epoch or 0) + 1e-9)
        self.trainer._load_round(epoch // args.regenerate_every_epochs)


class BoNSFTTrainer(SharpeningMonitorMixin, SFTTrainer):
    r"""SFT-Sharpening: SFT on the Best-of-N completion of each prompt, ranked by a self-reward of the base model.

    $$\hat\pi = \arg\max_\pi \sum_i \log \pi(y_i^{BoN} \mid x_i), \qquad
    y_i^{BoN} = \arg\max_{j \le N} \log \pi_{base}(y_{i,j} \mid x_i), \quad y_{i,j} \sim \pi_{base}(\cdot \mid x_i)$$

    (Huang et al. 2025, Sec. 2.1; with `adaptive_delta`, N per prompt follows App. D). Same keyword signature as
    `trl.SFTTrainer`; give a prompt-only `train_dataset` (TRL's standard or conversational `prompt` column) and a
    [`BoNSFTConfig`]. The Best-of-N data is generated in `__init__`, saved as a `datasets` dataset under
    `<output_dir>/bon_data` (reused, not regenerated, when the trainer is built again on the same output directory,
    e.g. to resume), and exposed as `trainer.bon_dataset`. A dataset already produced by `trl-sharpen bon` (or its
    directory) can be passed as `train_dataset` instead; it is refused if another model or tokenizer generated it.

    With `peft_config` (or a PEFT model), sampling and scoring use the adapter-disabled base: no second copy of the
    model. `sampling_policy="current"` regenerates the data from the current policy every K epochs, still ranked by
    the self-reward under pi_base (adapter-disabled model with PEFT, otherwise a frozen copy of the base).

    Metrics (besides SFT's own): `bon/selected_reward`, `bon/reward_gap`, `bon/samples_per_prompt` and, when
    `answer_extractor` is set, `bon/distinct_answers` (see `bon_metrics`), logged once per round of data. A
    prompt-only `eval_dataset` gets the label-free sharpening metrics (`eval_objective` = J_beta, ...; see
    `trl_sharpen.monitoring`); pi_base is then kept as a frozen copy (with PEFT: the adapter-disabled model).
    """

    _tag_names = ["trl", "trl-sharpen", "sft-sharpening"]
    _name = "SFT-Sharpening"
    _paper = SHARPENING_PAPER

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        args: BoNSFTConfig | TrainingArguments | None = None,
        data_collator: Callable[[list[dict]], dict] | None = None,
        train_dataset: Dataset | str | os.PathLike | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        quantization_config: BitsAndBytesConfig | None = None,
        peft_config: PeftConfig | None = None,
        formatting_func: Callable[[dict], str] | None = None,
    ):
        model = resolve_model_name_or_path(model)  # a GGUF file or model package: its converted folder
        args = _as_bon_config(args, model)
        if isinstance(train_dataset, (str, os.PathLike)):
            if not is_saved_dataset(train_dataset):
                raise ValueError(f"{train_dataset} is not a saved Best-of-N dataset (`trl-sharpen bon` output).")
            train_dataset = load_from_disk(str(train_dataset))
        if not isinstance(train_dataset, Dataset):
            raise ValueError(
                "`train_dataset` must be a `datasets.Dataset` of prompts (or Best-of-N results), got "
                f"{type(train_dataset).__name__}."
            )
        if not is_bon_dataset(train_dataset):
            validate_prompt_dataset(train_dataset)
        if formatting_func is not None:
            raise ValueError(
                "formatting_func is not supported: BoNSFTTrainer trains on the exact token ids it sampled, not on "
                "formatted text. Format the prompts (`prompt` column) before passing them."
            )
        # `_prepare_dataset` leaves this one for `_load_round`, which needs the model in place
        self._deferred_train_dataset = train_dataset
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self._deferred_train_dataset = None
        bon_columns = [c for c in BON_FEATURES if c in train_dataset.column_names]
        self._prompts = train_dataset.remove_columns(bon_columns) if bon_columns else train_dataset
        self._round = None
        self.bon_dataset = None
        if is_bon_dataset(train_dataset):
            self._check_provenance(train_dataset)
            self._use_round(0, train_dataset)
        else:
            self._load_round(0)
        # Full fine-tuning samples from the policy in later rounds but still ranks by pi_base, and monitoring scores
        # by pi_base: keep a frozen copy
        needs_base = args.sampling_policy == "current" or eval_dataset is not None
        self._frozen_base = self._copy_base_model() if needs_base and not is_peft_model(self.model) else None
        if args.sampling_policy == "current":
            self.train_dataset = _SwappableDataset(self.train_dataset)
            self.add_callback(_RegenerateCallback(self))

    @property
    def _tokenizer_for_sampling(self):
        return (
            self.processing_class.tokenizer
            if isinstance(self.processing_class, ProcessorMixin)
            else self.processing_class
        )

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if dataset is getattr(self, "_deferred_train_dataset", None):
            return dataset  # prompts: sampled once the model is in place, see `_load_round`
        columns = set(getattr(dataset, "column_names", None) or [])
        if is_bon_dataset(dataset):
            dataset = selected_sequences(dataset, args.max_length)
        elif is_prompt_only(dataset) and dataset_name.startswith("eval"):
            return dataset  # held-out prompts for the sharpening metrics (`trl_sharpen.monitoring`)
        elif "prompt" in columns and "completion" not in columns:
            raise ValueError(
                f"The {dataset_name} dataset is prompt-only, but evaluation needs completions to score the SFT loss "
                "on: pass a Best-of-N dataset (`trl-sharpen bon`) or a prompt-completion dataset."
            )
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _bon_dir(self, round_index: int) -> Path:
        name = BON_DATA_DIR if round_index == 0 else f"{BON_DATA_DIR}_round{round_index}"
        return Path(self.args.output_dir) / name

    def _load_round(self, round_index: int) -> None:
        """Make round `round_index` of Best-of-N data the train data: from disk when complete, else sampled (round 0
        from pi_base; later rounds, `sampling_policy="current"`, from the current policy)."""
        if round_index == self._round:
            return
        output_dir = self._bon_dir(round_index)
        if round_index > 0 and is_saved_dataset(output_dir):
            bon = load_from_disk(str(output_dir))  # a complete round from an interrupted run
        else:
            bon = self._sample(round_index, output_dir)
        self._use_round(round_index, bon)

    def _use_round(self, round_index: int, bon: Dataset) -> None:
        args = self.args
        if args.sampling_policy == "current" and args.max_length is not None:
            # Rows longer than max_length are dropped, which would change the row count of a later round mid-epoch
            needed = max(map(len, bon["prompt_ids"])) + args.max_completion_length
            if needed > args.max_length:
                raise ValueError(
                    f"max_length={args.max_length} is too short for sampling_policy='current': the longest prompt "
                    f"plus max_completion_length={args.max_completion_length} is {needed} tokens, and rows longer "
                    "than max_length are dropped (never trained on cut), which would change the number of rows "
                    f"between rounds. Set max_length to at least {needed}."
                )
        train = self._prepare_dataset(bon, self.processing_class, args, args.packing, None, "train")
        if isinstance(self.train_dataset, _SwappableDataset):
            if len(train) != len(self.train_dataset):  # guarded by the config; a changed row count breaks the epoch
                raise RuntimeError(f"Round {round_index} has {len(train)} rows, not {len(self.train_dataset)}.")
            self.train_dataset.dataset = train
        else:
            self.train_dataset = train
        self.bon_dataset, self._round = bon, round_index
        for key, value in bon_metrics(bon, args.answer_extractor).items():
            self._metrics["train"][key].append(value)
        # A few selected samples of the round, logged as a table (wandb, tensorboard) with the next metrics
        sample = bon.select([i for i, selected in enumerate(bon["selected_index"]) if selected >= 0][:BON_TABLE_ROWS])
        self._bon_table = {
            "round": [round_index] * len(sample),
            "prompt": [str(prompt) for prompt in sample["prompt"]],
            "selected_completion": sample["selected_completion"],
            "selected_reward": sample["selected_reward"],
            "mean_reward": [fmean(rewards) for rewards in sample["rewards"]],
        }

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if getattr(self, "_bon_table", None) and self.accelerator.is_main_process:
            log_table(self, "bon_samples", self._bon_table)
        self._bon_table = None

    def _sample(self, round_index: int, output_dir: Path) -> Dataset:
        args = self.args
        with self._sampler(from_base=round_index == 0) as (model, base_logprobs_fn):
            return best_of_n(
                model,
                self._tokenizer_for_sampling,
                self._prompts,
                sampling=args,  # the config is a BestOfNSamplingArguments: its sampling fields, passed whole
                base_logprobs_fn=base_logprobs_fn,
                output_dir=output_dir,
                # Later rounds sample from a policy that moved on since any partial shards were written
                overwrite=round_index > 0,
                # Distinct seeds per round; `best_of_n` adds the shard index
                seed=args.seed + 1_000_000 * round_index,
                # Parameters are gathered by `unwrap_model_for_generation` under ZeRO-3
                synced_gpus=False,
                progress=not args.disable_tqdm,
            )

    @contextlib.contextmanager
    def _sampler(self, from_base: bool):
        """(model to sample from, function giving log pi_base(y|x) or None when the sampler is pi_base itself)."""
        if self.model is self.model_wrapped and not (self.is_model_parallel or is_deepspeed_zero3_enabled()):
            # Under DeepSpeed / FSDP, `Trainer` places the model only when training starts; sampling in `__init__`
            # must not run on the CPU (a no-op when it is already there; quantized models are placed at load)
            if getattr(self.model, "quantization_method", None) is None:
                self.model.to(self.accelerator.device)
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
        ) as model:
            if from_base:
                # With PEFT, the adapter-disabled model is pi_base: its samples' log-probs come free from generation
                with base_scoring_context(model):
                    yield model, None
                return
            base = self._frozen_base

            def base_logprobs(prompt_ids, completion_ids):
                with base_scoring_context(model) if base is None else contextlib.nullcontext():
                    scorer = model if base is None else base
                    return sequence_logprobs(
                        scorer, prompt_ids, completion_ids, micro_batch_size=self.args.sampling_batch_size
                    ).tolist()

            yield model, base_logprobs

    @contextlib.contextmanager
    def _monitoring_model(self, from_base: bool):
        """For `trainer.evaluate()` on prompts (`trl_sharpen.monitoring`): the policy, or pi_base (the frozen copy, or
        the adapter-disabled policy with PEFT), unwrapped and in eval mode."""
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
        ) as model:
            was_training = model.training
            model.eval()
            try:
                if from_base and self._frozen_base is not None:
                    base = self.accelerator.unwrap_model(self._frozen_base)
                    gather = contextlib.nullcontext()
                    if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
                        # the frozen copy is sharded like the policy: gather it, as for the policy
                        import deepspeed

                        gather = deepspeed.zero.GatheredParameters(list(base.parameters()))
                    with gather:
                        yield base
                else:
                    with base_scoring_context(model) if from_base else contextlib.nullcontext():
                        yield model
            finally:
                model.train(was_training)

    def _copy_base_model(self) -> torch.nn.Module:
        """A frozen pi_base for ranking samples of the full-fine-tuned policy (costs one more copy of the weights;
        with PEFT the adapter-disabled model is used instead)."""
        if is_deepspeed_zero3_enabled():
            # Partitioned parameters cannot be deep-copied: load the base again and shard it like the policy
            base = create_model_from_path(
                get_config_model_id(self.model.config), **(self.args.model_init_kwargs or {})
            )
            return prepare_deepspeed(base, self.accelerator)
        base = copy.deepcopy(self.model).eval()
        # TRL's fused LM head replaces the instance's `forward` by a closure over the policy's bound forward, which a
        # deep copy keeps: the copy's forward would run the policy. The frozen base only generates and scores, with the
        # class's own forward.
        base.__dict__.pop("forward", None)
        base.requires_grad_(False)
        return base

    def _check_provenance(self, bon: Dataset) -> None:
        """Refuse Best-of-N data generated by another model or tokenizer (fingerprints saved in `bon_run.json`)."""
        run = bon_run_metadata(bon)
        if run is None:
            logger.warning(
                "The Best-of-N dataset has no saved metadata (bon_run.json), so it cannot be checked against the model "
                "being trained. Make sure pi_base generated it."
            )
            return
        current = {
            "model": model_fingerprint(self.model),
            "tokenizer": tokenizer_fingerprint(self._tokenizer_for_sampling),
        }
        for key, fingerprint in current.items():
            if run.get(key) != fingerprint:
                raise ValueError(
                    f"The Best-of-N dataset was generated with a different {key} ({run.get('model_name_or_path')}, "
                    f"{key} fingerprint {run.get(key)}) than the one being trained "
                    f"({get_config_model_id(self.model.config)}, fingerprint {fingerprint}). SFT-Sharpening trains on "
                    "pi_base's own samples: regenerate the data with this model (`trl-sharpen bon`), or pass the "
                    "prompts and let the trainer sample them."
                )
        if run.get("samples") == "imported":  # generated elsewhere (`--samples_file`): no sampling settings to compare
            return
        # The settings that shape the samples (not where they are stored or their seed)
        sampling = self.args.fingerprint(run.get("self_reward"))
        sampling = {k: v for k, v in sampling.items() if k not in ("self_reward", "shard_size", "seed")}
        differs = {k: run.get(k) for k, v in sampling.items() if run.get(k) != v}
        if differs:
            logger.warning(
                "Training on a Best-of-N dataset generated with %s as is; the config's sampling settings apply only to "
                "data the trainer samples itself (sampling_policy='current').",
                differs,
            )


def _as_bon_config(args, model) -> BoNSFTConfig:
    if isinstance(args, BoNSFTConfig):
        return args
    if args is None:
        name = model if isinstance(model, str) else get_config_model_id(model.config)
        return BoNSFTConfig(f"{name.split('/')[-1]}-BoNSFT")
    # An `SFTConfig` / `TrainingArguments`: keep its values, add our defaults
    init_fields = {f.name for f in dataclasses.fields(BoNSFTConfig) if f.init}
    values = {k: v for k, v in args.to_dict().items() if k in init_fields}
    values["hub_token"] = args.hub_token  # `to_dict` hides it
    if values.get("completion_only_loss") is None:
        values["completion_only_loss"] = True
    return BoNSFTConfig(**values)
