"""A first stage taken from another backbone (`pretrain.first_stage_from`), frozen, instead of phase 1.

The LDM trained its autoencoder once and many diffusion models on top of it. Here that makes a UNet recipe
(warm-up, min-SNR, a learning rate) cheap to compare: every candidate starts from the same first stage, and
none pays phase 1 again. The reused first stage is held in the run's identity by the digest of its weights,
and its record names where it came from and the phase-1 seconds it cost there, so the total pretraining
time of the result stays traceable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pathseg.extract.backbone import FirstStage, latent_channels_of, load_first_stage, quiet_diffusers, state_digest

from pathseg.errors import PathsegError
from pathseg.store import PRETRAIN_RECORD


@dataclass
class ReusedFirstStage:
    model: FirstStage
    digest: str
    source: dict = field(default_factory=dict)  # what the record says of it: path, digest, seconds it took there

    def apply_to(self, configs: dict) -> None:
        """The run's model configs with this first stage's class and shapes (the preset's are not used)."""
        configs["first_stage"] = {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}
        configs["first_stage_class"] = type(self.model).__name__


def reuse_first_stage(directory: Path, unet_config: dict) -> ReusedFirstStage:
    directory = Path(directory)
    part = directory / "first_stage"
    if not part.is_dir():
        raise PathsegError(f"pretrain.first_stage_from {directory}: has no first_stage/; name a backbone directory "
                           "(`pathseg pretrain` or `pathseg convert-ldm` output)")
    try:
        with quiet_diffusers():
            model = load_first_stage(part)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as error:
        raise PathsegError(f"pretrain.first_stage_from {part}: {str(error).splitlines()[0]}") from None
    channels = latent_channels_of(dict(model.config))
    if channels != unet_config["in_channels"]:
        raise PathsegError(f"pretrain.first_stage_from {directory}: its latents have {channels} channels and the "
                           f"preset's UNet takes {unet_config['in_channels']}; use a first stage of the same preset")
    model.eval().requires_grad_(False)
    digest = state_digest([model])
    source = {"path": str(directory.resolve()), "weights_digest": digest}
    try:
        record = json.loads((directory / PRETRAIN_RECORD).read_text())
        source["seconds"] = float(record["seconds"]["first_stage"])
        source["first_stage_quality"] = record.get("first_stage_quality")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        source["seconds"] = None  # converted, or made before records held it
    return ReusedFirstStage(model, digest, source)
