"""Reading checkpoints safely and writing them so that a crash never leaves a broken one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from aelab.errors import CheckpointError

DATAMODULE_KEY = "datamodule_hyper_parameters"


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (weights only) and check that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path={str(path)!r}: no such file; give the path of a .ckpt file"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        reason = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
        raise CheckpointError(
            f"ckpt_path={str(path)!r} is not a readable checkpoint: {reason}"
        ) from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not hparams or "code_dim" not in hparams or DATAMODULE_KEY not in checkpoint:
        raise CheckpointError(
            f"ckpt_path={str(path)!r} is not an autoencoder checkpoint written by train.py"
        )
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, then renames it into place.

    A rename within one directory is atomic, so a crash while writing leaves the previous
    `last.ckpt` whole. Lightning's own writer stages the file in the system's temporary
    folder, and moving it from there is a plain copy when that is another file system.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            # Limitation: remote paths (s3://, gs://) go through Lightning's own writer.
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with partial.open("wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
