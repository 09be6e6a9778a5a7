"""LightningModules: thin glue between a model, its losses and its metrics."""
from focalnet_pl.tasks.classification import ClassificationTask

__all__ = ["ClassificationTask"]
