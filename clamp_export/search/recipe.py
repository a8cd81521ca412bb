"""The calibrate/search stage: a recipe in, ``qparams.json`` and ``search.json`` out.

The recipe holds every choice that decides the searched parameters besides the model. Its hash,
with the model's identity and ``SEARCH_NUMERICS_VERSION``, keys the store under
``calib/qparams/``: a second run of the same recipe reuses the entry instead of searching again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from clamp_export.models import LoadedModel
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.fakequant import collect_qparams, load_qparams
from clamp_export.quant.qparams import QParams
from clamp_export.quant.targets import TargetProfile
from clamp_export.rundir import CHECKPOINT
from clamp_export.search.config import SearchConfig
from clamp_export.search.driver import (
    load_checkpoint,
    prepare_equalization,
    run_search,
    search_identity,
    write_search_json,
)
from clamp_export.search.mixed import allocate_bits
from clamp_export.store import Store, recipe_key
from clamp_export.synth import SynthConfig, synthesize

# Bump whenever the search gives other parameters for the same recipe (a fix, a new default in
# the numerics): stored entries of the old numerics are then never reused.
# 2: the trt profile rounds where its FP16 graph stores tensors; 3: and sums its Q/DQ'd matmuls and
# conv on integers, as INT8 kernels do
SEARCH_NUMERICS_VERSION = 3
QPARAMS, SEARCH_JSON = "qparams.json", "search.json"


@dataclass(frozen=True)
class Recipe:
    """What decides the searched parameters, apart from the model."""

    bits: BitsSpec
    profile: TargetProfile
    softmax: str = "uniform"
    calib: str = "clamp"  # clamp (Stage 1 + 2), clamp-synth, psaq, noise or real
    calib_data: str | None = None  # for real: a source name or path
    calib_size: int = 32
    range_method: str = "minmax"
    percentile: float = 99.99
    seed: int = 0
    budget_mb: float | None = None
    synth: SynthConfig | None = None  # None for real data
    search: SearchConfig | None = None

    @property
    def searches(self) -> bool:
        return self.calib == "clamp"

    def identity(self, loaded: LoadedModel) -> dict:
        """What a resumable checkpoint must have been made with (besides the search config)."""
        return {
            "model": loaded.name,
            "weights_sha256": loaded.weights_sha256,
            "bits": str(self.bits),
            "target": self.profile.name,
            "softmax": self.softmax,
            "synth": json.dumps(self.synth.to_dict(), sort_keys=True),
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits"], d["profile"] = str(self.bits), self.profile.to_dict()
        if self.bits.weight_only:  # the block size decides the parameters too
            d["bits"] = self.bits.to_dict()
        d["synth"] = self.synth.to_dict() if self.synth else None
        d["search"] = self.search.to_dict() if self.search else None
        if self.range_method != "percentile":
            d["percentile"] = None
        return d


def store_key(loaded: LoadedModel, recipe: Recipe, real_x: torch.Tensor | None) -> str | None:
    """The entry's key; None for a model with no stable identity (random weights)."""
    if loaded.weights_sha256 is None:
        return None
    data = None
    if real_x is not None:  # the images themselves, so an edited data file is another recipe
        data = hashlib.sha256(real_x.contiguous().numpy().tobytes()).hexdigest()
    return recipe_key(
        {
            "weights_sha256": loaded.weights_sha256,
            "timm_name": loaded.timm_name,
            "model_kwargs": loaded.model_kwargs,
            "preprocess": loaded.preprocess.to_dict(),
            "recipe": recipe.to_dict(),
            "calib_data_sha256": data,
            "search_numerics": SEARCH_NUMERICS_VERSION,
        }
    )


@dataclass
class Searched:
    qparams: QParams
    reused: Path | None  # the store entry the parameters came from
    key: str | None  # their store key (None: not stored)


def _read_entry(folder: Path) -> Path:
    QParams.load(folder / QPARAMS)  # refuses anything malformed: a corrupt entry is a miss
    if (folder / SEARCH_JSON).exists():
        json.loads((folder / SEARCH_JSON).read_text())
    return folder


def search_stage(
    loaded: LoadedModel,
    qmodel: nn.Module,
    recipe: Recipe,
    out: Path,
    *,
    real_x: torch.Tensor | None = None,
    cache_root: Path | None = None,
    resume: bool = False,
    device: torch.device | str = "cpu",
    log=print,
) -> Searched:
    """Parameters for ``qmodel`` under ``recipe`` into ``out`` (qparams.json, search.json),
    from the store when the same recipe was searched before; installed on ``qmodel``.

    ``cache_root`` None neither reads nor writes the store; ``resume`` continues the checkpoint
    in ``out`` and never reads the store.
    """
    key = store_key(loaded, recipe, real_x) if cache_root is not None else None
    store = Store(cache_root, "qparams") if key else None
    if store is not None and not resume:
        hit = store.load(loaded.name, key, _read_entry, log)
        if hit is not None:
            for f in hit.iterdir():
                shutil.copyfile(f, out / f.name)
            qp = QParams.load(out / QPARAMS)
            load_qparams(qmodel, qp)
            log(f"reusing stored parameters {hit} (same recipe; --no-cache to search again)")
            return Searched(qp, hit, key)
    if resume:  # refuse a foreign or corrupt checkpoint before Stage 1, not after it
        load_checkpoint(
            out / CHECKPOINT, search_identity(recipe.identity(loaded), recipe.search, qmodel)
        )
    qp = _calibrate_and_search(loaded, qmodel, recipe, out, real_x, cache_root, resume, device, log)
    qp.save(out / QPARAMS)
    if store is not None:

        def write(tmp: Path) -> None:
            for name in (QPARAMS, SEARCH_JSON):
                if (out / name).exists():
                    shutil.copyfile(out / name, tmp / name)

        store.save(loaded.name, key, write)
    return Searched(qp, None, key)


def _calibrate_and_search(loaded, qmodel, recipe, out, real_x, cache_root, resume, device, log):
    synth_record = None
    if real_x is not None:
        calib_x = real_x
    else:
        synth, _ = synthesize(loaded, recipe.synth, cache_root, log=log)
        calib_x = synth.images
        # qparams.json records what decides the parameters, never how long it took or where
        # the images came from, so one recipe always gives the same bytes (times: search.json)
        synth_record = {
            "config": synth.config.to_dict(),
            "misprediction_rate": synth.misprediction_rate,
        }
    calib_x = calib_x.to(device)
    bits, profile, scfg = recipe.bits, recipe.profile, recipe.search
    fp_ref = loaded.model
    if recipe.searches:
        fp_ref = prepare_equalization(loaded.model, qmodel, calib_x, scfg)
    log(
        f"calibrating {loaded.name} {bits} for {profile.name} on {len(calib_x)} {recipe.calib} images"
    )
    calibrate(qmodel, calib_x, recipe.range_method, recipe.percentile)
    mixed = None
    if bits.mixed:
        budget = f" under {recipe.budget_mb:g} MB" if recipe.budget_mb else ""
        log(f"allocating bits for {bits}{budget}")
        mixed = allocate_bits(bits, fp_ref, qmodel, calib_x, scfg, profile, recipe.budget_mb)
    header = {"model": loaded.name, "target": profile.name, "bits": str(bits)}
    search_record = None
    if recipe.searches:
        log(f"searching ({scfg.passes} passes x {scfg.cycles} cycles)")
        _, calib_x, slog = run_search(
            fp_ref,
            qmodel,
            calib_x,
            scfg,
            header,
            loaded.preprocess.pixel_bounds(),
            run_dir=out,
            identity=recipe.identity(loaded),
            resume=resume,
        )
        write_search_json(out / SEARCH_JSON, scfg, slog)
        if slog.refine:
            r = slog.refine
            log(
                f"refined every scale in {r['steps']} steps: logit KL to FP "
                f"{r['kl_before']:.4f} -> {r['kl_after']:.4f}"
            )
        refine = slog.refine and {k: v for k, v in slog.refine.items() if k != "seconds"}
        search_record = {
            "config": scfg.to_dict(),
            "refreshes": slog.refreshes,
            "passes": slog.passes,
            "refine": refine,
        }
    qp = collect_qparams(
        qmodel,
        **header,
        metadata={
            "timm_name": loaded.timm_name,
            "weights": loaded.weights,
            "weights_sha256": loaded.weights_sha256,
            "calibration": {
                "source": recipe.calib,
                "synth": synth_record,
                "data": recipe.calib_data,
                "size": recipe.calib_size,
                "range": recipe.range_method,
                "percentile": recipe.percentile if recipe.range_method == "percentile" else None,
                "seed": recipe.seed,
            },
            "search": search_record,
            "mixed_precision": mixed,
            "profile": profile.to_dict(),
            "bits_spec": bits.to_dict(),
            "preprocess": loaded.preprocess.to_dict(),
        },
    )
    qp.validate(profile)
    return qp
