"""Train an autoencoder, test its best checkpoint and write metrics.json.

python train.py data=fmnist model.depth=5 model.code_dim=30 regularizer=lasso
python train.py -m model.code_dim=15,30,50,100
"""

import hydra
from omegaconf import DictConfig

from aelab.cli import run_task
from aelab.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run_task(train, cfg)


if __name__ == "__main__":
    main()
