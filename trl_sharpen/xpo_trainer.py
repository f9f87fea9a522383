r"""`XPOTrainer`: sharpening with an exploration bonus (Huang et al. 2025, Sec. 4.2.2, Algorithm 1; after XPO, Xie et
al. 2024), built on `SelfRewardDPOTrainer`. Algorithm 1, and how the defaults differ from it, are stated once, in the
class docstring.

What is reused from the parent, per step: `_generate` draws y from the policy and y~ from pi_base (the reference
model, gathered under ZeRO-3, or the adapter-disabled policy with PEFT), which records log pi_base(y~|x) for free;
one pi_base pass (`_base_logprobs`) scores the y; `_self_rewards` scores both; `_pair_batch` builds DPO's batch with
the base log-probs as reference log-probs; the parent's `compute_loss` runs DPO's loss (any loss type) and its
`_auxiliary_loss` the regression (`loss_type="sharpen"`), from one policy forward whose log-probs also give the bonus.

The replay buffer is Algorithm 1's growing dataset D: triples keep their token ids, rewards and pi_base log-probs, so
a replayed triple costs only its share of the policy forward/backward.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import textwrap

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoints import check_resume_checkpoint
from .generation import Completions
from .pairs import select_pairs
from .paper import SHARPENING_PAPER
from .self_reward_dpo_trainer import SelfRewardDPOTrainer
from .xpo_config import XPOConfig


logger = logging.getLogger(__name__)

# docstyle-ignore
XPO_CITATION = textwrap.dedent("""\
    @article{xie2024exploratory,
        title        = {{Exploratory Preference Optimization: Harnessing Implicit Q*-Approximation for Sample-Efficient RLHF}},
        author       = {Tengyang Xie and Dylan J. Foster and Akshay Krishnamurthy and Corby Rosset and Ahmed Awadallah and Alexander Rakhlin},
        year         = 2024,
        eprint       = {arXiv:2405.21046},
    }""")

# Fields of a stored triple, in chosen/rejected orientation (what `_pair_batch` takes)
_FLOAT_FIELDS = ("ref_chosen", "ref_rejected", "r_chosen", "r_rejected")
_TRIPLE_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids", *_FLOAT_FIELDS, "base_is_chosen")


def replay_buffer_file(checkpoint_dir: str, process_index: int) -> str:
    return os.path.join(checkpoint_dir, f"xpo_replay_buffer_{process_index}.pt")


class XPOTrainer(SelfRewardDPOTrainer):
    r"""Sharpening with exploration (Huang et al. 2025, Sec. 4.2.2, Algorithm 1; XPO, Xie et al. 2024) as a drop-in
    `trl.DPOTrainer`: same keyword signature, prompt-only `train_dataset`, an [`XPOConfig`].

    Algorithm 1: at iteration t, for each prompt x draw y ~ pi_t (the policy) and y~ ~ pi_base, with
    r(x, y) = log pi_base(y|x) (the self-reward), add the triple (x, y, y~) to the dataset D, and set pi_{t+1} to the
    minimizer over D of (the "+" sign of the proof's empirical loss, App. J.2.2; the extracted Algorithm 1 text
    shows "-")

    $$\alpha \sum_D \log \pi(\tilde y|x) + \sum_D \big(\beta \log\tfrac{\pi(y|x)}{\pi_{base}(y|x)}
    - \beta \log\tfrac{\pi(\tilde y|x)}{\pi_{base}(\tilde y|x)} - (r(x,y) - r(x,\tilde y))\big)^2;$$

    it returns the iterate argmax_t J_beta(pi_t). The first term is the optimism bonus: it pushes probability away
    from what pi_base already samples, which frees XPO from the coverage coefficient C_cov that SFT-Sharpening pays
    for (Thm. 4.3 vs Thm. 4.1). Each training step here is one gradient step on that loss, averaged over the step's
    triples and the replayed ones; the regression is `loss_type="sharpen"` (default), and any TRL DPO loss on
    (chosen, rejected) = (y, y~) ranked complete-first, then by r, gives the preference form of TRL's former XPO
    (a tie puts y first; see `trl_sharpen.pairs`).

    How the defaults differ from Algorithm 1, and how to get it exactly:

    - D: by default (`replay_buffer_size=0`) a step trains on its own triples only, TRL's on-policy XPO. Algorithm 1's
      D keeps every triple: `replay_buffer_size=-1` (or `preset="paper"`) replays all of D each step. The step's
      forward then grows with the step count (a run's cost is quadratic in its length), which is why it is not the
      default; `replay_buffer_size=M` keeps the last M triples. Replayed triples keep their ids, rewards and pi_base
      log-probs: only the policy's log-probs are recomputed.
    - The returned iterate: the Trainer returns the last one. For Algorithm 1's argmax_t J_beta(pi_t), give a prompt
      `eval_dataset` with `metric_for_best_model: objective` and `load_best_model_at_end: true` (J_beta is estimated
      by `trainer.evaluate()` as `eval_objective`; see `trl_sharpen.monitoring`).
    - alpha: the paper sets it from constants unknown in practice (Thm. 4.3); the default is TRL's 1e-5.

    Metrics, besides the parent's (`self_reward/*`, `completions/*`) and DPO's (`rewards/*`, `logps/*`):
    `xpo/bonus` (alpha * mean log pi(y~|x), the bonus term of the loss), `xpo/alpha`, `logps/base_samples` (mean
    log pi(y~|x) under the policy), `self_reward/policy_samples` and `self_reward/base_samples` (mean self-reward of
    the step's y and y~), `xpo/replayed` (stored triples replayed per micro-batch and process), and with the regression
    `self_reward/sharpen_loss`.
    """

    _tag_names = ["trl", "trl-sharpen", "xpo"]
    _name = "XPO (sharpening with exploration)"
    # The model card has one paper slot: the sharpening paper, with XPO's citation next to it
    _paper = {**SHARPENING_PAPER, "citation": SHARPENING_PAPER["citation"] + "\n\n" + XPO_CITATION}
    _config_class = XPOConfig

    _alpha_ran_out_warned = False

    @functools.cached_property
    def replay_buffer(self) -> collections.deque[tuple]:
        """Triples of earlier steps (this process's), each a tuple of `_TRIPLE_FIELDS`; -1: unbounded (all of D)."""
        size = self.args.replay_buffer_size
        return collections.deque(maxlen=None if size == -1 else size)

    def _save_checkpoint(self, model, trial):
        # Each process's replay buffer goes into the checkpoint folder, next to its RNG state
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(list(self.replay_buffer), replay_buffer_file(folder, self.args.process_index))

    def extra_checkpoint_files(self, checkpoint_dir) -> list[str]:
        """What a resumed run needs beyond the Trainer's files (checked by `trl_sharpen.checkpoints`): this process's
        replay buffer, when there is one."""
        if not self.args.replay_buffer_size:
            return []
        return [os.path.basename(replay_buffer_file(str(checkpoint_dir), self.args.process_index))]

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        # Resuming restores this process's replay buffer from the checkpoint (saved by `_save_checkpoint`); a
        # checkpoint without it is refused (`check_resume_checkpoint`), `true` is the last checkpoint in output_dir
        checkpoint = check_resume_checkpoint(self, resume_from_checkpoint)
        if isinstance(checkpoint, str) and os.path.exists(replay_buffer_file(checkpoint, self.args.process_index)):
            stored = torch.load(replay_buffer_file(checkpoint, self.args.process_index), weights_only=False)
            self.replay_buffer.clear()
            self.replay_buffer.extend(stored)
        return super().train(checkpoint, trial, ignore_keys_for_eval)

    # ----------------------------------------------------------------------------------------- per-step pairs
    def _prepare_inputs(self, inputs):
        """Sample y ~ pi and y~ ~ pi_base per prompt, score both, and return DPO's pair batch (Algorithm 1), with
        the replay buffer's stored triples appended during training."""
        if "input_ids" in inputs:  # already a pair batch
            return inputs
        prompt_ids = inputs["prompt_ids"]
        policy = self._generate(prompt_ids, 1, from_base=False)
        base = self._generate(prompt_ids, 1, from_base=True)  # records log pi_base(y~|x) while sampling
        # The parent's k = 2 layout (prompt i: y at 2i, y~ at 2i + 1), so grouped self-rewards (majority) see both
        samples = Completions(
            prompt_index=[i for i in range(len(prompt_ids)) for _ in range(2)],
            completion_ids=[ids for pair in zip(policy.completion_ids, base.completion_ids) for ids in pair],
            logprobs=None,
            truncated=[flag for pair in zip(policy.truncated, base.truncated) for flag in pair],
        )
        base_logps = torch.stack(
            [self._base_logprobs(prompt_ids, policy.completion_ids), torch.tensor(base.logprobs)], dim=1
        )
        rewards = self._self_rewards(inputs, samples, base_logps.flatten()).view(-1, 2)
        # The parent's pair order: a truncated sample is never chosen over a complete one, then the higher reward;
        # a tie keeps y in the chosen slot, as TRL's XPO did. Every pair is kept (`ties="keep"`).
        selection = select_pairs(
            rewards.flatten().tolist(),
            2,
            truncated=samples.truncated,
            ties="keep",
            has_answer=self._answer_flags(samples),  # answer gating: no answer is never chosen over an answer
        )
        chosen, rejected = (torch.tensor(indices) for indices in selection.batch_pairs)
        base_is_chosen = chosen % 2 == 1
        self._log_samples(inputs, samples, rewards.flatten(), selection)
        self._log_xpo_samples(rewards)

        base_logps, rewards = base_logps.flatten(), rewards.flatten()
        fresh = list(
            zip(
                prompt_ids,
                [samples.completion_ids[i] for i in chosen.tolist()],
                [samples.completion_ids[i] for i in rejected.tolist()],
                base_logps[chosen].tolist(),
                base_logps[rejected].tolist(),
                rewards[chosen].tolist(),
                rewards[rejected].tolist(),
                base_is_chosen.tolist(),
            )
        )
        replayed = []
        if self.model.training:  # evaluation neither replays nor stores
            replayed = list(self.replay_buffer)
            self.replay_buffer.extend(fresh)
            self._metrics["train"]["xpo/replayed"].append(float(len(replayed)))

        columns = dict(zip(_TRIPLE_FIELDS, zip(*(fresh + replayed), strict=True), strict=True))
        floats = {key: torch.tensor(columns[key], dtype=torch.float32) for key in _FLOAT_FIELDS}
        return self._pair_batch(
            list(columns["prompt_ids"]),
            list(columns["chosen_ids"]),
            list(columns["rejected_ids"]),
            floats["ref_chosen"],  # log pi_base of the chosen / rejected sample: DPO's reference log-probs
            floats["ref_rejected"],
            chosen_rewards=floats["r_chosen"],
            rejected_rewards=floats["r_rejected"],
            base_is_chosen=torch.tensor(columns["base_is_chosen"]),
        )

    # -------------------------------------------------------------------------------------------------- loss
    def _auxiliary_loss(self, chosen_logps, rejected_logps, inputs, extras):
        r"""The parent's regression (with `"sharpen"`), plus the exploration bonus alpha * mean log pi(y~|x)."""
        loss = super()._auxiliary_loss(chosen_logps, rejected_logps, inputs, extras)
        base_sample_logps = torch.where(extras["base_is_chosen"], chosen_logps, rejected_logps)
        alpha = self._current_alpha()
        bonus = alpha * base_sample_logps.mean()
        mode = "train" if self.model.training else "eval"
        gathered = self.accelerator.gather(torch.stack([bonus.detach(), base_sample_logps.detach().mean()]))
        bonus_mean, logps_mean = gathered.view(-1, 2).mean(dim=0).tolist()
        self._metrics[mode]["xpo/bonus"].append(bonus_mean)
        self._metrics[mode]["logps/base_samples"].append(logps_mean)
        self._metrics[mode]["xpo/alpha"].append(alpha)
        return loss + bonus

    def _current_alpha(self) -> float:
        # `state.epoch` is the fractional progress set after each step: its integer part is the running epoch
        epoch = int(self.state.epoch or 0)
        if epoch >= len(self.args.alpha) > 1 and not self._alpha_ran_out_warned:
            logger.warning(
                "alpha has %d values (one per epoch) but epoch %d has begun: using the last one, %g, from now on "
                "(as TRL's XPO did).",
                len(self.args.alpha),
                epoch + 1,
                self.args.alpha[-1],
            )
            self._alpha_ran_out_warned = True
        return self.args.alpha_at_epoch(epoch)

    # ----------------------------------------------------------------------------------------------- logging
    def _log_xpo_samples(self, rewards: torch.Tensor) -> None:
        """Mean self-reward of the step's policy samples y and base samples y~ (`rewards`: one row per prompt)."""
        mode = "train" if self.model.training else "eval"
        local = torch.tensor([*rewards.sum(dim=0).tolist(), len(rewards)], dtype=torch.float64)
        gathered = self.accelerator.gather(local.to(self.accelerator.device)).view(-1, 3).sum(dim=0).tolist()
        self._metrics[mode]["self_reward/policy_samples"].append(gathered[0] / gathered[2])
        self._metrics[mode]["self_reward/base_samples"].append(gathered[1] / gathered[2])
