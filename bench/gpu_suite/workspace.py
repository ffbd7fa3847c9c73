"""The sizes of a full and a quick run, and the data, store and head run that the parts share.

The data is a folder dataset of PNG images (the synthetic generator's H&E-like images, a few generated and
written under many names) with an mpp, so that extraction reads ordinary image files as a user's run would
(generating synthetic images on the fly costs more CPU per tile than a GPU spends on the paper network), and
so that a head trained on its store can predict on a slide. The store the extraction part writes is reused by
the head part, and the head part's conv run by predict; a part whose predecessor stopped makes its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gpu_suite.measure import Clock, Patches
from pathseg.config import PipelineConfig, load_config
from pathseg.datasets.synthetic import generate

MPP = 0.5  # microns per pixel of the images and of the slide: the slide is read at its level 0


@dataclass(frozen=True)
class Plan:
    """Everything a mode fixes: the backbone and data sizes of each part (the time limits come from --budget-s)."""

    mode: str
    backbone: str  # extraction, head and predict
    images: int  # folder images, each `image_side` square, cut into tiles of `tile_size` at stride `tile_size`
    image_side: int
    distinct_images: int  # generated ones; the rest are copies under other names (content does not change speed)
    tile_size: int
    extract_batch: int | None  # None: extract.batch_size's default, the batch a user runs
    tiles_per_shard: int | None
    probe_cap_tiles: int  # the largest batch the memory probe tries
    head_kinds: tuple[str, ...] = ("conv", "linear", "pixel-mlp")
    head_epochs: int = 2  # the first warms up; the last is timed
    head_batch: int | None = None
    slide_side: int = 3072
    pretrain_presets: tuple[str, ...] = ("tiny", "small", "paper")
    pretrain_steps: tuple[int, int] = (10, 10)  # first-stage steps, UNet steps
    pretrain_tile: int = 256
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)
    compile: bool = True


FULL = Plan(mode="full", backbone="paper-random", images=64, image_side=512, distinct_images=8, tile_size=256,
            extract_batch=None, tiles_per_shard=None, probe_cap_tiles=2048)
QUICK = Plan(mode="quick", backbone="tiny", images=4, image_side=128, distinct_images=2, tile_size=64,
             extract_batch=4, tiles_per_shard=4, probe_cap_tiles=16, head_batch=4, slide_side=256,
             pretrain_presets=("tiny",), pretrain_steps=(2, 2), pretrain_tile=64,
             pretrain_overrides={"pretrain.unet_width": 8, "pretrain.first_stage_width": 8,
                                 "pretrain.first_stage_crop": 32, "pretrain.batch_size": 4},
             compile=False)


class Workspace:
    """A working directory, the device, and the artefacts one part leaves for the next."""

    def __init__(self, root: Path, device: torch.device, plan: Plan) -> None:
        self.root = Path(root)
        self.device = device
        self.plan = plan
        self.data = self.root / "data"
        self.store: Path | None = None  # an extracted store, once a part has one
        self.conv_run: Path | None = None  # a conv head fitted on it
        self.eager_features_tps: float | None = None  # Extractor.features, steady, uncompiled: compile's reference

    @property
    def n_tiles(self) -> int:
        per_side = self.plan.image_side // self.plan.tile_size
        return self.plan.images * per_side * per_side

    def write_data(self) -> None:
        """The folder dataset, once: every image in the train split (the suite measures speed, not scores)."""
        if (self.data / "classes.yaml").exists():
            return
        (self.data / "images").mkdir(parents=True, exist_ok=True)
        (self.data / "masks").mkdir(exist_ok=True)
        side = self.plan.image_side
        distinct = [generate(0, "train", k, side, side) for k in range(self.plan.distinct_images)]
        for index in range(self.plan.images):
            rgb, instances = distinct[index % len(distinct)]
            Image.fromarray(rgb).save(self.data / "images" / f"img{index:04d}.png", compress_level=1)
            Image.fromarray((instances > 0).astype(np.uint8)).save(self.data / "masks" / f"img{index:04d}.png")
        (self.data / "classes.yaml").write_text("classes: [background, gland]\n")

    def config(self, overrides: dict[str, Any] | None = None) -> PipelineConfig:
        """The pipeline config every part starts from: this data, the plan's backbone and tiles, the device, bf16."""
        p = self.plan
        values: dict[str, Any] = {
            "cache_dir": str(self.root / "cache"),
            "runs_dir": str(self.root / "runs"),
            "dataset.name": "folder",
            "dataset.root": str(self.data),
            "dataset.folder.mpp": MPP,
            "dataset.folder.val_fraction": 0.0,
            "dataset.folder.test_fraction": 0.0,
            "backbone.name": p.backbone,
            "tiling.tile_size": p.tile_size,
            "tiling.stride": p.tile_size,
            "extract.device": str(self.device),
            "extract.autocast": "bfloat16",
            "train.device": str(self.device),
            "pretrain.device": str(self.device),
        }
        if p.extract_batch is not None:
            values["extract.batch_size"] = p.extract_batch
        if p.tiles_per_shard is not None:
            values["extract.tiles_per_shard"] = p.tiles_per_shard
        if p.head_batch is not None:
            values["train.batch_size"] = p.head_batch
        values.update(overrides or {})
        return load_config(None, values)

    def spec(self) -> dict[str, Any]:
        """What a child process needs to rebuild this workspace (the compile part runs in one)."""
        return {"root": str(self.root), "device": str(self.device), "plan": asdict(self.plan)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Workspace:
        plan = dict(spec["plan"])
        for key in ("head_kinds", "pretrain_presets", "pretrain_steps"):
            plan[key] = tuple(plan[key])
        return cls(Path(spec["root"]), torch.device(spec["device"]), Plan(**plan))


def ensure_store(ws: Workspace, clock: Clock) -> Path:
    """The extraction part's store, or a fresh extraction of this data when that part did not leave one (stopped
    with LimitReached when the calling part's time is up)."""
    if ws.store is None:
        from pathseg.extract import runner

        ws.write_data()
        with Patches() as patches:
            patches.progress(runner, clock, None, ws.device)
            ws.store = runner.run_extraction(ws.config(), show_progress=False,
                                             store_path=ws.root / "store-own.zarr").store
    return ws.store


def ensure_conv_run(ws: Workspace, clock: Clock) -> Path:
    """The head part's conv run, or a one-epoch conv head fitted here on the shared store."""
    if ws.conv_run is None:
        from pathseg.train_head import fit

        store = ensure_store(ws, clock)
        config = ws.config({"head.kind": "conv", "train.epochs": 1})
        with Patches() as patches:
            patches.progress(fit, clock, None, ws.device)
            ws.conv_run = fit.fit_head(config, store_path=store, run_dir=ws.root / "runs" / "conv-own",
                                       show_progress=False, announce=False).run_dir
    return ws.conv_run

