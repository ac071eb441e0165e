"""Named experiment presets (``fasttversky reproduce --preset NAME``; ``demo`` uses
"quick"): phantom data to synthesise plus the run settings to train with.

To add one, add an entry to :data:`PRESETS`; the CLI lists it with its description.
Torch-free (the CLI builds its help from this module).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import DataConfig, ModelConfig, PredictConfig, RunSettings, TrainConfig

__all__ = ["PRESETS", "Preset"]


@dataclass(frozen=True)
class Preset:
    """A reproduce/demo configuration: phantom data + run settings.

    n_subjects, shape, lesion_fraction: phantoms written by
    ``fasttversky.app.data.synth.write_phantom_dataset`` when no --data is given
    (lesion_fraction = (low, high) of a log-uniform draw per subject).
    """

    n_subjects: int
    shape: tuple
    lesion_fraction: tuple
    run: RunSettings
    description: str


# Quick/tiny data: the upper half of the real lesion-load range (0.1–0.65 %) so that a
# few hundred CPU steps see enough lesion voxels; the full range is the synth default.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        4,
        (32, 40, 32),
        (2e-3, 6.5e-3),
        RunSettings(
            model=ModelConfig(base_features=2, levels=2, checkpoint="none"),
            data=DataConfig(batch_size=1, patch_size=[16, 16, 16], lesion_prob=0.9),
            train=TrainConfig(steps=2, lr=1e-3),
        ),
        "seconds; for tests: 4 phantoms 32×40×32, 2-level U-Net with 2 features, 2 steps",
    ),
    # Instance norm and lr 3e-3, not the paper's plain net at 1e-4: on these phantoms the
    # plain small net collapses to all-background or learns nothing in a CPU budget
    # (bench/results/presets.md).
    "quick": Preset(
        6,
        (64, 80, 64),
        (1e-3, 6.5e-3),
        RunSettings(
            model=ModelConfig(base_features=8, levels=3, checkpoint="none", norm="instance"),
            data=DataConfig(batch_size=2, patch_size=[32, 32, 32], lesion_prob=0.7),
            train=TrainConfig(steps=100, lr=3e-3, lr_decay_every=1000),
        ),
        "≤ 20 min on a 2-core CPU: 6 phantoms 64×80×64 (2.8 mm voxels), 3-level U-Net "
        "with 8 features + instance norm, 32³ patches, 100 Adam steps (lr 3e-3) per fold",
    ),
    # The real-data CPU recipe (bench/results/lesion_cpu.md; why each choice:
    # bench/results/presets.md): meant for `train DATA --preset lesion-cpu
    # --transplant-masks MASKS` and `reproduce --preset lesion-cpu --data DATA
    # --transplant-masks MASKS --transplant-n 28`. 64³ patches and 1,800 steps: the scale
    # at which a run generalised to a patient outside the training data; poly decay so
    # that the last weights are annealed; components < 10 voxels (10 mm³) removed;
    # transplant contrast "varied" (per lesion and per modality, faint end above cortex),
    # which held up on a held-out patient where "wide" did not.
    "lesion-cpu": Preset(
        6,
        (64, 80, 64),
        (1e-3, 6.5e-3),
        RunSettings(
            model=ModelConfig(base_features=8, levels=3, checkpoint="none", norm="instance"),
            data=DataConfig(
                target_shape=[144, 176, 144],
                patch_size=[64, 64, 64],
                batch_size=2,
                lesion_prob=0.7,
                augment="default",
                transplant_contrast="varied",
            ),
            train=TrainConfig(
                steps=1800, lr=3e-3, lr_schedule="poly", keep_every=300, checkpoint_every=300
            ),
            predict=PredictConfig(window=[64, 64, 64], min_lesion_size=10),
        ),
        "real MS data on a 2-core CPU (~29 min per model when idle): 144×176×144 crop, "
        "3-level U-Net with 8 features + instance norm, 2 × 64³ augmented patches (70 % on "
        "lesions), 1,800 Adam steps at lr 3e-3 with poly decay, Gaussian 64³ windows, "
        "components < 10 voxels removed; use with --transplant-masks",
    ),
    "gpu": Preset(
        20,
        (182, 218, 182),
        (1.2e-4, 6.5e-3),
        RunSettings(
            model=ModelConfig(base_features=32, levels=4, checkpoint="all"),
            data=DataConfig(batch_size=1, target_shape=[160, 192, 160], patch_size=None),
            train=TrainConfig(
                steps=4000, lr=1e-4, lr_decay_every=1000, precision="bf16", device="cuda"
            ),
        ),
        "full-size volumes on a GPU: 20 MNI-sized phantoms, whole 160×192×160 volumes, "
        "the paper's 4-level U-Net (32 features) and schedule, bf16",
    ),
}
