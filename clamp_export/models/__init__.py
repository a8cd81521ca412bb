"""Model registry and loading."""

from clamp_export.models.loader import LoadedModel, load_model, parse_model_args

__all__ = ["LoadedModel", "load_model", "parse_model_args"]
