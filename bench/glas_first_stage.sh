#!/bin/bash
# issue 25 item 1: the first stage alone on GlaS train, measured on whole val tiles at extraction size (256 px):
# pretrain.json's first_stage_quality (PSNR, SSIM, border-band PSNR against the interior) and its seconds.
# A 2-step UNet phase only completes the backbone directory. Usage: bench/glas_first_stage.sh OUT [STEPS] [--set ...]
set -euo pipefail
cd "${WORKDIR:-.}"
OUT="$1"; STEPS="${2:-600}"; shift 2 || shift $#
pathseg pretrain --dataset glas --data-root ../shared/data/glas --preset tiny --out "$OUT" \
  --steps $((STEPS + 2)) --set pretrain.first_stage_steps="$STEPS" \
  --set pretrain.samples=0 --set pretrain.checkpoint_every=100 --set pretrain.quality_tiles=32 "$@"
python - "$OUT" <<'PY'
import json, sys
record = json.load(open(f"{sys.argv[1]}/pretrain.json"))
print(json.dumps({"first_stage_quality": record["first_stage_quality"], "seconds": record["seconds"],
                  "steps": record["steps"], "final_losses": record["final_losses"]}, indent=1))
PY
