"""Turn sweep directories into a report folder: results.csv, report.md and PNG figures.

    python report.py outputs/grid/multiruns/<date-time> outputs/denoise/multiruns/<date-time> \
        --out docs/report
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from aelab.errors import UserError
from aelab.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep directories (Hydra multirun)")
    parser.add_argument("--out", type=Path, required=True, help="report folder to create")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("AELAB_DATA_DIR", "data"),
        help="folder with MNIST/raw and FashionMNIST/raw (default: $AELAB_DATA_DIR or ./data)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        write_report(args.sweeps, args.out, args.data_dir, overwrite=args.overwrite)
    except UserError as err:
        logging.getLogger("aelab").error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
