"""Sequential recommenders behind one interface (see models.base) and a registry."""

from models.base import ModelConfig, ModelConfigError, SequentialRecommender
from models.registry import available, build, build_config, model_class, register

__all__ = [
    "ModelConfig",
    "ModelConfigError",
    "SequentialRecommender",
    "available",
    "build",
    "build_config",
    "model_class",
    "register",
]
