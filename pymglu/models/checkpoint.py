"""Training checkpoints of a language model: weights, optimizer moments, model config and trainer state
in one safetensors file (through :mod:`pymglu.io`, so every write is atomic).

A resume checks the saved :class:`TransformerConfig` against the one asked for *before* anything is
loaded, and names every differing field; :func:`pymglu.io.load_checkpoint` then checks every array.
"""
from __future__ import annotations

import os
from pathlib import Path

from pymglu import io
from pymglu.models.config import TransformerConfig
from pymglu.models.training import Trainer

__all__ = ["CHECKPOINT_NAME", "ConfigMismatchError", "save_training_checkpoint", "read_config",
           "load_training_checkpoint"]

#: file name of a run's checkpoint inside its output directory.
CHECKPOINT_NAME = "checkpoint.safetensors"

_CONFIG_KEY = "lm.config"


class ConfigMismatchError(ValueError):
    """A checkpoint was written for another model configuration (``differences`` lists the fields)."""

    def __init__(self, path: Path, differences: list[str]) -> None:
        self.differences = differences
        super().__init__(
            f"checkpoint {str(path)!r} holds another model (checkpoint vs this run: " + "; ".join(differences)
            + "); nothing was loaded or overwritten: resume with the checkpoint's settings, or train into another "
            "output directory"
        )


def save_training_checkpoint(path: str | os.PathLike, trainer: Trainer, extra: dict[str, str] | None = None) -> None:
    """Write ``trainer``'s model, optimizer, config and trainer state to ``path`` (atomic replace)."""
    meta = {_CONFIG_KEY: trainer.model.config.to_json(), **trainer.state_metadata(), **(extra or {})}
    io.save_checkpoint(path, trainer.model, metadata=meta, optimizer=trainer.optimizer)


def _read_config(path: Path) -> tuple[TransformerConfig, dict[str, str]]:
    _, meta = io.read_checkpoint(path)
    if _CONFIG_KEY not in meta:
        raise io.CheckpointError(f"checkpoint {str(path)!r} holds no language-model config (not a train_lm checkpoint)")
    try:
        return TransformerConfig.from_json(meta[_CONFIG_KEY]), meta
    except (ValueError, TypeError) as e:
        raise io.CheckpointError(f"checkpoint {str(path)!r}: unreadable model config ({e})") from None


def read_config(path: str | os.PathLike) -> TransformerConfig:
    """The :class:`TransformerConfig` stored in a training checkpoint.

    Raises:
        FileNotFoundError: no such file. pymglu.io.CheckpointError: not a readable checkpoint, or one
        without a model config (not written by :func:`save_training_checkpoint`).
    """
    return _read_config(Path(path))[0]


def load_training_checkpoint(path: str | os.PathLike, trainer: Trainer) -> dict[str, str]:
    """Load a checkpoint into ``trainer`` (model, optimizer and trainer state); returns its metadata.

    Everything is checked before anything changes.

    Raises:
        ConfigMismatchError: the checkpoint's config differs from ``trainer.model.config``.
        pymglu.io.CheckpointError: unreadable file, trainer state or arrays that do not fit.
    """
    path = Path(path)
    saved, meta = _read_config(path)
    differences = saved.differences(trainer.model.config)
    if differences:
        raise ConfigMismatchError(path, differences)
    try:
        trainer.parse_state_metadata(meta)
    except ValueError as e:
        raise io.CheckpointError(f"checkpoint {str(path)!r}: {e}") from None
    io.load_checkpoint(path, trainer.model, optimizer=trainer.optimizer)
    trainer.load_state_metadata(meta)
    return meta
