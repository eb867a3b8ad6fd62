"""Evaluate a trained autoencoder from its checkpoint: test metrics and denoising grids.

python evaluate.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt
"""

import hydra
from omegaconf import DictConfig

from aelab.cli import run_task
from aelab.evaluation import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    return run_task(evaluate, cfg)


if __name__ == "__main__":
    main()
