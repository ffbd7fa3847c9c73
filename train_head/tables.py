"""The evaluation report as a printed table and as Markdown, saying which means count background."""

from __future__ import annotations


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


SUMMARY_COLUMNS = [
    ("images", "images", lambda m: str(m["images"])),
    ("pixel acc", "pixel accuracy", lambda m: _fmt(m["pixel_accuracy"])),
    ("mIoU", "mIoU (all classes)", lambda m: _fmt(m["miou"])),
    ("mIoU-bg", "mIoU (no background)", lambda m: _fmt(m["miou_no_background"])),
    ("Dice", "mean Dice (all classes)", lambda m: _fmt(m["mean_dice"])),
    ("Dice-bg", "mean Dice (no background)", lambda m: _fmt(m["mean_dice_no_background"])),
    ("obj F1", "object F1", lambda m: _fmt(m.get("objects", {}).get("object_f1"))),
    ("obj Dice", "object Dice", lambda m: _fmt(m.get("objects", {}).get("object_dice"))),
    ("obj Hausdorff", "object Hausdorff (px)", lambda m: _fmt(m.get("objects", {}).get("object_hausdorff"), 2)),
    ("inst F1", "object F1 (decoded)", lambda m: _fmt(m.get("objects_decoded", {}).get("object_f1"))),
    ("inst Dice", "object Dice (decoded)", lambda m: _fmt(m.get("objects_decoded", {}).get("object_dice"))),
    ("inst Hausdorff", "object Hausdorff (decoded, px)",
     lambda m: _fmt(m.get("objects_decoded", {}).get("object_hausdorff"), 2)),
]


def _rows(report: dict) -> tuple[list[str], list[list[str]]]:
    has_objects = any("objects" in m for m in report["splits"].values())
    has_decoded = any("objects_decoded" in m for m in report["splits"].values())
    columns = [c for c in SUMMARY_COLUMNS
               if (has_objects or not c[0].startswith("obj")) and (has_decoded or not c[0].startswith("inst"))]
    headers = ["split"] + [c[0] for c in columns]
    rows = [[split] + [c[2](m) for c in columns] for split, m in report["splits"].items()]
    return headers, rows


def _class_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["class"] + [f"{split} {kind}" for split in report["splits"] for kind in ("IoU", "Dice")]
    rows = []
    for name in report["class_names"]:
        row = [name]
        for metrics in report["splits"].values():
            cls = metrics["per_class"][name]
            row += [_fmt(cls["iou"]), _fmt(cls["dice"])]
        rows.append(row)
    return headers, rows


def _plain(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
    return "\n".join(lines)


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _note(report: dict) -> str:
    """Say which means count background, and what convention the object metrics follow, for this report."""
    from pathseg.metrics.pixel import background_index_of

    parts = ["mIoU and Dice average over classes present in truth or prediction"]
    if background_index_of(report["class_names"]) is None:
        parts.append("this dataset has no background class, so the '-bg' columns equal the full means")
    else:
        parts.append("'-bg' excludes the background class")
    if report.get("ignore_index") is not None:
        parts.append(f"pixels labelled {report['ignore_index']} (ignore) are not scored")
    note = "; ".join(parts) + "."
    if any("objects" in split for split in report["splits"].values()):
        note += (" Object metrics follow the GlaS contest: F1, object Dice and object Hausdorff are pooled over all "
                 "objects of the split (Dice and Hausdorff weighted by object area), as the contest and published "
                 "figures are; per-image means are in metrics.json under *_mean_of_images.")
    decoding = (report.get("instances") or {}).get("decoding")
    if decoding is not None and any("objects_decoded" in split for split in report["splits"].values()):
        note += (" 'obj' columns score connected components of the predicted map; 'inst' columns score instances "
                 f"decoded by instances.decoding={decoding} (contour heads: watershed from interior markers; "
                 "otherwise components with holes filled).")
        instances = report["instances"]
        note += (f" Decoding values ({report.get('instances_source', 'configured')}): components under "
                 f"{report.get('min_object_area')} px dropped; instances under {instances.get('min_area')} px "
                 f"dropped, marker threshold {instances.get('marker_threshold')}.")
    return note


def metrics_text(report: dict) -> str:
    summary = _plain(*_rows(report))
    classes = _plain(*_class_rows(report))
    features = f"features: t={report['timesteps']} blocks={report['blocks']}"
    return f"{features}\n\n{summary}\n\n{classes}\n\n{_note(report)}"


def metrics_markdown(report: dict) -> str:
    return (
        "\n\n".join(
            [
                "# Evaluation",
                f"Run `{report['run']}` on store `{report['store']}` "
                f"(fingerprint `{report['store_fingerprint'][:12]}`), "
                f"features t = {report['timesteps']}, blocks = {report['blocks']}.",
                _markdown(*_rows(report)),
                "## Per class",
                _markdown(*_class_rows(report)),
                _note(report),
            ]
        )
        + "\n"
    )
