"""Stage 2: layer-wise evolutionary search of quantization parameters, with cyclic adaptation."""

from clamp_export.search import config, driver, evolution, fitness, stages
from clamp_export.search.config import PRESETS, SearchConfig, preset
from clamp_export.search.driver import (
    SearchLog,
    prepare_equalization,
    run_search,
    write_search_json,
)

__all__ = [
    "config",
    "driver",
    "evolution",
    "fitness",
    "stages",
    "PRESETS",
    "SearchConfig",
    "SearchLog",
    "preset",
    "prepare_equalization",
    "run_search",
    "write_search_json",
]
