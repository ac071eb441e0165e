"""The ``lesion-cpu`` recipe: a real-data MS-lesion model in ~30 min on a 2-core CPU.

What it trains (issue 11; the measurements are in ``bench/results/lesion_cpu.md``):

* data: the training patients, z-scored per modality inside the brain and cropped to
  144×176×144 around it, plus every real lesion mask of ``transplant_masks``
  transplanted into the training brains (:func:`transplanted_subjects`) with a
  severity drawn *per lesion* over faint to bright contrast
  (:data:`~fasttversky.app.data.synth.WIDE_LESION_FACTOR`). Masks named like any
  patient of the fold (test or training) are left out: the test patient's lesions
  must not reach training, the training patients' own are already there.
* sampling: batch 2 × 64³ patches, 70 % centred on a lesion voxel, each augmented on
  the fly (:mod:`fasttversky.app.data.augment`: flips, rotation/scaling,
  per-modality gamma/contrast/brightness/noise).
* model and optimiser: 3-level U-Net, 8 base features, instance norm (patch
  statistics, robust to the intensity shifts between patients), Adam lr 3e-3 with a
  poly decay to 0 over the run, fused Tversky loss α = 0.3, β = 0.7; a checkpoint is
  kept every ``keep_every`` steps to evaluate training length.
* inference (:mod:`fasttversky.app.training.inference`): 64³ Gaussian-weighted
  sliding windows, restricted to the brain.

The CLI's ``--preset lesion-cpu`` runs the same settings through ``pipeline`` and
``experiment``; the functions here are the leave-one-patient-out driver of the
measurements in bench/results/lesion_cpu.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .presets import PRESETS

__all__ = ["LesionCpuRecipe", "train_recipe", "transplanted_subjects"]


# The recipe's numbers are those of the `lesion-cpu` preset (presets.py), declared once
# there; this flat record only adds what the LOPO driver below needs beside them.
_PRESET = PRESETS["lesion-cpu"].run


@dataclass
class LesionCpuRecipe:
    """All settings of the recipe (saved as ``recipe.json`` in the run folder); the
    defaults are the ``lesion-cpu`` preset's."""

    target_shape: tuple[int, int, int] = tuple(_PRESET.data.target_shape)
    patch_size: tuple[int, int, int] = tuple(_PRESET.data.patch_size)
    batch_size: int = _PRESET.data.batch_size
    lesion_prob: float = _PRESET.data.lesion_prob
    base_features: int = _PRESET.model.base_features
    levels: int = _PRESET.model.levels
    norm: str = _PRESET.model.norm
    steps: int = _PRESET.train.steps
    lr: float = _PRESET.train.lr
    lr_schedule: str = _PRESET.train.lr_schedule
    alpha: float = _PRESET.train.alpha
    beta: float = _PRESET.train.beta
    seed: int = _PRESET.train.seed
    keep_every: int = _PRESET.train.keep_every
    augment: dict = field(default_factory=dict)  # AugmentConfig fields; {} = defaults
    transplant_contrast: str = _PRESET.data.transplant_contrast  # synth.TRANSPLANT_CONTRASTS
    window: tuple[int, int, int] = tuple(_PRESET.predict.window)
    threads: int | None = None


def transplanted_subjects(
    brains: Sequence,
    mask_dir: str | Path,
    exclude: Sequence[str] = (),
    *,
    target_shape: Sequence[int] | None = None,
    seed: int | Sequence[int] = 0,
    contrast: str = "wide",
    n: int | None = None,
    progress: Callable | None = None,
) -> list:
    """The masks of ``mask_dir`` transplanted into ``brains`` (cycling), in memory.

    brains: :class:`fasttversky.app.data.Subject` s (read from disk, one at a time);
    exclude: subject names whose mask file (``<name>.nii(.gz)``) must not be used —
    pass every patient of the fold. ``contrast``: a mode of
    :data:`~fasttversky.app.data.synth.TRANSPLANT_CONTRASTS`. ``n``: use a random
    subset of n masks (drawn from ``seed``) instead of all. ``seed``: an int or a tuple
    of ints (e.g. (seed, fold)). Returns PreparedSubjects named ``<brain>+<mask>``,
    z-scored and cropped like the real ones. Mask i depends only on (seed, i).
    """
    from .data import load_subject, load_volume, prepare_arrays
    from .data.synth import lesion_mask_files, transplant, transplant_contrast

    if not brains:
        raise ValueError("transplanted_subjects needs at least one brain")
    options = transplant_contrast(contrast)
    files, _ = lesion_mask_files(mask_dir, [*exclude, *(b.name for b in brains)])
    seeds = (seed,) if isinstance(seed, int) else tuple(seed)
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        picks = np.random.default_rng(seeds).choice(len(files), min(n, len(files)), False)
        files = [files[k] for k in picks]
    out = []
    cache: dict = {}
    it = list(enumerate(files))
    for i, path in progress(it) if progress else it:
        brain = brains[i % len(brains)]
        if brain.name not in cache:
            cache = {brain.name: load_subject(brain)}  # one brain in memory at a time
        img, own, aff = cache[brain.name]
        lm, _ = load_volume(path, kind="mask")
        if lm.shape != img.shape[1:]:
            raise ValueError(
                f"{path}: shape {lm.shape} differs from brain {brain.name} {img.shape[1:]}; "
                "masks must be on the brains' grid"
            )
        imgs, mask = transplant(
            dict(zip(brain.modalities, img, strict=False)),
            own,
            lm,
            np.random.default_rng((*seeds, i)),
            **options,
        )
        name = f"{brain.name}+{path.name.split('.')[0]}"
        out.append(prepare_arrays(name, np.stack(list(imgs.values())), mask, aff, target_shape))
    return out


def train_recipe(
    train_subjects: Sequence,
    out: str | Path,
    recipe: LesionCpuRecipe | None = None,
    *,
    transplant_masks: str | Path | None = None,
    exclude: Sequence[str] = (),
    progress: bool = True,
    log: Callable[[str], None] = print,
):
    """Train the recipe's model on ``train_subjects`` (+ transplants) -> (model, TrainResult).

    Writes ``out/recipe.json`` (this recipe, the subjects, the transplants),
    ``out/last.pt`` + ``out/step_<N>.pt`` every ``keep_every`` steps and
    ``out/metrics.jsonl``. ``exclude``: names of held-out patients whose masks must
    not be transplanted.
    """
    import torch

    from .data import LesionDataset, RandomBatches, prepare_subject
    from .data.augment import AugmentConfig, Augmenter
    from .models import UNet3D
    from .training import TrainConfig, train

    recipe = recipe or LesionCpuRecipe()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    aug_cfg = AugmentConfig.from_dict(recipe.augment) if recipe.augment else AugmentConfig()
    prepared = [prepare_subject(s, recipe.target_shape) for s in train_subjects]
    extra = []
    if transplant_masks is not None:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            def bar(it):
                return tqdm(it, desc="transplant", dynamic_ncols=True)

        extra = transplanted_subjects(
            train_subjects,
            transplant_masks,
            exclude,
            target_shape=recipe.target_shape,
            seed=recipe.seed,
            contrast=recipe.transplant_contrast,
            progress=bar,
        )
    subjects = prepared + extra
    (out / "recipe.json").write_text(
        json.dumps(
            {
                "recipe": asdict(recipe),
                "in_channels": int(subjects[0].image.shape[0]),
                "augment": aug_cfg.to_dict(),
                "train_subjects": [p.name for p in prepared],
                "transplanted": [p.name for p in extra],
                "excluded_masks_of": sorted(exclude),
            },
            indent=1,
        )
    )
    log(f"training on {len(prepared)} patients + {len(extra)} transplanted masks")
    augmenter = Augmenter(aug_cfg, recipe.patch_size)
    ds = LesionDataset(
        subjects,
        patch_size=recipe.patch_size,
        lesion_prob=recipe.lesion_prob,
        seed=recipe.seed,
        augment=augmenter,
    )
    batches = RandomBatches(ds, recipe.batch_size, recipe.seed)
    torch.manual_seed(recipe.seed)
    model = UNet3D(
        in_channels=subjects[0].image.shape[0],
        num_classes=2,
        base_features=recipe.base_features,
        levels=recipe.levels,
        checkpoint="none",
        norm=recipe.norm,
    )
    config = TrainConfig(
        steps=recipe.steps,
        lr=recipe.lr,
        lr_schedule=recipe.lr_schedule,
        alpha=recipe.alpha,
        beta=recipe.beta,
        seed=recipe.seed,
        checkpoint_dir=out,
        checkpoint_every=min(recipe.keep_every, recipe.steps) or 1,
        keep_every=recipe.keep_every,
        log_path=out / "metrics.jsonl",
        progress=progress,
    )
    return model, train(model, batches, config)


# --------------------------------------------------------------------------------------
# inference and evaluation of a recipe run
# --------------------------------------------------------------------------------------
MIN_LESION_SIZE = _PRESET.predict.min_lesion_size
"""Default post-processing: components below 10 voxels (10 mm³ at 1 mm, a sphere of
~2.7 mm diameter) are removed. Fixed a priori from the lesion definition used in MS
imaging (lesions are counted from ~3 mm across), never tuned on a test patient."""


def default_inference(recipe: LesionCpuRecipe):
    """The recipe's inference: Gaussian windows of the training patch size, brain
    restriction, threshold 0.5, components < :data:`MIN_LESION_SIZE` removed."""
    from .training.inference import InferenceOptions

    return InferenceOptions(
        window=tuple(recipe.window),
        overlap=0.5,
        weighting="gaussian",
        brain_only=True,
        threshold=0.5,
        min_lesion_size=MIN_LESION_SIZE,
    )


def load_recipe_run(run: str | Path, checkpoint: str = "last.pt"):
    """A recipe run folder -> (model in eval mode, LesionCpuRecipe, modalities count)."""
    from .models import UNet3D
    from .training import load_checkpoint

    run = Path(run)
    meta = json.loads((run / "recipe.json").read_text())
    r = meta["recipe"]
    recipe = LesionCpuRecipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
    state = load_checkpoint(run / checkpoint)
    model = UNet3D(
        in_channels=int(meta.get("in_channels", 3)),
        num_classes=2,
        base_features=recipe.base_features,
        levels=recipe.levels,
        checkpoint="none",
        norm=recipe.norm,
    )
    model.load_state_dict(state["model"])
    model.eval()
    return model, recipe


def evaluate_prepared(model, prepared, options) -> dict:
    """Voxel metrics (DSC, sensitivity, specificity, F2 of the post-processed mask; APR
    of the probabilities) and lesion-wise metrics of one PreparedSubject with a mask,
    on the file's grid. Returns the metrics plus ``prob`` and ``mask`` arrays."""
    from .lesion_metrics import lesion_metrics
    from .metrics import segmentation_metrics
    from .training.inference import segment_volume

    prob, mask = segment_volume(model, prepared.image, options, prepared.brain)
    prob, mask = prepared.to_file_grid(prob), prepared.to_file_grid(mask.astype(np.uint8))
    target = prepared.full_mask
    out = segmentation_metrics(mask.astype(np.float32), target)
    out["apr"] = segmentation_metrics(prob, target)["apr"]
    out.update(lesion_metrics(mask, target))
    out["prob"], out["mask"] = prob, mask
    return out


def reproduce_lopo(
    subjects: Sequence,
    out: str | Path,
    recipe: LesionCpuRecipe | None = None,
    *,
    transplant_masks: str | Path | None = None,
    settings: Sequence[tuple[float, float]] = ((0.3, 0.7),),
    seeds: Sequence[int] = (0,),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Leave-one-patient-out with the recipe: for every (alpha, beta), seed and held-out
    patient, train on the others (+ transplants, the held-out patient's mask excluded)
    and evaluate on it with :func:`default_inference`.

    Writes ``out/<a..>_<b..>/seed<k>/test_<patient>/`` run folders and
    ``out/results.json``: one row per (setting, seed, patient) with voxel and
    lesion-wise metrics, and per setting the pooled metrics of each seed and
    :func:`fasttversky.app.lesion_metrics.summarize` over seeds. Returns that dict.
    """
    from dataclasses import replace

    from .data import prepare_subject
    from .lesion_metrics import LESION_KEYS, pool_lesion_counts, summarize
    from .metrics import segmentation_metrics

    recipe = recipe or LesionCpuRecipe()
    if len(subjects) < 2:
        raise ValueError("leave-one-patient-out needs at least 2 patients")
    out = Path(out)
    rows, summary = [], {}
    options = default_inference(recipe)
    for a, b in settings:
        tag = f"a{a:g}_b{b:g}"
        per_seed = []
        for seed in seeds:
            r = replace(recipe, alpha=a, beta=b, seed=seed)
            masks, targets, lesion_rows = [], [], []
            for test in subjects:
                train_s = [s for s in subjects if s.name != test.name]
                run = out / tag / f"seed{seed}" / f"test_{test.name}"
                model, _ = train_recipe(
                    train_s,
                    run,
                    r,
                    transplant_masks=transplant_masks,
                    exclude=[test.name],
                    progress=progress,
                    log=log,
                )
                prep = prepare_subject(test, r.target_shape)
                m = evaluate_prepared(model, prep, options)
                masks.append(m.pop("mask"))
                m.pop("prob")
                targets.append(prep.full_mask)
                lesion_rows.append(m)
                rows.append({"alpha": a, "beta": b, "seed": seed, "subject": test.name, **m})
                log(
                    f"{tag} seed {seed} {test.name}: DSC {m['dsc']:.3f}, "
                    f"lesion F1 {m['lesion_f1']:.3f}"
                )
            pooled = segmentation_metrics(
                np.concatenate([x.ravel() for x in masks]).astype(np.float32),
                np.concatenate([t.ravel() for t in targets]),
            )
            pooled.update(pool_lesion_counts(lesion_rows))
            per_seed.append(pooled)
        summary[tag] = {
            "pooled_per_seed": per_seed,
            **{
                k: summarize([p[k] for p in per_seed])
                for k in ("dsc", "sensitivity", "f2", *LESION_KEYS)
            },
        }
    result = {
        "recipe": asdict(recipe),
        "inference": options.to_dict(),
        "rows": rows,
        "summary": summary,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    return result
