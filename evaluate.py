"""Evaluate a trained autoencoder from its checkpoint: test metrics and denoising grids.

python evaluate.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from aelab.cli import exit_on_unknown_choice, run_task
from aelab.evaluation import evaluate

CONFIG_DIR = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    return run_task(evaluate, cfg)


if __name__ == "__main__":
    exit_on_unknown_choice(CONFIG_DIR, sys.argv[1:])
    main()
