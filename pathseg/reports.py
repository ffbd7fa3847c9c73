"""Human-readable tables for what the CLI prints: plain text that reads the same in a log file."""

from __future__ import annotations

from pathlib import Path

from pathseg.store.integrity import store_info


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, rule, *body])


def _precision(info: dict) -> str:
    if info.get("compute_precision"):
        return f"{info['compute_precision']} (backbone compute; each array's storage dtype is listed below)"
    return "not recorded (made before pathseg recorded it)" if info["features"] else "none yet (nothing computed)"


def store_info_text(info: dict) -> str:
    splits = ", ".join(f"{k} {v}" for k, v in info["splits"].items())
    head = [
        f"store       {info['path']}",
        f"fingerprint {info['fingerprint'][:16]}",
        f"dataset     {info['dataset']}  ({info['images']} images: {splits}; {info['images_written']} written)",
        f"backbone    {info['backbone'].get('name')}",
        f"tiles       {info['tiles']} of {info['tile_size']} px",
        f"precision   {_precision(info)}",
        f"on disk     {_size(info['bytes_on_disk'])}",
        f"complete    {'yes' if info['complete'] else 'NO'}",
        "",
    ]
    rows = [
        [
            f["timestep"],
            f["block"],
            "x".join(str(d) for d in f["shape"]),
            f["dtype"],
            _size(f["bytes_on_disk"]),
            f["compression_ratio"],
            "yes" if f["complete"] else f"no ({f['missing_shards']} shards missing)",
        ]
        for f in sorted(info["features"], key=lambda f: (f["timestep"], f["block"]))
    ]
    return "\n".join(head) + table(["t", "block", "shape", "dtype", "on disk", "ratio", "complete"], rows)


def store_list_table(paths: list[Path]) -> str:
    from pathseg.store import FeatureStore

    rows = []
    for path in paths:
        try:
            info = store_info(FeatureStore.open(path))
        except Exception as error:  # noqa: BLE001 - one broken store must not hide the others
            rows.append([path.name, "?", "?", "?", "?", f"unreadable: {error}"])
            continue
        arrays = [f"t{t}" for t in sorted({f['timestep'] for f in info['features']})]
        blocks = sorted({f["block"] for f in info["features"]})
        rows.append(
            [
                path.name,
                info["images"],
                info["tiles"],
                f"{','.join(arrays)} x {','.join(blocks)}",
                _size(info["bytes_on_disk"]),
                "complete" if info["complete"] else "incomplete",
            ]
        )
    return table(["store", "images", "tiles", "features", "on disk", "state"], rows)
