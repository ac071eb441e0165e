"""fasttversky.app.config: one declaration per setting, run.json round-trips, and every
range check names its field. Also the presets: each is a valid RunSettings."""

from __future__ import annotations

import inspect
import json
from dataclasses import fields, replace

import pytest

from fasttversky.app.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    PredictConfig,
    RunSettings,
    TrainConfig,
    cli_fields,
)
from fasttversky.app.presets import PRESETS


def _non_default_settings() -> RunSettings:
    """A value other than the default in every field of every section."""
    return RunSettings(
        model=ModelConfig(base_features=4, levels=3, checkpoint="top", norm="instance"),
        data=DataConfig(
            modalities={"FLAIR": "*flair*", "T1": "t1w"},
            mask_pattern="lesion*",
            target_shape=[64, 80, 64],
            patch_size=(32, 32, 32),  # a tuple comes back as a list
            lesion_prob=0.25,
            batch_size=3,
            normalize="white-matter",
            val_subjects=("patient02",),  # a tuple comes back as a list
        ),
        train=TrainConfig(
            steps=17,
            lr=3e-3,
            lr_decay=0.5,
            lr_decay_every=7,
            alpha=0.2,
            beta=0.8,
            gamma=0.75,
            ce_weight=0.5,
            backend="torch",
            precision="bf16",
            grad_accum=2,
            seed=5,
            checkpoint_every=4,
            lr_schedule="poly",
            keep_every=8,
            val_every=3,
            device="cuda:1",
        ),
        predict=PredictConfig(window=[32, 48, 32], overlap=0.25, threshold=0.4),
    )


def test_run_json_round_trips(tmp_path):
    s = _non_default_settings()
    back = RunSettings.load(s.save(tmp_path / "run.json"))
    assert back == s
    assert back.to_dict() == json.loads((tmp_path / "run.json").read_text())
    assert RunSettings.from_dict(RunSettings().to_dict()) == RunSettings()
    # every field of every section is in the file (nothing silently dropped)...
    d = s.to_dict()
    for section in ("model", "data", "predict"):
        assert set(d[section]) == {f.name for f in fields(type(getattr(s, section)))}
    # ...train's too: where a call writes is not a setting (TrainOutputs), so
    # TrainConfig holds none of it
    assert set(d["train"]) == {f.name for f in fields(TrainConfig)}
    assert not {"checkpoint_dir", "log_path", "val_log_path", "progress"} & set(d["train"])


def test_flat_run_json_of_earlier_versions_loads():
    """run.json as the CLI wrote it before the split (one flat object)."""
    old = {
        "modalities": {"T1": "t1", "T2": "t2", "FLAIR": "flair"},
        "mask_pattern": "mask",
        "target_shape": None,
        "patch_size": [32, 32, 32],
        "lesion_prob": 0.7,
        "batch_size": 2,
        "base_features": 8,
        "levels": 3,
        "checkpoint": "none",
        "norm": "instance",
        "steps": 100,
        "lr": 0.003,
        "lr_decay": 0.9,
        "lr_decay_every": 1000,
        "alpha": 0.3,
        "beta": 0.7,
        "gamma": 1.0,
        "backend": "auto",
        "precision": "fp32",
        "device": "cpu",
        "seed": 0,
        "window": None,
    }
    s = RunSettings.from_dict(old)
    assert s.model == ModelConfig(base_features=8, levels=3, checkpoint="none", norm="instance")
    assert s.data.patch_size == [32, 32, 32] and s.train.lr == 0.003 and s.train.steps == 100
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['width'\]"):
        RunSettings.from_dict({**old, "width": 3})


def test_bad_run_json_file_is_a_data_error(tmp_path):
    from fasttversky.app.errors import DataError

    f = tmp_path / "run.json"
    f.write_text("{not json")
    with pytest.raises(DataError, match=r"run\.json: cannot be read as JSON"):
        RunSettings.load(f)
    f.write_text('{"model": {"levels": 0}}')
    with pytest.raises(DataError, match=r"run\.json: levels must be >= 1"):
        RunSettings.load(f)


@pytest.mark.parametrize(
    "d, match",
    [
        ({"model": {"levels": 3}, "extra": {}}, r"unknown section"),
        ({"model": {"width": 3}}, r"run.json model has unknown key\(s\) \['width'\]"),
        ({"train": {"alpha": -1}}, r"alpha must be >= 0"),
        ([1, 2], r"must hold an object"),
    ],
)
def test_run_json_errors_name_the_key(d, match):
    with pytest.raises(ConfigError, match=match):
        RunSettings.from_dict(d)


def test_model_config_is_unet3d_signature():
    """ModelConfig's fields are UNet3D's keyword arguments with the same defaults, so
    UNet3D(**asdict(ModelConfig())) is the default model (no second declaration)."""
    from fasttversky.app.models import UNet3D

    sig = inspect.signature(UNet3D.__init__).parameters
    for f in fields(ModelConfig):
        assert f.name in sig, f.name
        assert sig[f.name].default == f.default, f.name


def test_training_uses_the_config_class():
    from fasttversky.app import training
    from fasttversky.app.models import unet
    from fasttversky.app.training import loop

    assert training.TrainConfig is TrainConfig and loop.TrainConfig is TrainConfig
    from fasttversky.app import config

    assert unet.NORMS is config.NORMS and unet.CHECKPOINT_MODES is config.CHECKPOINT_MODES


def test_every_cli_field_has_help_and_no_field_is_declared_twice():
    names = []
    for cls in (ModelConfig, DataConfig, TrainConfig, PredictConfig):
        for f in cli_fields(cls):
            assert f.metadata["help"].strip()
            names.append(f.name)
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: TrainConfig(steps=1, alpha=-0.1), "alpha"),
        (lambda: TrainConfig(steps=1, beta=float("nan")), "beta"),
        (lambda: TrainConfig(steps=1, alpha=0, beta=0), "alpha + beta"),
        (lambda: TrainConfig(steps=1, gamma=0), "gamma"),
        (lambda: TrainConfig(steps=1, ce_weight=-0.5), "ce_weight"),
        (lambda: TrainConfig(steps=1, ce_weight=float("nan")), "ce_weight"),
        (lambda: TrainConfig(steps=-1), "steps"),
        (lambda: TrainConfig(steps=1, seed=-3), "seed"),
        (lambda: TrainConfig(steps=1, lr=float("inf")), "lr"),
        (lambda: TrainConfig(steps=1, lr_schedule="cosine"), "lr_schedule"),
        (lambda: TrainConfig(steps=1, keep_every=0), "keep_every"),
        (lambda: TrainConfig(steps=1, precision="fp8"), "precision"),
        (lambda: ModelConfig(norm="group"), "norm"),
        (lambda: ModelConfig(levels=0), "levels"),
        (lambda: DataConfig(patch_size=[16, 16]), "patch_size"),
        (lambda: DataConfig(lesion_prob=-0.1), "lesion_prob"),
        (lambda: DataConfig(modalities={}), "modalities"),
        (lambda: DataConfig(normalize="minmax"), "normalize"),
        (lambda: DataConfig(val_subjects=[]), "val_subjects"),
        (lambda: DataConfig(val_subjects="patient02"), "val_subjects"),
        (lambda: DataConfig(val_subjects=["a", ""]), "val_subjects"),
        (lambda: DataConfig(val_subjects=["a", "a"]), "val_subjects"),
        (lambda: TrainConfig(steps=1, val_every=0), "val_every"),
        (lambda: DataConfig(normalize="white-matter", modalities={"FLAIR": "f"}), "normalize"),
        (lambda: PredictConfig(threshold=1.0), "threshold"),
        (lambda: PredictConfig(overlap=1.0), "overlap"),
        (lambda: RunSettings(train=TrainConfig(steps=0)).validate(), "steps"),
        (lambda: RunSettings(train=TrainConfig(steps=1, backend="gpu")).validate(), "backend"),
        (
            lambda: RunSettings(
                model=ModelConfig(levels=3), data=DataConfig(patch_size=[16, 16, 18])
            ).validate(),
            "patch_size",
        ),
    ],
)
def test_range_checks_name_the_field(make, field):
    with pytest.raises(ConfigError) as e:
        make()
    assert e.value.field == field


def test_white_matter_reference_is_the_channel_named_t1():
    assert DataConfig().normalisation == ("zscore", 0)
    assert DataConfig(normalize="white-matter").normalisation == ("white-matter", 0)
    d = DataConfig(normalize="white-matter", modalities={"FLAIR": "*fl*", "t1": "*t1w*"})
    assert d.normalisation == ("white-matter", 1)


def test_gpu_preset_on_a_machine_without_one_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        return  # nothing to refuse here; the CPU CI machine checks it
    with pytest.raises(ConfigError, match="torch sees no CUDA device") as e:
        PRESETS["gpu"].run.validate()
    assert e.value.field == "device"


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid_settings(name):
    preset = PRESETS[name]
    # Everything but the device, which needs the machine the preset is meant for (gpu).
    on_cpu = RunSettings(**{**vars(preset.run), "train": replace(preset.run.train, device="cpu")})
    on_cpu.validate()
    assert RunSettings.from_dict(preset.run.to_dict()) == preset.run
    assert preset.n_subjects >= 2 and len(preset.shape) == 3 and preset.description
