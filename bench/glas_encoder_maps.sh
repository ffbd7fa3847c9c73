#!/bin/bash
# issue 24 item 6: the paper's conditioning encoder (HIPT ViT-S/16) as enc:hipt_vit_s16 in the GlaS store of
# bench/glas_baselines.sh. No HIPT weight file is on this machine, so its weights are random (seeded, and marked
# random in the store and every report); with the real file pass --set extract.encoder_weights.hipt_vit_s16=PATH.
set -euo pipefail
cd "${WORKDIR:-.}"
WEIGHTS="${HIPT_WEIGHTS:-random}"
pathseg extract --dataset glas --data-root ../shared/data/glas --backbone tiny --timesteps 50 \
  --blocks up1,up2.2,up3.2 --store glas-tiny-t50.zarr --encoders hipt_vit_s16 \
  --set "extract.encoder_weights.hipt_vit_s16=$WEIGHTS" -q
