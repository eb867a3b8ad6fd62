"""Train an autoencoder, test its best checkpoint and write metrics.json.

python train.py data=fmnist model.depth=5 model.code_dim=30 regularizer=lasso
python train.py -m model.code_dim=15,30,50,100
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from aelab.cli import exit_on_unknown_choice, run_task
from aelab.training import train

CONFIG_DIR = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    return run_task(train, cfg)


if __name__ == "__main__":
    exit_on_unknown_choice(CONFIG_DIR, sys.argv[1:])
    main()
