"""Pipeline files (``pipelines/*.yaml``): saved, checked ``clamp-export MODEL ...`` commands."""

from clamp_export.pipefile.keys import KEYS, schema, table
from clamp_export.pipefile.load import Pipeline, load

__all__ = ["KEYS", "Pipeline", "load", "schema", "table"]
