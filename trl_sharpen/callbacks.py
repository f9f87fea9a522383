"""`GreedyReportCallback`: the paper's before/after comparison of a sharpening run, as a `transformers` callback.

    >>> trainer = SelfRewardDPOTrainer(model, args=args, train_dataset=train, processing_class=tokenizer)
    >>> trainer.add_callback(GreedyReportCallback(trainer, test_dataset, answer_column="answer"))
    >>> trainer.train()  # prints "[before] greedy accuracy on ..." and "[after] greedy accuracy on ..."

At the start and at the end of training it greedy-decodes the held-out prompts with the policy and reports greedy
accuracy against the reference answers, the mean log pi_base of the greedy outputs (the paper's log-likelihood lift)
and their mean length in tokens. With `num_samples` it also samples the policy itself, k = `num_samples` per prompt at
each of `temperatures`, and reports the field's avg@k, maj@k and pass@k (`evaluate_sampled_accuracy`): sharpening
shows in samples (a policy can raise greedy accuracy and still sample worse than the base). It runs inside `train()`, after the `Trainer` has placed (or sharded) the model, so a
script needs no device handling of its own.

pi_base, for the log-likelihood: the trainer's reference model when it has one; with PEFT the policy with its
adapters disabled; at the start of a fresh run the policy itself. After full fine-tuning without a reference model
(`BoNSFTTrainer`) pi_base is no longer in memory: it is loaded again from the policy's checkpoint path for the report
and freed afterwards, except under DeepSpeed (a second full copy is not worth it for a report: accuracy only).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence

from accelerate import PartialState
from transformers import TrainerCallback
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import create_model_from_path, get_config_model_id

from .answers import answers_match
from .evaluation import evaluate_greedy, evaluate_sampled_accuracy
from .report import GreedyEvaluation, SampledAccuracy


logger = logging.getLogger(__name__)


class GreedyReportCallback(TrainerCallback):
    """Greedy accuracy, mean log pi_base and mean length of the policy's greedy outputs on `dataset`, at the start
    (`"before"`) and at the end (`"after"`) of training: printed by the main process, kept in `results`.

    Args:
        trainer: the trainer whose policy is reported (its reference model, if any, is pi_base).
        dataset: held-out prompts (`prompt` column, standard or conversational) with reference answers.
        answer_column: the column of `dataset` holding the reference answers.
        max_new_tokens: generation length of the greedy decoding.
        checker: `checker(completion, reference) -> bool`.
        name: how the prompts are named in the printed line (e.g. the split).
        num_samples: k, the policy's samples per prompt for avg@k / maj@k / pass@k (0: greedy only).
        temperatures: the sampling temperatures of those samples (e.g. the run's and 1.0); seeded with `seed`, the
            same draws before and after training.
        answer_extractor: reads the samples' answers for maj@k (the run's extractor).
    """

    def __init__(
        self,
        trainer,
        dataset,
        answer_column: str = "answer",
        max_new_tokens: int = 64,
        checker: Callable[[str, str], bool] = answers_match,
        name: str = "test",
        num_samples: int = 0,
        temperatures: Sequence[float] = (1.0,),
        answer_extractor=None,
        seed: int = 0,
    ):
        if answer_column not in dataset.column_names:
            raise ValueError(
                f"GreedyReportCallback: the dataset has no `{answer_column}` column of reference answers (columns: "
                f"{dataset.column_names})."
            )
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"report_num_samples must be a whole number >= 0 (0: greedy only), got {num_samples!r}.")
        self.trainer = trainer
        self.dataset = dataset
        self.answer_column = answer_column
        self.max_new_tokens = max_new_tokens
        self.checker = checker
        self.name = name
        self.num_samples = num_samples
        self.temperatures = list(dict.fromkeys(float(t) for t in temperatures))  # once each, in order
        self.answer_extractor = answer_extractor
        self.seed = seed
        self.results: dict[str, GreedyEvaluation] = {}
        # "before" / "after": the policy's sampled accuracy at each temperature
        self.sampled: dict[str, list[SampledAccuracy]] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        # At the start of a fresh run the policy is pi_base; a resumed run starts from a trained checkpoint
        self.results["before"] = self._report("before", policy_is_base=state.global_step == 0)

    def on_train_end(self, args, state, control, **kwargs):
        self.results["after"] = self._report("after", policy_is_base=False)

    def _report(self, label: str, policy_is_base: bool) -> GreedyEvaluation:
        trainer = self.trainer
        reloaded = None
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as policy:
            ref_model = getattr(trainer, "ref_model", None)
            if ref_model is not None:
                base_model = trainer.accelerator.unwrap_model(ref_model)
            elif policy_is_base or hasattr(policy, "disable_adapter"):  # PEFT: scored with adapters disabled
                base_model = policy
            elif not trainer.is_deepspeed_enabled:
                reloaded = base_model = self._load_base(policy)
            else:
                base_model = None
            result = evaluate_greedy(
                policy,
                trainer.processing_class,
                self.dataset["prompt"],
                self.dataset[self.answer_column],
                checker=self.checker,
                base_model=base_model,
                max_new_tokens=self.max_new_tokens,
                stop_strings=getattr(trainer.args, "stop_strings", None),  # a few-shot run's own stop strings
            )
            sampled = [
                evaluate_sampled_accuracy(
                    policy,
                    trainer.processing_class,
                    self.dataset["prompt"],
                    self.dataset[self.answer_column],
                    num_samples=self.num_samples,
                    temperature=temperature,
                    checker=self.checker,
                    answer_extractor=self.answer_extractor,
                    max_new_tokens=self.max_new_tokens,
                    stop_strings=getattr(trainer.args, "stop_strings", None),
                    seed=self.seed,
                )
                for temperature in (self.temperatures if self.num_samples else [])
            ]
        self.sampled[label] = sampled
        del reloaded
        gc.collect()
        if PartialState().is_main_process:
            loglik = (
                ""
                if result.mean_base_logprob is None
                else f", mean log pi_base(greedy) {result.mean_base_logprob:.3f}"
            )
            length = getattr(result, "mean_length", None)
            length = "" if length is None else f", mean length {length:.1f} tokens"
            print(
                f"[{label}] greedy accuracy on {len(self.dataset)} {self.name} prompts: {result.accuracy:.3f}"
                f"{loglik}{length}",
                flush=True,
            )
            for metrics in sampled:
                k = metrics.num_samples
                print(
                    f"[{label}] policy samples at {metrics.label} on {len(self.dataset)} {self.name} prompts: "
                    f"avg@{k} {metrics.avg_at_k:.3f}, maj@{k} {metrics.maj_at_k:.3f}, pass@{k} {metrics.pass_at_k:.3f}",
                    flush=True,
                )
        return result

    def _load_base(self, policy):
        """pi_base from the policy's checkpoint path, loaded like the policy was, on its device."""
        path = get_config_model_id(policy.config)
        logger.info("Loading pi_base again from %s to score the greedy outputs under it (report only).", path)
        base = create_model_from_path(path, **(self.trainer.args.model_init_kwargs or {}))
        return base.to(policy.device).eval()
