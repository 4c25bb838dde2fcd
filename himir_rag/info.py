"""``himir info``: what a saved index holds, read from its manifest (no model, no vectors loaded)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from himir_rag import manifest as manifest_schema

__all__ = ["describe_index", "describe_autoconfig", "format_info"]


def describe_index(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts, layout, encoder, store, config (with the effective scheduler parameters: those that
    depend on a level's size resolved for the index's counts), the autotuning record and the
    bytes on disk of the index in ``directory`` (plain JSON)."""
    directory = Path(directory)
    version_dir = manifest_schema.current_version(directory)  # CURRENT read once: the version described
    manifest = manifest_schema.read_manifest(version_dir)
    config = manifest_schema.parse_config(manifest, where=str(version_dir))
    version = version_dir.name
    live = sum(int(size) for part in ("files", "appended") for size in manifest.get(part, {}).values())
    # hard links (append-only files shared by versions) counted once
    total = sum({(s.st_dev, s.st_ino): s.st_size for s in (p.stat() for p in directory.rglob("*") if p.is_file())
                 }.values())
    params = config.scheduler_params
    scheduler = {key: _plain(value) for key, value in dataclasses.asdict(params).items()}
    counts = {level: int(manifest.get("counts", {}).get(level, 0)) for level in ("global", "region", "segment")}
    if params.probe_share is None:  # by each level's size: the share each candidate level gets now
        scheduler["probe_share"] = {level: params.probe_share_for(counts[level]) for level in params.candidate_levels}
    scheduler["ann_bound"] = params.ann_bound_for(counts["segment"])
    return {
        "path": str(directory.absolute()), "version": version, "format_version": manifest.get("format_version"),
        "saved_at": manifest.get("saved_at"), "counts": manifest.get("counts", {}),
        "layout": config.layout, "decomposer": config.decomposer, "encoder": manifest.get("encoder", {}),
        "vectors": manifest.get("vectors", {"dtype": "float32"}), "store": manifest.get("store", {"kind": "faiss"}),
        "config": config.to_dict(), "scheduler_effective": scheduler,
        "autoconfig": manifest.get("autoconfig"),
        "bytes_on_disk": {"live_version": live, "directory": total},
    }


def format_info(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`describe_index`."""
    counts, encoder = info["counts"], info["encoder"]
    config = info["config"]
    lines = [
        f"index      {info['path']} (version {info['version']}, saved {info['saved_at']})",
        f"images     {counts.get('images', '?')}  regions {counts.get('regions', '?')} "
        f"(global {counts.get('global', '?')}, region {counts.get('region', '?')}, segment {counts.get('segment', '?')})",
        f"layout     {info['layout']} ({info['decomposer']} decomposer), vectors {info['vectors'].get('dtype')}",
        f"encoder    {encoder.get('name')} (dim {encoder.get('dim')}, spec {encoder.get('spec')!r})",
        f"store      {json.dumps(info['store'])}",
        f"search     default mode {config['default_mode']}, {config['search_threads']} thread(s), large scans "
        + {0: "split over one thread per core", 1: "not split"}.get(config.get("scan_workers", 0),
                                                                   f"split over {config.get('scan_workers')} threads"),
        f"scheduler  {json.dumps(config['scheduler']) if config['scheduler'] else 'defaults'}",
        f"size       {_mib(info['bytes_on_disk']['live_version'])} live version, "
        f"{_mib(info['bytes_on_disk']['directory'])} directory",
    ]
    lines.append("autoconfig " + describe_autoconfig(info.get("autoconfig")))
    return "\n".join(lines)


def describe_autoconfig(record: dict[str, Any] | None) -> str:
    """One line on how the scheduler parameters were chosen: an ``auto_tune`` or ``himir tune`` record, or none."""
    if not record:
        return "none (defaults, or set by hand)"
    if record.get("source") == "auto":
        before, full = record.get("before", {}), record.get("himir_full", {})
        floors = f"tolerance {record.get('tolerance')}"  # records of older versions lack the agreement floor
        reference_floor = full.get("recall", 0) - record.get("tolerance", 0)
        if record.get("recall_floor") is not None and abs(record["recall_floor"] - reference_floor) > 1e-9:
            floors += f" (recall floor {record['recall_floor']:.3f}: the current setting's, within chance)"
        floors += f", min agreement {record['min_agreement']}" if "min_agreement" in record else ""
        floors += (f" (floor {record['agreement_floor']:.3f})" if record.get("agreement_floor") is not None
                   and record["agreement_floor"] != record.get("min_agreement") else "")
        ranks = f", words of rank <= {record['probe_ranks']}" if record.get("probe_ranks", 1) > 1 else ""
        agreement = f", agreement {record['agreement']:.3f}" if record.get("agreement") is not None else ""
        return (f"auto-tuned {record.get('tuned_at')} at {record.get('images')} images on "
                f"{record.get('probes')} {record.get('probe_kind', 'vectors')} probes (seed {record.get('seed')}{ranks}, "
                f"{floors}): {json.dumps(record.get('params'))}, probe Recall@{record.get('k')} "
                f"{record.get('recall', 0):.3f}{agreement} at {record.get('dot_products', 0):.0f} dot products "
                f"(before: {before.get('recall', 0):.3f} at {before.get('dot_products', 0):.0f}; "
                f"himir-full: {full.get('recall', 0):.3f} at {full.get('dot_products', 0):.0f})")
    return (f"himir tune {record.get('tuned_at')} on {record.get('queries')} queries: "
            f"{record.get('target')} {record.get('accuracy', 0):.3f}, {record.get('dot_products', 0):.0f} dot products")


def _plain(value: Any) -> Any:
    """Tuples as lists, infinity as the string "inf" (strict JSON holds no infinity)."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
