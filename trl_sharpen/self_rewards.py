"""Named self-rewards: scores of a completion computed from the base model alone (Huang et al. 2025, Sec. 1.1, A.2).

Select one by name from Python or YAML (`self_reward: logprob`), or pass any callable:

| name                 | r(y|x)                                                                                      |
|----------------------|---------------------------------------------------------------------------------------------|
| `logprob`            | log pi_base(y|x), the paper's maximum-likelihood self-reward (Eq. 2)                         |
| `normalized_logprob` | log pi_base(y|x) / |y|, |y| in tokens (EOS included), which does not favour short answers  |
| `majority`           | fraction of this prompt's N samples whose extracted answer equals this sample's answer        |
|                      | (self-consistency, a sample estimate of sum over y' with y'_ans = y_ans of pi_base(y'|x))     |

| `self_certainty`     | mean over y's tokens of logsumexp(z) - mean(z), z the *current policy's* logits at T=1      |
|                      | (Intuitor; one no-grad policy forward per completion)                                       |
| `negative_entropy`   | minus the mean over y's tokens of the current policy's next-token entropy (RENT; same cost) |

The best way to train with them online is `SelfRewardGRPOTrainer` / `SelfRewardRLOOTrainer`
(`trl_sharpen.self_reward_rl_trainer`): they take log pi_base from TRL's own reference pass when it computes it
(beta > 0 at temperature 1: no extra forward), otherwise from one shared-prompt pass of pi_base (with PEFT: the
adapter-disabled policy, no copy), and vote `majority` over whole groups across processes.

Every self-reward is also a TRL reward function, `f(prompts, completions, completion_ids, **kwargs) -> list[float]`,
so it still plugs into TRL's own `GRPOTrainer(reward_funcs=[...])` or `RLOOTrainer`. Inside trl_sharpen the base
log-probabilities are passed in (`base_logprobs=`), usually for free from generation; as a TRL reward function,
`logprob` and `normalized_logprob` score with the `model` they were built with:

    >>> reward = get_self_reward("logprob", model=base_model, tokenizer=tokenizer)
    >>> trainer = GRPOTrainer(model=policy, reward_funcs=[reward], ...)

That costs a second full copy of the base model in memory and one extra forward per completion (even when TRL's
reference pass, beta > 0, already computed the same log-probs); the trainers above avoid both. Used this way,
`majority` gathers each step's completions from all processes before voting (TRL splits a prompt's group across
processes), so every call must be made on every process, as TRL's trainers do; `self_certainty` and
`negative_entropy` must be built with `model=` the policy being trained (the same object, not a copy).

A user callable follows TRL's protocol and may take `base_logprobs` (one float per completion) and `group_ids` (the
same id for completions of the same prompt) as keyword arguments; naming `base_logprobs` in its signature asks for them.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, is_peft_model

from .answers import AnswerExtractor, get_answer_extractor, load_callable
from .data import prompt_key, tokenize_prompt
from .logprobs import sequence_logprobs
from .sampling_arguments import MAJORITY_MIN_SAMPLES


logger = logging.getLogger(__name__)

SELF_REWARDS: dict[str, type[SelfReward]] = {}


def register_self_reward(name: str):
    """Class decorator adding a `SelfReward` subclass to the registry under `name`."""

    def decorator(cls):
        cls.name = name
        SELF_REWARDS[name] = cls
        return cls

    return decorator


def group_ids_of(prompts: Sequence) -> list[int]:
    """The same id for equal prompts, in order of first appearance."""
    ids: dict[str, int] = {}
    return [ids.setdefault(prompt_key(p), len(ids)) for p in prompts]


def base_scoring_context(model):
    """Score with pi_base: a plain model as it is; a PEFT model with its adapters disabled, or, when it holds TRL's
    frozen "ref" adapter (a given adapter being re-trained: DPO keeps a copy of it as the reference), with that one,
    as the trainers' own pi_base (evaluation scored the raw base there)."""
    if not is_peft_model(model):
        return contextlib.nullcontext()
    from trl.trainer.utils import use_adapter

    return use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)


class SelfReward:
    """A self-reward. Subclasses implement `score`; `__call__` is TRL's reward-function protocol."""

    name: str = "self_reward"
    # Whether `score` needs log pi_base(y|x) of each completion
    requires_base_logprobs: bool = False
    # Whether `score` needs the current policy's per-completion token statistics (`policy_statistics=` keyword:
    # {"self_certainty": [...], "entropy": [...]}, see trl_sharpen.policy_statistics)
    requires_policy_statistics: bool = False
    # Whether a completion's reward depends on the other completions of its prompt (then, called by TRL with no
    # `group_ids` on several processes, the completions are gathered from every process before scoring)
    group_level: bool = False

    def __init__(self, model=None, tokenizer=None, micro_batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size

    @property
    def __name__(self) -> str:  # TRL logs reward functions under their `__name__`
        return self.name

    def score(
        self,
        prompts: Sequence,
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        base_logprobs: Sequence[float] | None = None,
        group_ids: Sequence[int] | None = None,
        **kwargs,
    ) -> list[float]:
        raise NotImplementedError

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        base_logprobs = kwargs.pop("base_logprobs", None)
        group_ids = kwargs.pop("group_ids", None)
        if self.requires_base_logprobs and base_logprobs is None:
            base_logprobs = self.base_logprobs(prompts, completion_ids)
        if self.requires_policy_statistics and kwargs.get("policy_statistics") is None:
            kwargs["policy_statistics"] = self.policy_statistics(prompts, completion_ids)
        if isinstance(completions[0], list):  # conversational completions: score the assistant text
            completions = [c[-1]["content"] if c else "" for c in completions]
        if group_ids is None and self.group_level and PartialState().num_processes > 1:
            # Called by TRL's GRPOTrainer / RLOOTrainer, which may split a prompt's completions across processes
            return self._score_gathered(prompts, completions, completion_ids, base_logprobs, **kwargs)
        group_ids = group_ids or group_ids_of(prompts)
        rewards = self.score(prompts, completions, completion_ids, base_logprobs, group_ids, **kwargs)
        return check_rewards(self.name, rewards, len(completion_ids))

    def _score_gathered(self, prompts, completions, completion_ids, base_logprobs, **kwargs) -> list[float]:
        """Score this step's completions of all processes together (the same result on every process; each keeps its
        own rows). Equal prompts form one group, as on one process."""
        local = len(completion_ids)
        sizes = gather_object([local])
        offset = sum(sizes[: PartialState().process_index])
        columns = {
            "prompts": list(prompts),
            "completions": list(completions),
            "ids": [list(i) for i in completion_ids],
        }
        if base_logprobs is not None:
            columns["base"] = [float(v) for v in base_logprobs]
        for key, value in list(kwargs.items()):
            if isinstance(value, list) and len(value) == local:
                columns[f"kw:{key}"] = value
        gathered = {key: gather_object(value) for key, value in sorted(columns.items())}
        extra = {key: value for key, value in kwargs.items() if f"kw:{key}" not in columns and key != "log_extra"}
        extra.update({key[3:]: value for key, value in gathered.items() if key.startswith("kw:")})
        rewards = self.score(
            gathered["prompts"], gathered["completions"], gathered["ids"], gathered.get("base"),
            group_ids_of(gathered["prompts"]), **extra,
        )  # fmt: skip
        rewards = check_rewards(self.name, rewards, len(gathered["ids"]))
        return rewards[offset : offset + local]

    def policy_statistics(self, prompts, completion_ids) -> dict[str, list[float]]:
        if self.model is None or self.tokenizer is None:
            raise ValueError(
                f"The `{self.name}` self-reward reads the current policy's logits: as a TRL reward function build it "
                f"with get_self_reward({self.name!r}, model=policy, tokenizer=tokenizer), the model being trained "
                "(or use SelfRewardGRPOTrainer, which needs neither)."
            )
        from .policy_statistics import completion_token_statistics

        prompt_ids = [tokenize_prompt(self.tokenizer, p) for p in prompts]
        statistics = completion_token_statistics(
            self.model, prompt_ids, completion_ids, micro_batch_size=self.micro_batch_size
        )
        return {key: value.tolist() for key, value in statistics.items()}

    def base_logprobs(self, prompts, completion_ids) -> list[float]:
        if self.model is None or self.tokenizer is None:
            raise ValueError(
                f"The `{self.name}` self-reward needs the base model to score completions when it is used as a TRL "
                f"reward function: build it with get_self_reward({self.name!r}, model=base_model, "
                "tokenizer=tokenizer)."
            )
        prompt_ids = [tokenize_prompt(self.tokenizer, p) for p in prompts]
        with base_scoring_context(self.model):
            logprobs = sequence_logprobs(
                self.model, prompt_ids, completion_ids, micro_batch_size=self.micro_batch_size
            )
        return logprobs.tolist()


@register_self_reward("logprob")
class LogProbReward(SelfReward):
    """r(y|x) = log pi_base(y|x) (Huang et al. 2025, Eq. 2)."""

    requires_base_logprobs = True

    def score(self, prompts, completions, completion_ids, base_logprobs=None, group_ids=None, **kwargs):
        return [float(lp) for lp in base_logprobs]


@register_self_reward("normalized_logprob")
class NormalizedLogProbReward(SelfReward):
    """r(y|x) = log pi_base(y|x) / |y| with |y| in tokens (App. A.2): removes log-prob's bias to short answers."""

    requires_base_logprobs = True

    def score(self, prompts, completions, completion_ids, base_logprobs=None, group_ids=None, **kwargs):
        return [float(lp) / max(1, len(ids)) for lp, ids in zip(base_logprobs, completion_ids, strict=True)]


@register_self_reward("majority")
class MajorityReward(SelfReward):
    """Self-consistency: the share of this prompt's samples whose extracted answer equals this sample's (App. A.2).

    A sample without an extractable answer gets 0. When most samples have none (e.g. True/False answers under the
    default number extractor) every sample ties at 0 and Best-of-N keeps sample 0: that is warned about, once per
    reward, since it means the extractor does not fit the task. With 2 samples per prompt the votes always tie, so
    `best_of_n` refuses fewer than `min_samples`.
    """

    min_samples = MAJORITY_MIN_SAMPLES
    group_level = True

    def __init__(self, answer_extractor: str | AnswerExtractor | None = None, **kwargs):
        super().__init__(**kwargs)
        self.answer_extractor = get_answer_extractor(answer_extractor)
        self._warned_no_answer = False

    def score(self, prompts, completions, completion_ids, base_logprobs=None, group_ids=None, **kwargs):
        answers = [self.answer_extractor(text) for text in completions]
        missing = sum(answer is None for answer in answers)
        if 2 * missing > len(answers) and not self._warned_no_answer:
            self._warned_no_answer = True
            logger.warning(
                "majority self-reward: %d of %d completions (%.0f%%) have no answer, and each of them scores 0, so "
                "the selection among them is arbitrary (the first sample). Pass an answer extractor that fits the "
                "task (`answer_extractor='package.module:function'`).",
                missing,
                len(answers),
                100 * missing / len(answers),
            )
        votes = Counter((group, answer) for group, answer in zip(group_ids, answers, strict=True))
        group_sizes = Counter(group_ids)
        return [
            0.0 if answer is None else votes[(group, answer)] / group_sizes[group]
            for group, answer in zip(group_ids, answers, strict=True)
        ]


@register_self_reward("self_certainty")
class SelfCertaintyReward(SelfReward):
    """Intuitor's self-certainty (Zhao et al. 2025): the mean over y's tokens of logsumexp(z) - mean(z), z the current
    policy's next-token logits at temperature 1 (KL(U || pi(.|x, y_<t)) + log V). Higher: a more peaked policy.
    Costs one no-grad forward of the policy per completion."""

    requires_policy_statistics = True

    def score(self, prompts, completions, completion_ids, base_logprobs=None, group_ids=None, **kwargs):
        return [float(v) for v in kwargs["policy_statistics"]["self_certainty"]]


@register_self_reward("negative_entropy")
class NegativeEntropyReward(SelfReward):
    """RENT (Prabhudesai et al. 2025): minus the mean over y's tokens of the current policy's next-token entropy at
    temperature 1. Costs one no-grad forward of the policy per completion."""

    requires_policy_statistics = True

    def score(self, prompts, completions, completion_ids, base_logprobs=None, group_ids=None, **kwargs):
        return [-float(v) for v in kwargs["policy_statistics"]["entropy"]]


class CallableReward(SelfReward):
    """A user function following TRL's reward protocol; `base_logprobs` are passed when its signature names them."""

    def __init__(self, function: Callable, **kwargs):
        super().__init__(**kwargs)
        self.function = function
        self.name = getattr(function, "__name__", type(function).__name__)
        parameters = inspect.signature(function).parameters
        self.requires_base_logprobs = "base_logprobs" in parameters
        self.group_level = "group_ids" in parameters  # it reads the groups: gather them whole

    def score(self, prompts, completions, completion_ids, base_logprobs=None, group_ids=None, **kwargs):
        if base_logprobs is not None:
            kwargs["base_logprobs"] = list(base_logprobs)
        return self.function(
            prompts=prompts, completions=completions, completion_ids=completion_ids, group_ids=group_ids, **kwargs
        )


def get_self_reward(reward: str | Callable | SelfReward, **kwargs) -> SelfReward:
    """A self-reward from its registry name, a `"package.module:function"` path, or a callable.

    Keyword arguments (`model`, `tokenizer`, `answer_extractor`, ...) go to the reward's constructor; those it does not
    take are ignored, so callers can pass everything they have.
    """
    if isinstance(reward, SelfReward):
        return reward
    if isinstance(reward, str):
        if reward in SELF_REWARDS:
            cls = SELF_REWARDS[reward]
        elif ":" in reward:
            return CallableReward(load_callable(reward), **_accepted(CallableReward, kwargs))
        else:
            raise ValueError(
                f"Unknown self-reward {reward!r}. Valid names: {sorted(SELF_REWARDS)}; or pass a callable, or a "
                "'package.module:function' path to one."
            )
        return cls(**_accepted(cls, kwargs))
    if callable(reward):
        return CallableReward(reward, **_accepted(CallableReward, kwargs))
    raise ValueError(f"A self-reward must be a name, a callable or a SelfReward, got {type(reward).__name__}.")


def _accepted(cls, kwargs: dict) -> dict:
    names = set(inspect.signature(cls.__init__).parameters) | set(inspect.signature(SelfReward.__init__).parameters)
    return {k: v for k, v in kwargs.items() if k in names}


def check_rewards(name: str, rewards, expected: int) -> list[float]:
    """Rewards as floats, or a `ValueError` naming the reward when they have the wrong length or are not finite."""
    if isinstance(rewards, torch.Tensor):
        rewards = rewards.tolist()
    if rewards is None or len(rewards) != expected:
        got = "None" if rewards is None else f"{len(rewards)} values"
        raise ValueError(f"The self-reward `{name}` returned {got} for {expected} completions; expected one each.")
    out = []
    for index, value in enumerate(rewards):
        if value is None or not math.isfinite(float(value)):
            raise ValueError(
                f"The self-reward `{name}` returned {value!r} for completion {index}; rewards must be finite numbers."
            )
        out.append(float(value))
    return out


# A control, not a self-reward ----------------------------------------------------------------------------------------


@register_self_reward("random")
class RandomControlReward(SelfReward):
    """CONTROL ONLY, not a sharpening signal: a number drawn uniformly from [0, 1) for each completion, whatever it
    says. Training on it shows what the training procedure alone does to a model: the spurious-rewards literature
    (Shao et al. 2025, "Spurious Rewards: Rethinking Training Signals in RLVR") reports gains from random rewards on
    some models, so a sharpening claim must beat this control (`benchmarks/real_model_table.py` runs it). Seeded
    (`seed`, default 0): the same run draws the same rewards."""

    def __init__(self, seed: int = 0, **kwargs):
        import random

        super().__init__(**kwargs)
        self.generator = random.Random(seed)

    def score(self, prompts, completions, completion_ids, base_logprobs=None, group_ids=None, **kwargs):
        return [self.generator.random() for _ in completion_ids]
