"""The conditioning encoder listed in `extract.encoders` runs once per tile for both uses, and changes nothing.

Sharing is an optimisation only: the diffusion arrays must equal those of a store extracted without encoders,
and the encoder maps those of the separate encoder pass; other weights, or another precision, fall back to it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pathseg.extract import hipt
from pathseg.extract.backbone import SSLProjector
from pathseg.extract.conditioning import build_conditioning
from pathseg.extract.runner import run_extraction
from pathseg.extract.shared_encoder import shareable_encoder

from pathseg.config import ConditioningConfig
from pathseg.store import FeatureStore
from tests.conftest import small_config
from tests.extract.test_hipt import RefViT, dino_checkpoint

BLOCK = f"enc:{hipt.NAME}"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hipt") / "vit256_small_dino.pth"
    torch.save(dino_checkpoint(RefViT(), ""), path)
    return path


def ssl_config(tmp, weights, **overrides):
    return small_config(tmp, **{"conditioning.mode": "ssl", "conditioning.encoder": hipt.NAME,
                                "conditioning.encoder_weights": str(weights), "extract.timesteps": [50],
                                "extract.blocks": ["up1"], "dataset.synthetic.train": 2, "dataset.synthetic.val": 1,
                                "dataset.synthetic.test": 1, "dataset.synthetic.height": 128,
                                "dataset.synthetic.width": 140, "extract.tiles_per_shard": 2, **overrides})


def test_one_forward_per_tile_gives_both_the_context_and_the_maps(tmp_path, weights, monkeypatch):
    forwards = []
    monkeypatch.setattr(hipt.HIPTViT, "forward", lambda self, x: forwards.append(x) or 1 / 0)
    with_maps = ssl_config(tmp_path / "a", weights, **{"extract.encoders": [hipt.NAME],
                                                       f"extract.encoder_weights.{hipt.NAME}": str(weights),
                                                       "extract.encoder_layers": [3]})
    summary = run_extraction(with_maps, show_progress=False)
    assert not forwards  # the conditioning took its CLS embedding from the maps' forward
    assert sorted(summary.computed_arrays) == ["encoders/hipt_vit_s16", "encoders/hipt_vit_s16@3", "t0050/up1"]
    shared = FeatureStore.open(summary.store)
    records = shared.attrs["encoders"]
    assert records[BLOCK]["shared"] is True and records[BLOCK]["seconds_per_tile"] > 0
    assert set(shared.attrs["feature_costs"]) == {"t0050/up1"}
    monkeypatch.undo()

    plain = run_extraction(ssl_config(tmp_path / "b", weights), show_progress=False)
    apart = FeatureStore.open(plain.store)
    np.testing.assert_array_equal(shared.feature_array(50, "up1")[:], apart.feature_array(50, "up1")[:])

    extended = run_extraction(with_maps, show_progress=False, store_path=plain.store)
    assert extended.computed_arrays == ["encoders/hipt_vit_s16", "encoders/hipt_vit_s16@3"]
    apart = FeatureStore.open(plain.store)
    assert "shared" not in apart.attrs["encoders"][BLOCK]
    for block in (BLOCK, f"{BLOCK}@3"):
        np.testing.assert_allclose(shared.feature_array(-1, block)[:].astype(np.float32),
                                   apart.feature_array(-1, block)[:].astype(np.float32), rtol=2e-3, atol=2e-3)
    assert run_extraction(with_maps, show_progress=False).nothing_to_do


@pytest.mark.parametrize("case", ["random weights", "bfloat16", "other normalisation", "not listed"])
def test_only_the_same_model_in_float32_is_shared(weights, tmp_path, case):
    config = ssl_config(tmp_path, weights, **{"extract.encoders": [hipt.NAME],
                                              f"extract.encoder_weights.{hipt.NAME}": str(weights)})
    conditioning = build_conditioning(config.conditioning, SSLProjector())
    assert shareable_encoder(config, conditioning, "float32", ()) is not None
    precision = "bfloat16" if case == "bfloat16" else "float32"
    if case == "random weights":
        config.extract.encoder_weights[hipt.NAME] = "random"
    elif case == "other normalisation":
        config.extract.encoder_normalisation[hipt.NAME] = "imagenet"
    elif case == "not listed":
        config.extract.encoders = []
    assert shareable_encoder(config, conditioning, precision, ()) is None


def test_the_shared_embedding_is_the_conditioning_embedding(weights):
    encoder = build_conditioning(ConditioningConfig(mode="ssl", encoder=hipt.NAME, encoder_weights=weights),
                                 SSLProjector()).patch
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        embedding, maps = encoder.module.embed_and_maps(x, [-1, 2])
        assert torch.equal(embedding, encoder.module(x))
        for mine, theirs in zip(maps, encoder.module.token_maps(x, [-1, 2]), strict=True):
            assert torch.equal(mine, theirs)
