"""YAML read the YAML 1.2 way for booleans: only true/false are booleans.

PyYAML follows YAML 1.1, where `off`, `on`, `yes`, `no` (and their capitalisations) are booleans. That
silently turns the documented `extract.autocast: off` into False, and a TCGA site code such as `ON` or
`NO` into True/False. Settings files here are written by people for whom those are words, so they stay
strings; pydantic still reads "yes"/"no"/"on"/"off" as booleans where a setting is a boolean.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class SettingsLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` (data only: no Python objects are ever built) with YAML 1.2 booleans."""


SettingsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
SettingsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_settings_yaml(text: str) -> Any:
    return yaml.load(text, Loader=SettingsLoader)  # noqa: S506 - a SafeLoader subclass
