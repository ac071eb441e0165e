"""One declaration per setting (issue 24): every default and every set of choices is
written once, in fasttversky/app/config.py, and the other modules and the command line
take it from there. These checks read the source (ast), so they fail as soon as a
module writes one of them again: a keyword default equal to a setting's, a literal
tuple of a setting's choices, or an argparse default for an option a config field
declares."""

from __future__ import annotations

import ast
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from fasttversky.app import config
from fasttversky.app.cli import SECTIONS, _flag

APP = Path(config.__file__).parent
MODULES = sorted(p for p in APP.rglob("*.py") if p.name != "config.py")

# argument name -> the defaults config.py declares for a setting of that name
SETTINGS = {
    "threshold": [config.field_default(config.PredictConfig, "threshold")],
    "folds": [config.field_default(config.ExperimentConfig, "folds")],
    "shape": [config.field_default(config.SynthConfig, "shape")],
    "noise": [config.field_default(config.SynthConfig, "noise")],
    "bias": [config.field_default(config.SynthConfig, "bias")],
    "lesion_fraction": [config.field_default(config.SynthConfig, "lesion_fraction")],
    "contrast": [
        config.field_default(config.SynthConfig, "contrast"),
        config.field_default(config.DataConfig, "transplant_contrast"),
    ],
}
CHOICES = {
    name: set(getattr(config, name))
    for name in (
        "WEIGHTINGS",
        "TRANSPLANT_CONTRASTS",
        "NORMS",
        "CHECKPOINT_MODES",
        "PRECISIONS",
        "LR_SCHEDULES",
        "AUGMENTS",
        "NORMALIZATIONS",
        "MIRRORS",
        "RUN_CHECKPOINTS",
    )
}


def _subparsers_of(parser) -> dict:
    import argparse

    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _literal(node):
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return MISSING
    return tuple(value) if isinstance(value, list) else value


def _defaults(tree):
    """(line, argument name, default node) of every function in a module."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = fn.args
            positional = [*a.posonlyargs, *a.args]
            pairs = zip(positional[len(positional) - len(a.defaults) :], a.defaults, strict=True)
            pairs = [
                *pairs,
                *((k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d),
            ]
            for arg, default in pairs:
                yield fn.lineno, arg.arg, default


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(APP)))
def test_no_module_redeclares_a_setting(path):
    tree = ast.parse(path.read_text())
    found = []
    for line, name, default in _defaults(tree):
        value = _literal(default)
        if name in SETTINGS and value in SETTINGS[name]:
            found.append(f"line {line}: {name}={value!r} (config.py declares it)")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            values = _literal(node)
        elif isinstance(node, ast.Dict):
            values = _literal(ast.Tuple(elts=[k for k in node.keys if k], ctx=ast.Load()))
        else:
            continue
        if values is MISSING or not all(isinstance(v, str) for v in values):
            continue
        for name, choices in CHOICES.items():
            if len(values) > 1 and set(values) == choices:
                found.append(f"line {node.lineno}: the choices of config.{name} written again")
    assert not found, found


def test_cli_options_of_config_fields_take_no_default_of_their_own():
    """An option generated from a config field defaults to None (= the config's value);
    an option written by hand must not shadow a field with a default of its own."""
    from fasttversky.app.cli import build_parser
    from fasttversky.app.presets import PRESETS

    flags = {_flag(f.name) for cls, _ in SECTIONS.values() for f in config.cli_fields(cls)}
    quick = PRESETS["quick"].run.train  # the demo trains the quick preset
    for command, parser in _subparsers_of(build_parser()).items():
        for action in parser._actions:
            shared = flags & set(action.option_strings)
            if not shared or action.const is not None:  # (a switch defaults to False)
                continue
            if command == "demo":
                assert action.default == getattr(quick, action.dest), action.dest
            else:
                assert action.default in (None, []), (command, shared, action.default)


def test_config_fields_are_the_cli_defaults():
    """What --help shows as the default is the dataclass field's default."""
    from fasttversky.app.cli import _show, build_parser

    parsers = _subparsers_of(build_parser())
    for command, section in (("synth", "synth"), ("reproduce", "experiment")):
        cls = SECTIONS[section][0]
        by_flag = {s: a for a in parsers[command]._actions for s in a.option_strings}
        for f in config.cli_fields(cls):
            if f.metadata.get("action") == "store_true":
                continue
            shown = _show(config.field_default(cls, f.name))
            assert by_flag[_flag(f.name)].help.endswith(f"[default: {shown}]"), f.name
    assert {f.name for f in fields(config.ExperimentConfig)} == {"folds", "settings", "seeds"}
