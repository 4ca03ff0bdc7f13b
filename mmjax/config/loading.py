"""Loading configs: `get_config(arg)` files, command-line overrides, and the config saved in a workdir.

A key that is not in `base_config()` is a typo and is reported with the nearest valid key; a value of the
wrong type names its key. Nothing here validates values: see `mmjax.config.validation`.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import traceback
from collections.abc import Sequence
from typing import Any

import ml_collections

from mmjax import storage
from mmjax.config.defaults import base_config
from mmjax.errors import ConfigError, NotAWorkdirError


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Imports `path` (a Python file defining `get_config(arg=None)`) and returns its locked config."""
    if ":" in path and not os.path.exists(path):  # local: a config file is imported as a module
        path, arg = path.split(":", 1)
    if not os.path.isfile(path):  # local: as above
        raise ConfigError([f"--config: file {path!r} does not exist"])
    spec = importlib.util.spec_from_file_location("mmjax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as error:  # the user's file failed: name the file, its line and what to do
        raise ConfigError([_config_file_problem(path, error, "importing it")]) from error
    if not hasattr(module, "get_config"):
        raise ConfigError([f"--config: {path!r} defines no get_config(arg) function"])
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError([_config_file_problem(path, error, "running its get_config()")]) from error
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError([f"--config: get_config() in {path!r} must return an ml_collections.ConfigDict"])
    return conform(config)


def _config_file_problem(path: str, error: Exception, doing: str) -> str:
    """One line for an exception raised by a config file: the file and line, the error, and what to do."""
    if isinstance(error, SyntaxError) and error.filename == path:
        column = f", column {error.offset}" if error.offset else ""
        return (f"--config: syntax error in {path} line {error.lineno}{column}: {error.msg}; fix the file")
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == path]
    where = f"{path} line {frames[-1].lineno}" if frames else path
    what = f"{type(error).__name__}: {error}"
    if isinstance(error, ImportError):
        missing = f"install {error.name!r} or " if getattr(error, "name", None) else ""
        return f"--config: {where} failed to import ({what}); {missing}fix the import"
    return f"--config: {where} raised {what} while {doing}; fix the file"


def conform(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Copies `config` onto `base_config()`: unknown keys are errors (with a suggestion)."""
    base = base_config()
    problems: list[str] = []
    _merge(base, config.to_dict(), "", problems)
    if problems:
        raise ConfigError(problems)
    base.lock()
    return base



def load_workdir_config(workdir: str, saved: dict | None = None) -> ml_collections.ConfigDict:
    """The config of a workdir (`W/config.json`, or `saved`, e.g. the copy in a checkpoint), conformed, with a
    relative `model.text.tokenizer_path` that names a file inside the workdir made absolute (`mmjax convert`
    writes its merges file as 'bpe_merges.txt', so a workdir stays loadable after it is moved); other relative
    paths stay relative to the current directory, as when the run was started. Unlocked.

    Raises FileNotFoundError naming the workdir when it has no config.json and `saved` is None.
    """
    if saved is None:
        path = storage.join(workdir, "config.json")
        try:
            text = storage.read_text(path)
        except FileNotFoundError:
            raise NotAWorkdirError(f"{workdir!r} is not an mmjax workdir: no config.json in it; pass the "
                                   f"--workdir of a training run (or of `mmjax convert`)") from None
        try:
            saved = json.loads(text)
        except ValueError as error:  # truncated or damaged
            raise ConfigError([f"{path} is damaged (not valid JSON: {error}); restore it: `mmjax train` with "
                               f"the run's --config writes it again"]) from error
    config = conform(ml_collections.ConfigDict(saved))
    config.unlock()
    path = config.model.text.tokenizer_path
    inside = storage.join(storage.absolute(workdir), path) if path else ""
    if path and not storage.is_url(path) and not os.path.isabs(os.path.expanduser(path)) and storage.isfile(inside):
        config.model.text.tokenizer_path = inside
    return config


def _merge(dst: ml_collections.ConfigDict, src: dict, prefix: str, problems: list[str]) -> None:
    for key, value in src.items():
        full = f"{prefix}{key}"
        if key not in dst:
            problems.append(_unknown_key_message(full, dst, prefix))
            continue
        if isinstance(dst[key], ml_collections.ConfigDict):
            if not isinstance(value, dict):
                problems.append(f"{full}: expected a section (dict), got {type(value).__name__}")
                continue
            _merge(dst[key], value, full + ".", problems)
            continue
        try:
            dst[key] = _coerce(dst[key], value, full)
        except (TypeError, ValueError) as e:
            problems.append(str(e))


def _unknown_key_message(full: str, section: ml_collections.ConfigDict, prefix: str) -> str:
    known = [f"{prefix}{k}" for k in section.keys()]
    close = difflib.get_close_matches(full, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys here: {', '.join(sorted(known))}"
    return f"unknown config key '{full}'{hint}"


def _field_type(config: ml_collections.ConfigDict, key: str):
    ref = config.get_ref(key)
    return ref.get_type()


def _coerce(current: Any, value: Any, key: str) -> Any:
    """Returns `value` converted to the type of the default `current`, or raises naming `key`."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        raise TypeError(f"{key}: expected true/false, got {value!r}")
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise TypeError(f"{key}: expected an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise TypeError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(current, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{key}: expected a list, got {value!r}")
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies `config.a.b=value` strings (the `--config.a.b=value` flags, without the dashes).

    Values are parsed as Python literals when possible (`2`, `0.5`, `True`, `(1, 2)`), otherwise kept as
    strings. Every unknown key or wrongly-typed value is reported together.
    """
    problems: list[str] = []
    config.unlock()
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected --config.KEY=VALUE")
            continue
        dotted, raw = item.split("=", 1)
        dotted = dotted.removeprefix("config.")
        value = _parse_literal(raw)
        parts = dotted.split(".")
        section = config
        prefix = ""
        ok = True
        for p in parts[:-1]:
            if p not in section or not isinstance(section[p], ml_collections.ConfigDict):
                problems.append(_unknown_key_message(prefix + p, section, prefix))
                ok = False
                break
            section = section[p]
            prefix += p + "."
        if not ok:
            continue
        leaf = parts[-1]
        if leaf not in section or isinstance(section[leaf], ml_collections.ConfigDict):
            problems.append(_unknown_key_message(dotted, section, prefix))
            continue
        current = section[leaf]
        if current is None:
            ftype = _field_type(section, leaf)
            if ftype is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if raw.lower() in ("none", "null"):
                value = None
            if value is not None and ftype is not None and not isinstance(value, ftype):
                problems.append(f"{dotted}: expected {ftype.__name__}, got {raw!r}")
                continue
        elif isinstance(current, str):
            value = raw  # strings are taken verbatim: `--config.data.name=digits`
        try:
            section[leaf] = _coerce(current, value, dotted)
        except (TypeError, ValueError) as e:
            problems.append(str(e))
    config.lock()
    if problems:
        raise ConfigError(problems)
    return config


def _parse_literal(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if raw.lower() in ("none", "null"):
        return None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments of a command line."""
    rest, overrides = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" in arg:
                overrides.append(arg[2:])
            elif i + 1 < len(argv):
                overrides.append(f"{arg[2:]}={argv[i + 1]}")
                i += 1
            else:
                overrides.append(arg[2:])
        else:
            rest.append(arg)
        i += 1
    return rest, overrides
