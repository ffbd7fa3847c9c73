"""Text files other people made (settings and class YAML, CSV tables, JSON records), read as data only.

Datasets, stores and run directories are shared between people, so nothing in them may run code or take
pathseg down with a traceback: YAML goes through a `SafeLoader` (a `!!python/...` tag is refused, never
built), JSON through `json`, CSV through `csv`, and every way a file can be unreadable (not UTF-8,
malformed, nested too deep, a folder where a file should be) ends in one `PathsegError` line that names
the file and what to do about it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml

from pathseg.errors import PathsegError
from pathseg.loading.settings_yaml import load_settings_yaml


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__


def read_text(path: Path | str, fix: str) -> str:
    """UTF-8 text (a byte-order mark, as spreadsheet programs write, is dropped); `fix` says what to do."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise PathsegError(f"{path}: not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}); "
                           f"{fix}") from None
    except OSError as error:
        raise PathsegError(f"{path}: cannot be read ({error.strerror or _first_line(error)}); {fix}") from None


def parse_yaml(text: str, source: str, fix: str, *, settings: bool = True) -> Any:
    """YAML through a safe loader: tags that would build Python objects are refused in one line, never run."""
    try:
        return load_settings_yaml(text) if settings else yaml.safe_load(text)
    except yaml.constructor.ConstructorError as error:
        if "python/" in str(error):
            raise PathsegError(f"{source}: YAML tags that build Python objects ({_tag(error)}) are not read; "
                               f"{fix}") from None
        raise PathsegError(f"{source} is not valid YAML ({_first_line(error)}); {fix}") from None
    except yaml.YAMLError as error:
        raise PathsegError(f"{source} is not valid YAML ({_first_line(error)}); {fix}") from None
    except RecursionError:
        raise PathsegError(f"{source}: YAML nested too deep to be a settings file; {fix}") from None


def _tag(error: yaml.constructor.ConstructorError) -> str:
    text = str(error)
    start = text.find("tag:yaml.org,2002:")
    return text[start:].split("'")[0].replace("tag:yaml.org,2002:", "!!") if start >= 0 else "!!python/..."


def read_yaml(path: Path | str, fix: str, *, settings: bool = True) -> Any:
    """A YAML file as plain data (`settings`: YAML 1.2 booleans, see `settings_yaml`)."""
    return parse_yaml(read_text(path, fix), str(path), fix, settings=settings)


def read_json(path: Path | str, fix: str) -> Any:
    path = Path(path)
    try:
        return json.loads(read_text(path, fix))
    except json.JSONDecodeError as error:
        raise PathsegError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}); {fix}") from None
    except RecursionError:
        raise PathsegError(f"{path}: JSON nested too deep; {fix}") from None


def read_json_object(path: Path | str, fix: str) -> dict:
    """A JSON file whose top level must be an object (records, configs)."""
    value = read_json(path, fix)
    if not isinstance(value, dict):
        raise PathsegError(f"{path}: expected a JSON object at the top level, found {type(value).__name__}; {fix}")
    return value


def read_csv_rows(path: Path | str, fix: str) -> list[list[str]]:
    """Every row of a CSV file (quotes, embedded commas and a spreadsheet's byte-order mark handled by `csv`)."""
    path = Path(path)
    text = read_text(path, fix)
    if "\x00" in text:
        raise PathsegError(f"{path}: holds NUL bytes, so it is not a CSV table; {fix}")
    try:
        return list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as error:
        raise PathsegError(f"{path}: not a readable CSV table ({_first_line(error)}); {fix}") from None


def escapes_folder(name: str) -> bool:
    """True unless `name` is a plain file name that stays inside its folder when joined to it: no separators,
    no `.`/`..`, no control characters. Names read from files (split tables, store image tables) are checked
    with it before they become paths."""
    return (not name or name in (".", "..") or "/" in name or "\\" in name
            or any(ord(char) < 32 for char in name))


def read_safetensors(path: Path | str, fix: str) -> dict:
    """Tensors of a `.safetensors` file (a format that holds nothing but tensors); a damaged file fails in one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise PathsegError(f"{path}: not a readable safetensors file ({_first_line(error)}); {fix}") from None
