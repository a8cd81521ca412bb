"""Stage 1: synthetic calibration images (CLAMP patch-contrastive, PSAQ-ViT v1, Gaussian noise)."""

from __future__ import annotations

from pathlib import Path

from clamp_export.models.loader import LoadedModel
from clamp_export.synth.config import METHODS, PRESETS, SynthConfig, preset
from clamp_export.synth.generator import SynthResult, generate
from clamp_export.synth.store import DEFAULT_CACHE, cache_dir, cache_key, read_set, write_cached

__all__ = [
    "METHODS",
    "PRESETS",
    "SynthConfig",
    "SynthResult",
    "cached_folder",
    "generate",
    "meta_of",
    "preset",
    "synthesize",
]


def synthesize(
    loaded: LoadedModel,
    cfg: SynthConfig,
    cache_root: Path | None = DEFAULT_CACHE,
    log=print,
    progress: bool = True,
) -> tuple[SynthResult, Path | None]:
    """Images for ``loaded`` under ``cfg``, from the cache when an identical set exists.

    Returns the result and its cache folder (None when not cached); ``result.cached`` says which.
    """
    folder = cached_folder(loaded, cfg, cache_root)
    if folder is not None and (folder / "synth.json").is_file():
        result, _ = read_set(folder)
        result.cached = True
        log(f"reusing cached synthetic set {folder}")
        return result, folder
    result = generate(loaded.model, loaded.preprocess, cfg, name=loaded.name, progress=progress)
    if folder is not None:
        write_cached(result, loaded.preprocess, folder, meta_of(loaded))
        log(
            f"generated {len(result.images)} {cfg.method} images in {result.seconds:.1f}s -> {folder}"
        )
    return result, folder


def cached_folder(loaded: LoadedModel, cfg: SynthConfig, cache_root: Path | None) -> Path | None:
    """Where the set for ``loaded`` under ``cfg`` lives in ``cache_root``; None if not cacheable."""
    # noise needs no optimization, so there is nothing worth caching; a model without a weights
    # hash (random init) has no stable identity to key on
    if cache_root is None or loaded.weights_sha256 is None or cfg.method == "noise":
        return None
    model_id = {
        "timm_name": loaded.timm_name,
        "weights_sha256": loaded.weights_sha256,
        "arch": repr(loaded.model.patch_embed) + str(len(loaded.model.blocks)),
    }
    return cache_dir(Path(cache_root), loaded.name, cache_key(model_id, loaded.preprocess, cfg))


def meta_of(loaded: LoadedModel) -> dict:
    return {
        "model": loaded.name,
        "timm_name": loaded.timm_name,
        "weights_sha256": loaded.weights_sha256,
    }
