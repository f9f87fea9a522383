"""Sample tables (prompts, completions, self-rewards) sent to the trainers' `report_to` integrations.

TRL's online trainers print such a table to the console (rich) and log it to wandb; with tensorboard, the most common
offline choice, they log nothing. `log_table` sends one to every integration of `report_to` that can show a table:
wandb (`wandb.Table`) and tensorboard (a markdown table in the TEXT tab, one per logging step).
"""

from __future__ import annotations


def _tensorboard_writer(trainer):
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            return callback.tb_writer
    return None


def markdown_table(columns: dict[str, list]) -> str:
    def cell(value) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "<br>")

    rows = [" | ".join(columns), " | ".join("---" for _ in columns)]
    rows += [" | ".join(map(cell, row)) for row in zip(*columns.values())]
    return "\n".join(rows)


def log_table(trainer, name: str, columns: dict[str, list]) -> None:
    """Log `columns` (equal-length lists) as table `name` at the trainer's global step; call on the main process."""
    report_to = trainer.args.report_to or []
    step = trainer.state.global_step
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            rows = [[step, *map(str, row)] for row in zip(*columns.values())]
            wandb.log({name: wandb.Table(columns=["step", *columns], data=rows)})
    if "tensorboard" in report_to:
        writer = _tensorboard_writer(trainer)
        if writer is not None:
            writer.add_text(name, markdown_table(columns), step)
            writer.flush()
