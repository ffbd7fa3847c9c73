"""`extract.compile`: the same extraction with the UNet under torch.compile, in a child process.

Compiling the paper-sized UNet is one call that cannot be interrupted and may take longer than the part's
time, so it runs in a child (`gpu_suite.py --child-compile SPEC`) that the suite kills at the limit. The
child writes its progress to a JSON file after every step, so a killed child still says how far it got:
still compiling after so many seconds, or so many batches done.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpu_suite.measure import Clock
from gpu_suite.report import Part, ratio
from gpu_suite.workspace import Workspace

SCRIPT = Path(__file__).resolve().parents[1] / "gpu_suite.py"


def measure_compiled(ws: Workspace, clock: Clock, part: Part) -> None:
    """Run the child for at most the part's time; report compile time and steady tiles/s against eager."""
    if not ws.plan.compile:
        part.stop("skipped: quick mode (torch.compile of the UNet takes minutes; the full mode measures it)")
        return
    ws.write_data()
    spec_path, progress_path, log_path = (ws.root / name for name in ("compile-spec.json", "compile-progress.json",
                                                                      "compile.log"))
    spec_path.write_text(json.dumps({"workspace": ws.spec(), "progress": str(progress_path)}))
    begun = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen([sys.executable, str(SCRIPT), "--child-compile", str(spec_path)], stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = child.wait(timeout=max(1.0, clock.left()))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the child and anything it started (inductor's workers)
            child.wait()
            code = None
    waited = time.perf_counter() - begun
    progress: dict[str, Any] = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    part.details.update({"child_s": round(waited, 2), "progress": progress, "exit_code": code})
    calls = progress.get("calls", [])
    stage = progress.get("stage", "starting")
    if code is None:
        part.stop(f"stopped at limit after {waited:.0f} s: {stage}" + (f", {len(calls)} batches done" if calls else ""))
    elif code != 0:
        tail = log_path.read_text()[-2000:]
        part.details["log_tail"] = tail
        last = tail.strip().splitlines()[-1] if tail.strip() else f"exit code {code}"
        part.stop(f"failed: the compile child ended with exit code {code}: {last}")
    steady = calls[1:]
    steady_tps = sum(n for _, n in steady) / sum(s for s, _ in steady) if steady else None
    whole = progress.get("whole_s")
    part.add("compiled: first Extractor.features call", calls[0][0] if calls else None, "s",
             "compilation + one batch")
    part.add("compiled: Extractor.features, steady", steady_tps, "tiles/s", f"all calls but the first ({len(calls)})")
    part.add("eager: Extractor.features, steady", ws.eager_features_tps, "tiles/s", "the extraction part's run")
    part.add("ratio: compiled / eager, steady", ratio(steady_tps, ws.eager_features_tps), "x", "")
    part.add("compiled run_extraction, whole command", ws.n_tiles / whole if whole else None, "tiles/s",
             "incl. compilation")


def child_main(spec_path: str) -> None:
    """In the child: one `run_extraction` with extract.compile, its progress written after every step."""
    spec = json.loads(Path(spec_path).read_text())
    progress_path = Path(spec["progress"])
    state: dict[str, Any] = {"stage": "importing pathseg", "calls": []}
    started = time.perf_counter()

    def report(stage: str | None = None) -> None:
        if stage is not None:
            state["stage"] = stage
        state["elapsed_s"] = round(time.perf_counter() - started, 2)
        partial = progress_path.with_name(progress_path.name + ".partial")
        partial.write_text(json.dumps(state))
        partial.replace(progress_path)

    report()
    from pathseg.extract import extractor as extractor_module
    from pathseg.extract import runner

    ws = Workspace.from_spec(spec["workspace"])
    original = extractor_module.Extractor.features

    def features(self: Any, tiles: Any, noise: Any, *args: Any, **kwargs: Any) -> Any:
        if not state["calls"]:
            report("compiling (the first batch had not finished)")
        begun = time.perf_counter()
        out = original(self, tiles, noise, *args, **kwargs)
        state["calls"].append((round(time.perf_counter() - begun, 4), len(noise)))
        report("running compiled batches")
        return out

    extractor_module.Extractor.features = features
    report("building the backbone")
    begun = time.perf_counter()
    runner.run_extraction(ws.config({"extract.compile": True}), show_progress=False,
                          store_path=ws.root / "store-compiled.zarr")
    state["whole_s"] = round(time.perf_counter() - begun, 3)
    report("done")

