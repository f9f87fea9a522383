SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c  # a failing benchmark fails `make bench` even when piped through tee

# Developer shortcuts; every target runs the command the README documents.
.PHONY: install demo train test quality bench

install:
	pip install -e ".[dev]"

# Inference-time Best-of-N on the bundled toy base: greedy vs BoN@16 accuracy (about a minute on CPU)
demo:
	trl-sharpen bon --model_name_or_path trl_sharpen/toy/base_model --dataset_name trl_sharpen/toy/data/test.jsonl \
		--num_samples 16 --max_completion_length 48 --answer_column answer --output_dir outputs/bon_demo --overwrite

# The headline job: online self-reward DPO on the toy base, greedy accuracy before and after
train:
	accelerate launch recipes/dpo_sharpen.py --config recipes/dpo_sharpen/toy_cpu.yaml

test:
	pytest

quality:
	ruff check trl_sharpen recipes benchmarks tests
	ruff format --check trl_sharpen recipes benchmarks tests

# About 12 minutes on 2 CPU cores; the coverage experiment (15 minutes) runs on its own:
# python benchmarks/coverage_experiment.py --seeds 0 1 2
bench:
	python benchmarks/best_of_n_speed.py | tee benchmarks/results/best_of_n_speed.md
	python benchmarks/dpo_step_speed.py | tee benchmarks/results/dpo_step_speed.md
	python benchmarks/sharpening_table.py
