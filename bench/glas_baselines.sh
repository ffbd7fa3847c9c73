#!/bin/bash
# issue 24 item 6: the paper-format table on GlaS (val chooses, test A reported, 3 seeds). Beside the tiny diffusion
# cells: z0, the conditioning encoder's own maps (enc:hipt_vit_s16, added by bench/glas_encoder_maps.sh), and the
# paper's supervised networks from scratch: unet-resnet18 for 2 epochs, fcn8-vgg16 for 1 (about 19 min per epoch
# on this 2-core CPU). Finished runs are reused, so rerunning after a stop resumes.
set -euo pipefail
cd "${WORKDIR:-.}"
pathseg ablate --dataset glas --data-root ../shared/data/glas --backbone tiny --store glas-tiny-t50.zarr \
  --timesteps 50 --blocks up1,up2.2,up3.2 --grid all --seeds 3 --epochs 5 \
  --baselines z0,enc:hipt_vit_s16,unet-resnet18,fcn8-vgg16 --baseline-epochs 2,fcn8-vgg16=1 \
  --set "instances.marker_thresholds=[0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9]" \
  --set "instances.min_areas=[0,100,250,500,1000,1500,2000,3000,4000]" \
  --set evaluate.overlays=6 -q
