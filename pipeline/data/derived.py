"""Files derived from the data root, built once into the cache and keyed by their sources.

The data root may be read-only (CI's copy of `../shared`), so a file made from it (a join, a
split) goes to `<cache>/data/<name>-<key>.json`, where the key is a digest of every source's
sha256: another copy of a source makes another file. A sidecar `<name>-<key>.meta.json` records
the file's own sha256, the sources' sha256s, `derived: true` and how it was made; run.json
copies it (`sources.derived_provenance`). A file whose bytes no longer match its sidecar is
rebuilt, under a lock so that concurrent stages build it once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.core import files


def serialize(records: Sequence[dict[str, Any]]) -> str:
    """The file's text: one fixed serialization, so equal records give an equal sha256."""
    return json.dumps(list(records), ensure_ascii=False, indent=1) + "\n"


def source_digests(data_root: str | Path, sources: Sequence[str]) -> dict[str, str]:
    return {name: files.sha256_file(Path(data_root) / name) for name in sources}


def target_path(cache_dir: str | Path, name: str, digests: dict[str, str]) -> Path:
    key = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "data" / f"{name}-{key}.json"


def meta_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".meta.json")


def provenance(path: str | Path) -> dict[str, Any] | None:
    """The sidecar of a derived file (`derived`, `sha256`, `sources`), or None for others."""
    meta = meta_path(path)
    return files.read_json(meta) if meta.exists() else None


def build(
    name: str,
    data_root: str | Path,
    cache_dir: str | Path,
    sources: Sequence[str],
    make: Callable[[Path], list[dict[str, Any]] | tuple[list[dict[str, Any]], dict[str, Any]]],
    how: str,
) -> Path:
    """The derived file `name` in the cache, made by `make(data_root)` if missing (or if it no
    longer has the sha256 its sidecar records); returns its path. `make` returns the records,
    or the records and more for the sidecar (e.g. counts of what was left out)."""
    digests = source_digests(data_root, sources)
    path = target_path(cache_dir, name, digests)
    with files.file_lock(path.with_suffix(".lock")):
        meta = provenance(path) if path.exists() else None
        if meta and meta.get("sha256") == files.sha256_file(path):
            return path
        made = make(Path(data_root))
        records, extra = made if isinstance(made, tuple) else (made, {})
        text = serialize(records)
        files.atomic_write(path, text)
        files.write_json(
            meta_path(path),
            {
                "name": name,
                "derived": True,
                "sha256": hashlib.sha256(text.encode()).hexdigest(),
                "records": len(records),
                **extra,
                "sources": digests,
                "how": how,
            },
        )
    return path


def main(build_file: Callable[[str, str], Path], doc: str, argv: list[str] | None = None) -> int:
    """`python -m pipeline.data.<module> [--root DATA] [--cache CACHE]`: build one derived
    file and print its path, records, sha256 and any counts its sidecar records."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--root", default=os.environ.get("ROME_DATA", "data"))
    parser.add_argument("--cache", default=os.environ.get("ROME_CACHE", ".cache"))
    args = parser.parse_args(argv)
    path = build_file(args.root, args.cache)
    meta = provenance(path)
    print(f"{path}\n  {meta['records']} records, sha256 {meta['sha256']} (derived)")
    if "counts" in meta:
        print(f"  {json.dumps(meta['counts'])}")
    return 0
