"""Configuration of `XPOTrainer`: `SelfRewardDPOConfig` plus the exploration bonus and the replay buffer."""

from __future__ import annotations

from dataclasses import dataclass, field

from .self_reward_dpo_config import SHARPEN_LOSS, SelfRewardDPOConfig


@dataclass
class XPOConfig(SelfRewardDPOConfig):
    r"""Configuration for [`XPOTrainer`]: sharpening with an exploration bonus (Huang et al. 2025, Sec. 4.2.2,
    Algorithm 1; adapted from XPO, Xie et al. 2024, arXiv 2405.21046). Algorithm 1 and how the defaults differ from
    it are described once, in [`XPOTrainer`].

    Every other field of [`SelfRewardDPOConfig`] keeps its meaning, except that the pair is always (policy sample,
    base sample): `num_generations` is 2, `sample_from` is `policy` and ties are kept (`ties="keep"`; a tie puts y
    first). `preset="paper"` sets `loss_type="sharpen"`, `self_reward="logprob"` and `replay_buffer_size=-1`.

    Parameters:
        loss_type (`list[str]`, *optional*, defaults to `["sharpen"]`):
            `"sharpen"`: Algorithm 1's squared regression; any TRL DPO loss type gives the preference form of TRL's
            former XPO.
        ties (`str`, *optional*, defaults to `"keep"`):
            Only `"keep"`: XPO trains on every (y, y~) pair.
        alpha (`float` or `list[float]`, *optional*, defaults to `[1e-5]`):
            Weight >= 0 of the exploration bonus alpha * mean log pi(y~|x); one value, or one per epoch (the last
            value once the list runs out).
        replay_buffer_size (`int`, *optional*, defaults to `0`):
            Triples of earlier steps replayed in each training micro-batch (Algorithm 1's growing D, capped, per
            process): -1 keeps all of D, 0 only the current batch.
    """

    # Parameters whose default values differ from SelfRewardDPOConfig
    loss_type: list[str] = field(
        default_factory=lambda: [SHARPEN_LOSS],
        metadata={
            "help": "`sharpen`: the paper's squared regression on self-reward differences (Algorithm 1). Any TRL DPO "
            "loss type (`sigmoid`, `ipo`, ...) gives the preference form of TRL's former XPOTrainer. Several types "
            "are combined with `loss_weights`."
        },
    )
    ties: str = field(
        default="keep",
        metadata={
            "help": "XPO trains on every (y, y~) pair (Algorithm 1 sums over all triples, and the bonus needs every "
            "y~): only `keep` is accepted. A tie puts the policy sample y in the chosen slot, as TRL's XPO did."
        },
    )

    # Exploration
    alpha: list[float] = field(
        default_factory=lambda: [1e-5],
        metadata={
            "help": "Weight alpha >= 0 of the exploration bonus alpha * mean log pi(y~|x) over base samples y~ "
            "(Algorithm 1; the paper's Thm. 4.3 sets it from beta, R_max and SEC, no numeric default). One value, or "
            "one per epoch: after the list runs out its last value is used, as in TRL's former XPOConfig (default "
            "1e-5, also TRL's)."
        },
    )
    replay_buffer_size: int = field(
        default=0,
        metadata={
            "help": "Triples (x, y, y~) from earlier steps that each training micro-batch also trains on, with "
            "their stored rewards and pi_base log-probs (nothing recomputed but the policy's log-probs): the growing "
            "dataset D of Algorithm 1, capped at this many (oldest dropped first), per process. -1: all of D "
            "(Algorithm 1; each step's forward grows with the number of steps). 0 (default): current batch only."
        },
    )

    _PAPER_PRESET = {"loss_type": [SHARPEN_LOSS], "self_reward": "logprob", "replay_buffer_size": -1}

    def __post_init__(self):
        if isinstance(self.alpha, (int, float)):
            self.alpha = [self.alpha]
        self.alpha = [float(value) for value in self.alpha]
        if not self.alpha:
            raise ValueError("alpha=[] is empty: give one value, or one per epoch.")
        if any(value < 0 for value in self.alpha):
            raise ValueError(
                f"alpha={self.alpha}: the exploration bonus weight must be >= 0 (0 turns XPO into the paper's Eq. 8 "
                "regression on policy/base pairs)."
            )
        super().__post_init__()  # applies `preset`
        if self.replay_buffer_size < -1:
            raise ValueError(
                f"replay_buffer_size={self.replay_buffer_size} must be >= -1 (-1: all of D, 0: current batch only)."
            )
        if self.num_generations != 2:
            raise ValueError(
                f"num_generations={self.num_generations}: XPO samples exactly one completion from the policy and one "
                "from pi_base per prompt (Algorithm 1), so num_generations must be 2."
            )
        if self.sample_from != "policy":
            raise ValueError(
                f"sample_from={self.sample_from!r}: XPO always pairs a policy sample y with a pi_base sample y~; "
                "leave sample_from='policy'."
            )
        if self.ties != "keep":
            raise ValueError(
                f"ties={self.ties!r}: XPO trains on every (y, y~) pair (the bonus needs every y~); use ties='keep'."
            )
        if self.replay_buffer_size and self.reanchor_steps:
            raise ValueError(
                f"replay_buffer_size={self.replay_buffer_size} with reanchor_steps={self.reanchor_steps}: replayed "
                "triples keep the rewards and pi_base log-probs of the pi_base they were collected under, which "
                "re-anchoring replaces. Use one or the other."
            )

    def alpha_at_epoch(self, epoch: int) -> float:
        """alpha for 0-based `epoch`: the list's entry, or its last value once the list has run out (as TRL did)."""
        return self.alpha[min(epoch, len(self.alpha) - 1)]
