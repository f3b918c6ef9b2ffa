"""Training an inverter on a store, with Accelerate (one CPU, one GPU, or many processes):
`config.py` holds every setting (`TrainConfig`), `trainer.py` the loop (`Trainer`)."""

from .config import TrainConfig
from .trainer import Trainer, is_trained, latest_checkpoint

__all__ = ["TrainConfig", "Trainer", "is_trained", "latest_checkpoint"]
