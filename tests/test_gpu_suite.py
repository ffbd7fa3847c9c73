"""bench/gpu_suite.py: the CPU quick mode runs end to end and every part reports figures or says why it stopped.

No GPU is around in CI, so the quick mode is what keeps the GPU suite from rotting between the rare runs on a
lent GPU: the same code paths (pathseg's extraction, fit-head, predict and pretrain, the probes around them,
both output files) at tiny shapes on the CPU, in well under a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_suite.py"
PARTS = ["extraction", "heads", "predict", "pretrain", "compile"]
FIGURES_HEADER = "| part | figure | value | unit | note |"


def figure_rows(markdown: str) -> list[list[str]]:
    """The rows of the figures table, split into cells."""
    lines = markdown.splitlines()
    start = lines.index(FIGURES_HEADER) + 2  # header, then the alignment row
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def check_report(result: dict, markdown: str) -> None:
    """What every report must hold: each part figures or a stated stop, and one table row per figure."""
    assert [p["name"] for p in result["parts"]] == PARTS
    for part in result["parts"]:
        status = part["status"]
        assert not status.startswith("failed"), f"{part['name']}: {status}\n{part['details'].get('traceback', '')}"
        stated_stop = status.startswith(("stopped at limit", "skipped:"))
        assert status == "complete" or stated_stop, status
        assert part["figures"] or stated_stop, f"{part['name']} produced nothing and did not say why"
        for figure in part["figures"]:
            assert set(figure) == {"figure", "value", "unit", "note"}
            assert figure["figure"] and figure["unit"], figure
            assert figure["value"] is None or isinstance(figure["value"], int | float), figure
    rows = figure_rows(markdown)
    expected = [(p["name"], f["figure"]) for p in result["parts"] for f in p["figures"]]
    assert [(row[0], row[1]) for row in rows] == expected
    assert all(len(row) == 5 and row[3] for row in rows)


@pytest.mark.slow
def test_the_cpu_quick_mode_writes_every_part_and_both_files(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((out / "gpu_suite.json").read_text())
    markdown = (out / "gpu_suite.md").read_text()
    check_report(result, markdown)

    assert result["mode"] == "quick" and result["environment"]["device"] == "cpu"
    assert "--device cpu --quick" in result["command"] and result["command"] in markdown
    assert result["date"] in markdown and result["environment"]["torch"] in markdown
    compile_part = result["parts"][-1]
    assert compile_part["status"].startswith("skipped: quick mode") and not compile_part["figures"]
    # the figures a CPU can give are numbers; the GPU-only ones are null and say so
    figures = {(p["name"], f["figure"]): f for p in result["parts"] for f in p["figures"]}
    for key in [("extraction", "ratio: extraction pass / bare"), ("extraction", "run_extraction, whole command"),
                ("heads", "conv: fit-head epoch, streaming"), ("predict", "predict, whole command"),
                ("predict", "peak host RSS during predict"), ("pretrain", "tiny: UNet phase")]:
        if result["parts"][PARTS.index(key[0])]["status"] == "complete":
            assert isinstance(figures[key]["value"], float) and figures[key]["value"] > 0, figures[key]
    gpu_only = [f for f in figures.values() if "GPU memory" in f["figure"] or "utilisation" in f["figure"]]
    assert gpu_only and all(f["value"] is None and "CPU" in f["note"] for f in gpu_only)


def load_report_module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu_suite import report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return report


def test_a_part_that_completes_without_a_figure_is_a_failure_in_the_report():
    report = load_report_module()
    silent, measured, stopped = report.Part("silent"), report.Part("measured"), report.Part("stopped")
    measured.add("x", 1.5, "tiles/s")
    stopped.stop("stopped at limit after 3 of 8 batches")
    stopped.stop("failed: a later problem does not hide the first stop")
    for part in (silent, measured, stopped):
        part.settle()
    assert silent.failed and silent.status == "failed: completed without a figure"
    assert measured.status == "complete" and stopped.status == "stopped at limit after 3 of 8 batches"

    env = {"device": "cpu", "device_name": "CPU: test", "gpu_memory_gib": None, "driver": None, "torch": "t",
           "cuda": None, "cudnn": None, "python": "3.11", "cpu_cores": 2, "torch_threads": 2,
           "pathseg_commit": "abc"}
    result = report.build_result("python3 bench/gpu_suite.py", "quick", 45.0, 1.0, env, [measured, stopped], {})
    markdown = report.markdown(result)
    assert figure_rows(markdown) == [["measured", "x", "1.5", "tiles/s", ""]]
    assert "| stopped | stopped at limit after 3 of 8 batches |" in markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_cuda_without_a_gpu_is_refused_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in done.stderr
    assert not (tmp_path / "gpu_suite.json").exists()


def test_bad_arguments_are_refused_in_one_line(tmp_path):
    for args in (["--budget-s", "-1"], ["--budget-s", "soon"], ["--out", str(Path(__file__))]):
        done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *args], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 2, args
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("gpu_suite: "), done.stderr
