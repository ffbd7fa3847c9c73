"""Does `extract.compile` compile the UNet once, or recompile and break its graph on every batch?

Runs a small extraction (synthetic images, the given backbone, compile on) in a child process under
`TORCH_LOGS=recompiles,graph_breaks` and counts what torch logs: recompilations and graph breaks, with
the first reason of each kind. Works on CPU (inductor needs a C compiler) and on a GPU.

    python bench/compile_check.py --backbone tiny --batches 6 --json bench/results/compile_check.json
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import add_output_options, save_json, start

CHILD = """
import sys
from pathseg.config import load_config
from pathseg.extract.runner import run_extraction
work, backbone, batches, timesteps, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
config = load_config(None, {
    "cache_dir": work, "backbone.name": backbone, "dataset.synthetic.train": batches, "dataset.synthetic.val": 0,
    "dataset.synthetic.test": 0, "dataset.synthetic.height": 128, "dataset.synthetic.width": 128,
    "tiling.tile_size": 128, "tiling.stride": 128, "extract.batch_size": 1, "extract.tiles_per_shard": 1,
    "extract.timesteps": [int(t) for t in timesteps.split(",")], "extract.compile": True, "extract.device": device,
})
summary = run_extraction(config, show_progress=False)
print("tiles", summary.computed_tiles)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--batches", type=int, default=6, help="UNet batches (one 128 px tile each)")
    parser.add_argument("--timesteps", default="50,150,250")
    parser.add_argument("--device", default="cpu")
    add_output_options(parser, "the store")
    args = parser.parse_args()
    machine = start()
    with tempfile.TemporaryDirectory() as work:
        environ = {**os.environ, "TORCH_LOGS": "recompiles,graph_breaks"}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD, work, args.backbone, str(args.batches), args.timesteps,
                               args.device], capture_output=True, text=True, env=environ, cwd=Path.cwd())
        seconds = time.perf_counter() - started
    log = done.stdout + done.stderr
    if done.returncode != 0:
        print(log[-4000:])
        raise SystemExit(f"the extraction failed (exit {done.returncode})")
    recompiles = [line for line in log.splitlines() if re.search(r"[Rr]ecompiling function", line)]
    breaks = [line for line in log.splitlines() if re.search(r"[Gg]raph break", line)]
    forwards = args.batches * len(args.timesteps.split(","))
    print(f"{forwards} UNet forwards ({args.batches} batches x {len(args.timesteps.split(','))} timesteps), "
          f"{seconds:.0f} s including compilation")
    for what, lines in (("recompilations", recompiles), ("graph breaks", breaks)):
        print(f"{what} logged: {len(lines)}" + (f"; first: {lines[0].strip()[:300]}" if lines else ""))
    save_json(args.json, {"machine": machine, "args": vars(args), "seconds": seconds, "forwards": forwards,
                          "recompiles": len(recompiles), "graph_breaks": len(breaks),
                          "first_recompile": recompiles[:1], "first_graph_break": breaks[:1]})


if __name__ == "__main__":
    main()
