#!/bin/bash
# Issue 25 (docs/pretraining.md, "The full grid" and "A stronger low-pass term"): a KL first stage with the low-pass
# term, 50 UNet steps on it, a grid of cells plus z0 (the budget curve script), then conv and conv-image on t50 with
# all three blocks (5 epochs, 3 seeds: the budget curve's protocol). Run from anywhere; WORKDIR is a folder beside
# ../shared/data/glas that holds the runs.
#   third pass:  WORKDIR=<folder> bench/glas_lowpass_grid.sh
#                (LOWPASS=2; the full 3 timesteps x 3 blocks grid, conv, 3 epochs; z0 also under conv-image)
#   fourth pass: WORKDIR=<folder> LOWPASS=8 TIMESTEPS=50 GRID=all EPOCHS=5 HEAD_Z0=no bench/glas_lowpass_grid.sh
# Usage needs pathseg and its python on PATH (e.g. the venv activated).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "${WORKDIR:-.}"
LOWPASS="${LOWPASS:-2}"
GRIDS=(--set "instances.marker_thresholds=[0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9]"
       --set "instances.min_areas=[0,100,250,500,1000,1500,2000,3000,4000]")
[ -f "pt/fs-kl-lp$LOWPASS-300/pretrain.json" ] || bash "$HERE/glas_first_stage.sh" "pt/fs-kl-lp$LOWPASS-300" 300 \
  --set pretrain.first_stage=kl --set pretrain.lr_first_stage=0.0004 --set pretrain.first_stage_whole_fraction=0.25 \
  --set "pretrain.lowpass_weight=$LOWPASS"
python "$HERE/glas_budget_curve.py" --workdir . --first-stage "pt/fs-kl-lp$LOWPASS-300" --out "pt/unet-lp$LOWPASS" \
  --budgets 50 --timesteps "${TIMESTEPS:-50,150,250}" --grid "${GRID:-each}" --epochs "${EPOCHS:-3}"
if [ "${HEAD_Z0:-yes}" = yes ]; then Z0=(--baselines z0); else Z0=(--no-baseline); fi
pathseg ablate --dataset glas --data-root ../shared/data/glas --backbone "pt/unet-lp$LOWPASS-50" --timesteps 50 \
  --blocks up1,up2.2,up3.2 --store "pt/unet-lp$LOWPASS-50.zarr" --grid all --set head.kind=conv,conv-image --seeds 3 \
  --epochs 5 "${Z0[@]}" "${GRIDS[@]}" -q
