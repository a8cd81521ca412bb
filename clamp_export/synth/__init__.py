"""Stage 1: synthetic calibration images (CLAMP patch-contrastive, PSAQ-ViT v1, Gaussian noise)."""

from __future__ import annotations

from pathlib import Path

from clamp_export.models.loader import LoadedModel
from clamp_export.store import Store, recipe_key
from clamp_export.synth.config import METHODS, PRESETS, SynthConfig, preset
from clamp_export.synth.generator import SynthResult, generate
from clamp_export.synth.store import DEFAULT_CACHE, read_set, write_files

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
    """Images for ``loaded`` under ``cfg``, from the store when an identical set exists.

    Returns the result and its store folder (None when not stored); ``result.cached`` says which.
    """
    key = store_key(loaded, cfg)
    store = Store(cache_root, "synth") if cache_root is not None and key else None
    if store is not None:
        hit = store.load(loaded.name, key, read_set, log)
        if hit is not None:
            result, _ = hit
            result.cached = True
            log(f"reusing cached synthetic set {store.folder(loaded.name, key)}")
            return result, store.folder(loaded.name, key)
    result = generate(loaded.model, loaded.preprocess, cfg, name=loaded.name, progress=progress)
    if store is None:
        return result, None
    folder = store.save(
        loaded.name, key, lambda tmp: write_files(result, loaded.preprocess, tmp, meta_of(loaded))
    )
    log(f"generated {len(result.images)} {cfg.method} images in {result.seconds:.1f}s -> {folder}")
    return result, folder


def store_key(loaded: LoadedModel, cfg: SynthConfig) -> str | None:
    """The set's key in the store; None when it is not worth or not safe to store."""
    # noise needs no optimization, so there is nothing worth caching; a model without a weights
    # hash (random init) has no stable identity to key on
    if loaded.weights_sha256 is None or cfg.method == "noise":
        return None
    model_id = {
        "timm_name": loaded.timm_name,
        "weights_sha256": loaded.weights_sha256,
        "arch": repr(loaded.model.patch_embed) + str(len(loaded.model.blocks)),
    }
    return recipe_key({"model": model_id, "pre": loaded.preprocess.to_dict(), "cfg": cfg.to_dict()})


def cached_folder(loaded: LoadedModel, cfg: SynthConfig, cache_root: Path) -> Path | None:
    """Where the set for ``loaded`` under ``cfg`` lives in the store at ``cache_root``."""
    key = store_key(loaded, cfg)
    return Store(cache_root, "synth").folder(loaded.name, key) if key else None


def meta_of(loaded: LoadedModel) -> dict:
    return {
        "model": loaded.name,
        "timm_name": loaded.timm_name,
        "weights_sha256": loaded.weights_sha256,
    }
