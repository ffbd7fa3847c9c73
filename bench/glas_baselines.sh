#!/bin/bash
# issue 24 item 6: z0 and unet-resnet18 (2 epochs, from scratch) beside the semantic conv diffusion cell, 3 seeds

cd "${WORKDIR:-.}"
pathseg ablate --dataset glas --data-root ../shared/data/glas --backbone tiny --store glas-tiny-t50.zarr \
  --timesteps 50 --blocks up1,up2.2,up3.2 --grid all --seeds 3 --epochs 5 \
  --baselines z0,unet-resnet18 --baseline-epochs 2 \
  --set "instances.marker_thresholds=[0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9]" \
  --set "instances.min_areas=[0,100,250,500,1000,1500,2000,3000,4000]" \
  --set evaluate.overlays=6 -q
