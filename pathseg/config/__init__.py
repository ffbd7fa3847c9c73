"""The pipeline's settings: `sections` holds every section as a pydantic model (one YAML drives both stages,
and every key is checked); `files` reads a config from YAML and `--set` overrides. These are the names the
stages use.
"""

from pathseg.config.files import config_to_dict, load_config, parse_override, with_absolute_paths
from pathseg.config.sections import (
    BCSS_FIVE_CLASSES,
    CODE_PREFIX,
    PRESET_BACKBONES,
    BCSSOptions,
    ConditioningConfig,
    DatasetConfig,
    ExtractConfig,
    FolderOptions,
    HeadConfig,
    InstancesConfig,
    PipelineConfig,
    PretrainConfig,
    SyntheticOptions,
    TrainConfig,
)

__all__ = [
    "BCSS_FIVE_CLASSES", "CODE_PREFIX", "PRESET_BACKBONES", "BCSSOptions", "ConditioningConfig", "DatasetConfig",
    "ExtractConfig", "FolderOptions", "HeadConfig", "InstancesConfig", "PipelineConfig", "PretrainConfig",
    "SyntheticOptions", "TrainConfig", "config_to_dict", "load_config", "parse_override", "with_absolute_paths",
]
