"""Configuration of `SelfRewardDPOTrainer`: TRL's `DPOConfig` plus the online sampling and self-reward fields."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from trl import DPOConfig

from .errors import check_output_dir, check_resume_from_checkpoint
from .monitoring import MonitoringArguments
from .pairs import TIE_HANDLING
from .sampling_arguments import GenerationArguments, SamplingArguments, check_require_answer, field_like


SHARPEN_LOSS = "sharpen"
SAMPLE_FROM = ("policy", "base")
# TRL 1.16's DPO losses (the branches of `DPOTrainer`'s loss; tests/test_bad_inputs.py checks them against its
# `loss_type` help), plus the paper's regression. Checked when the config is built, not at the first step.
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", SHARPEN_LOSS,
)  # fmt: skip


@dataclass
class SelfRewardDPOConfig(MonitoringArguments, DPOConfig, GenerationArguments):
    r"""Configuration for [`SelfRewardDPOTrainer`]: RLHF-Sharpening (Huang et al. 2025, Sec. 2.2 / 4.2) in online
    DPO form. The method, Eq. 8 (`loss_type="sharpen"`) and the paper's setting against the default are described
    once, in [`SelfRewardDPOTrainer`].

    Every field of `trl.DPOConfig` keeps its meaning, except those that assume a fixed offline dataset:
    `precompute_ref_log_probs` (the pairs are new every step; the reference log-probs are computed with them) and
    `ld_alpha` (its length-desensitised reference would need a second reference pass) are refused. `temperature`,
    `top_p` and `top_k` are `trl_sharpen.sampling_arguments.GenerationArguments`'; the `eval_*` monitoring fields are
    `trl_sharpen.monitoring.MonitoringArguments`'.

    Parameters:
        > Parameters that control the setting

        preset (`str` or `None`, *optional*, defaults to `None`):
            `"paper"`: the paper's setting, for which its optimum pi_base^(1+1/beta) holds: `loss_type="sharpen"`,
            `sample_from="base"`, `self_reward="logprob"`, `num_generations=2`. A field given another non-default
            value is refused.

        > Parameters that control the sampling

        num_generations (`int`, *optional*, defaults to `2`):
            Completions sampled per prompt and step (k >= 2); each prompt gives one pair. The paper's analysis uses 2.
        sample_from (`str`, *optional*, defaults to `"policy"`):
            `"policy"` (online DPO) or `"base"` (pi_base; their log pi_base(y|x) come free with generation).
        max_completion_length (`int`, *optional*, defaults to `512`):
            Maximum sampled tokens per completion; a completion that reaches it without EOS is truncated. Prompts
            longer than the model's context (and `max_length`) less this are dropped.
        generation_kwargs (`dict[str, Any]` or `None`, *optional*, defaults to `None`):
            Extra `transformers.GenerationConfig` arguments; the checkpoint's own generation defaults are not used.
        ds3_gather_for_generation (`bool`, *optional*, defaults to `True`):
            Under ZeRO-3, gather the policy's weights for generation (False: generate with sharded weights).

        > Parameters that control the self-reward and the pairs

        self_reward (`str` or callable, *optional*, defaults to `"logprob"`):
            `"logprob"` (log pi_base(y|x)), `"normalized_logprob"`, `"majority"` (needs `num_generations >= 3`), a
            `"package.module:function"` path, or a callable with TRL's reward-function protocol.
        answer_extractor (`str` or `None`, *optional*, defaults to `None`):
            For `"majority"`: `"package.module:function"` extracting the final answer.
        require_answer (`bool` or `None`, *optional*, defaults to `None`):
            Answer gating: a sample with no extractable answer (or a truncated one) is never the chosen side of a
            pair against a complete sample with one. None: on exactly when `answer_extractor` is set.
        missing_eos_penalty (`float` or `None`, *optional*, defaults to `None`):
            Subtracted from the self-reward of truncated completions (as in TRL's Online DPO).
        ties (`str`, *optional*, defaults to `"skip"`):
            A pair whose rewards are equal within `tie_tolerance` (or whose samples are identical): `"skip"` drops
            it (counted in `self_reward/ties_skipped`), `"keep"` trains on it.
        tie_tolerance (`float`, *optional*, defaults to `1e-4`):
            Rewards closer than this count as equal.
        scoring_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Sequences per micro-batch of the pi_base scoring pass (None: one forward).
        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            Keep the dataset's extra columns, passed to a callable self-reward as keyword arguments.

        > Parameters beyond the paper and logging

        reanchor_steps (`int`, *optional*, defaults to `0`):
            Every M steps copy the policy into pi_base (TRL's `SyncRefModelCallback`); 0 disables it. Not with PEFT.
        log_completions (`bool`, *optional*, defaults to `False`):
            Log the trained pairs with their self-rewards every `logging_steps` (rich, wandb, tensorboard).
        num_completions_to_print (`int` or `None`, *optional*, defaults to `None`):
            Pairs printed per log (None: all).
    """

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS + ["generation_kwargs"]

    # Parameters whose default values differ from DPOConfig
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Keep the dataset's extra columns (e.g. `answer`): like TRL's GRPO, they are passed to a callable "
            "self-reward as keyword arguments, repeated for each completion."
        },
    )

    sharpen_huber_delta: float | None = field(
        default=None,
        metadata={
            "help": "Eq. 8 (`loss_type: sharpen`) with the residual's square replaced beyond this many nats by its "
            "tangent (Huber: r^2 for |r| <= delta, 2 delta |r| - delta^2 beyond), so one pair far off (a policy "
            "sample pi_base rates hundreds of nats lower) cannot dominate the step. The minimizer is unchanged where "
            "Eq. 8 can reach zero residual (its optimum pi_base^(1+1/beta)). null: the paper's squared loss."
        },
    )

    # Sampling
    num_generations: int = field(
        default=2,
        metadata={
            "help": "Completions sampled per prompt and step (k >= 2); the pair is (highest, lowest self-reward). The "
            "paper's RLHF-Sharpening analysis uses 2 (Huang et al. 2025, Thm. 4.2)."
        },
    )
    sample_from: str = field(
        default="policy",
        metadata={
            "help": "`policy`: sample from the current policy (online DPO). `base`: sample from pi_base, as in the "
            "paper's Eq. 8; their log pi_base(y|x) then come free with generation, so no reference forward is needed "
            "for the `logprob` self-reward. pi_base is the reference model, or the adapter-disabled model with PEFT.",
            "choices": list(SAMPLE_FROM),
        },
    )
    # temperature, top_p, top_k, max_completion_length: GenerationArguments (trl_sharpen.sampling_arguments)
    max_completion_length: int = field_like(GenerationArguments, "max_completion_length", default=512)
    generation_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Extra `transformers.GenerationConfig` arguments (e.g. `repetition_penalty`). The checkpoint's "
            "own generation defaults are never used, so sampling follows only these fields."
        },
    )
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={
            "help": "Under DeepSpeed ZeRO-3, gather the policy's weights for generation (fast, needs the full model "
            "in memory); False generates with sharded weights (slow, memory-lean). Same as TRL's GRPO/Online DPO."
        },
    )

    # Self-reward and pairs
    self_reward: str = field(
        default="logprob",
        metadata={
            "help": "Self-reward r(y|x): a registry name (`logprob` = log pi_base(y|x), Eq. 2, which reuses the "
            "reference forward DPO needs anyway; `normalized_logprob`; `majority`), a 'package.module:function' "
            "path, or (from Python) a callable following TRL's reward-function protocol."
        },
    )
    answer_extractor: str | None = field_like(SamplingArguments, "answer_extractor", default=None)
    require_answer: bool | None = field_like(SamplingArguments, "require_answer", default=None)
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={
            "help": "Subtracted from the self-reward of completions that hit `max_completion_length` without an EOS "
            "token (as in TRL's Online DPO). Unset: no penalty."
        },
    )
    ties: str = field(
        default="skip",
        metadata={
            "help": "What to do when a prompt's highest and lowest self-reward are equal (within `tie_tolerance`), "
            "e.g. identical samples: `skip` drops the pair and counts it in `self_reward/ties_skipped`; `keep` "
            "trains on it in sampled order.",
            "choices": list(TIE_HANDLING),
        },
    )
    tie_tolerance: float = field(
        default=1e-4,
        metadata={
            "help": "Rewards closer than this count as equal (identical samples scored in different micro-batches "
            "can differ by float round-off)."
        },
    )
    scoring_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Sequences per micro-batch of the reference (pi_base) scoring pass; unset: all the step's samples "
            "in one forward."
        },
    )

    preset: str | None = field(
        default=None,
        metadata={
            "help": "`paper`: the paper's RLHF-Sharpening setting, for which its optimum pi_base^(1+1/beta) holds: "
            "loss_type=sharpen (Eq. 8), sample_from=base, self_reward=logprob, num_generations=2 (for XPOConfig: "
            "loss_type=sharpen, self_reward=logprob and replay of all of Algorithm 1's D, replay_buffer_size=-1). A "
            "field set to a value other than its default and the preset's is refused. Unset: the fields as given.",
            "choices": ["paper"],
        },
    )

    # Iterative variant: an extension beyond the paper
    reanchor_steps: int = field(
        default=0,
        metadata={
            "help": "EXTENSION BEYOND THE PAPER (off by default): every M steps, copy the policy into pi_base, so the "
            "reference AND the log-prob self-reward (and `sample_from=base` sampling) re-anchor to the current "
            "policy. Uses TRL's SyncRefModelCallback (sync_ref_model, ref_model_mixup_alpha=1, "
            "ref_model_sync_steps=M). Not available with PEFT, whose pi_base is the adapter-disabled model. 0 "
            "disables it."
        },
    )

    # Logging
    log_completions: bool = field(
        default=False,
        metadata={
            "help": "Log the (prompt, chosen, rejected) pairs with their self-rewards every `logging_steps`: printed "
            "with rich when installed, and as a `completions` table to wandb when it is a `report_to` backend."
        },
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "Pairs printed with rich per log; unset: all."}
    )

    # The paper's setting, selected by `preset="paper"` (XPOConfig names its own)
    _PAPER_PRESET = {
        "loss_type": [SHARPEN_LOSS],
        "sample_from": "base",
        "self_reward": "logprob",
        "num_generations": 2,
    }

    def __post_init__(self):
        if self.preset is not None:
            self._apply_preset()
        super().__post_init__()  # turns a single `loss_type` string into a list
        # temperature > 0, top_p in (0, 1], top_k >= 0, ...: the checks every sampling entry point shares
        GenerationArguments.__post_init__(self)
        check_require_answer(self.require_answer, self.answer_extractor)
        if self.stop_strings:
            raise ValueError(
                f"stop_strings={self.stop_strings!r} is not supported by the DPO and XPO trainers: their samples end "
                "at EOS or max_completion_length. Unset stop_strings."
            )
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta > 0:
            raise ValueError(
                f"beta must be > 0, got {self.beta!r}. beta weighs the KL to pi_base: 0 leaves the policy "
                "unanchored and a negative beta rewards moving away from pi_base. Use e.g. 0.1 (TRL's default)."
            )
        unknown = [loss for loss in self.loss_type if loss not in DPO_LOSS_TYPES]
        if unknown:
            raise ValueError(
                f"loss_type {unknown[0]!r} is unknown; use one of {list(DPO_LOSS_TYPES)} (several combine with "
                "loss_weights)."
            )
        check_resume_from_checkpoint(self.resume_from_checkpoint)
        check_output_dir(self.output_dir)
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations}: sharpening ranks at least 2 completions per prompt, so "
                "num_generations must be >= 2."
            )
        if self.self_reward == "majority" and self.num_generations < 3:
            raise ValueError(
                f"self_reward='majority' with num_generations={self.num_generations}: the two samples of a prompt "
                "always tie under a majority vote (each answer has one vote), so every pair would be skipped. Use "
                "num_generations >= 3 (XPO pairs only 2 samples: use another self_reward)."
            )
        if self.sample_from not in SAMPLE_FROM:
            raise ValueError(f"sample_from={self.sample_from!r}; expected one of {list(SAMPLE_FROM)}.")
        if self.ties not in TIE_HANDLING:
            raise ValueError(f"ties={self.ties!r}; expected one of {list(TIE_HANDLING)}.")
        if self.tie_tolerance < 0:
            raise ValueError(f"tie_tolerance={self.tie_tolerance} must be >= 0.")
        if self.max_length is not None and self.max_length <= self.max_completion_length:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for a prompt next to "
                f"max_completion_length={self.max_completion_length}; raise max_length or set it to null."
            )
        if self.scoring_batch_size is not None and self.scoring_batch_size < 1:
            raise ValueError(f"scoring_batch_size={self.scoring_batch_size} must be >= 1 or unset.")
        if self.precompute_ref_log_probs:
            raise ValueError(
                "precompute_ref_log_probs=True does not apply: the pairs are sampled anew every step, and their "
                "reference log-probs are computed with them (once, shared with the log-prob self-reward)."
            )
        if self.ld_alpha is not None:
            raise ValueError(
                f"ld_alpha={self.ld_alpha} is not supported: LD-DPO's length-desensitised reference log-probs would "
                "need a second reference pass next to the self-reward's plain log pi_base(y|x)."
            )
        if self.sharpen_huber_delta is not None and not (
            isinstance(self.sharpen_huber_delta, (int, float))
            and not isinstance(self.sharpen_huber_delta, bool)
            and self.sharpen_huber_delta > 0
        ):
            raise ValueError(
                f"sharpen_huber_delta must be > 0 (nats) or null, got {self.sharpen_huber_delta!r}. null keeps the "
                "paper's squared residual."
            )
        if SHARPEN_LOSS in self.loss_type and self.f_divergence_type != "reverse_kl":
            raise ValueError(
                f"loss_type 'sharpen' is the paper's regression on log-ratios (reverse KL); f_divergence_type="
                f"{self.f_divergence_type!r} is not supported with it."
            )
        if self.reanchor_steps < 0:
            raise ValueError(f"reanchor_steps={self.reanchor_steps} must be >= 0 (0 disables re-anchoring).")
        if self.reanchor_steps:
            if self.sync_ref_model and (
                self.ref_model_mixup_alpha != 1.0 or self.ref_model_sync_steps != self.reanchor_steps
            ):
                raise ValueError(
                    f"reanchor_steps={self.reanchor_steps} sets sync_ref_model with ref_model_mixup_alpha=1.0 and "
                    f"ref_model_sync_steps={self.reanchor_steps}, but you also set ref_model_mixup_alpha="
                    f"{self.ref_model_mixup_alpha}, ref_model_sync_steps={self.ref_model_sync_steps}. Use one or the "
                    "other."
                )
            self.sync_ref_model = True
            self.ref_model_mixup_alpha = 1.0
            self.ref_model_sync_steps = self.reanchor_steps

    def _apply_preset(self) -> None:
        if self.preset != "paper":
            raise ValueError(f"preset={self.preset!r}; expected 'paper' or unset.")
        defaults = {f.name: f.default_factory() if callable(f.default_factory) else f.default for f in fields(self)}
        for name, value in self._PAPER_PRESET.items():
            current = [getattr(self, name)] if name == "loss_type" and isinstance(getattr(self, name), str) else None
            current = getattr(self, name) if current is None else current
            if current not in (value, defaults[name]):
                raise ValueError(
                    f"preset='paper' sets {name}={value!r}, but {name}={current!r} was given: drop one of the two."
                )
            setattr(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        # A callable self-reward is not JSON-serialisable (logging integrations dump the config as JSON)
        output = super().to_dict()
        if callable(output.get("self_reward")):
            output["self_reward"] = getattr(self.self_reward, "__name__", type(self.self_reward).__name__)
        return output
