"""Where data files come from: the data root, a download, a file derived from data-root files
into the cache, or the samples bundled in `data/`.

`python -m pipeline.data.sources` (`make data`) downloads the official ROME files into the data root,
skipping what is already there, then builds the derived files whose sources the root has.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.files import current_umask
from pipeline.data import (
    counterfact_join,
    counterfact_known,
    counterfact_tune,
    counterfact_union,
    derived,
    known_union,
)

log = logging.getLogger(__name__)

ROME_BASE_URL = "https://rome.baulab.info/data/dsets/"
# Official files of the ROME paper (MIT licence), by their name in the data root.
OFFICIAL_FILES = {
    "known_1000.json": ROME_BASE_URL + "known_1000.json",
    "counterfact.json": ROME_BASE_URL + "counterfact.json",
    "attribute_snippets.json": ROME_BASE_URL + "attribute_snippets.json",
    "idf.npy": ROME_BASE_URL + "idf.npy",
    "tfidf_vocab.json": ROME_BASE_URL + "tfidf_vocab.json",
    "zsre_mem_eval.json": ROME_BASE_URL + "zsre_mem_eval.json",
}
BUNDLED = Path(__file__).resolve().parents[2] / "data" / "samples"
# Files built from data-root files into the cache (`derived:` in conf/data/*.yaml): the names of
# the sources missing from a data root, and the builder (data root, cache) -> the file's path.
DERIVED = {
    counterfact_join.NAME: (counterfact_join.missing_sources, counterfact_join.build),
    counterfact_tune.NAME: (counterfact_tune.missing_sources, counterfact_tune.build),
    counterfact_union.NAME: (counterfact_union.missing_sources, counterfact_union.build),
    counterfact_known.NAME: (counterfact_known.missing_sources, counterfact_known.build),
    known_union.NAME: (known_union.missing_sources, known_union.build),
}


class DataNotFoundError(FileNotFoundError):
    pass


def download(url: str, target: Path, *, timeout: float = 60.0) -> Path:
    """Fetch `url` into `target` atomically (a partial download never takes the final name)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.fchmod(handle, 0o666 & ~current_umask())  # readable by others as `open` would make it
    os.close(handle)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def resolve_data_file(
    data: Mapping[str, Any], data_root: str | Path, cache_dir: str | Path | None = None
) -> tuple[Path, str]:
    """The file a `conf/data/*.yaml` entry points at, and where it came from.

    Order: `data.path` if set; the file in the data root, or for a `derived` entry the file
    built from the data root's sources into `cache_dir` (origin "derived"; its provenance in
    the sidecar, `derived_provenance`); a download if `data.download` and the entry has a URL;
    the bundled sample (with a warning: it is a few records).
    """
    if data.get("path"):
        path = Path(data["path"])
        if not path.exists():
            raise DataNotFoundError(f"data.path={path} does not exist")
        return path, "path"
    derived = data.get("derived")
    if derived:
        if derived not in DERIVED:
            raise ValueError(f"data.derived={derived!r}: known derived files are {sorted(DERIVED)}")
        missing, build = DERIVED[derived]
        if cache_dir is None:
            raise ValueError(f"data.derived={derived!r} needs a cache directory to build into")
        if not missing(data_root):
            return build(data_root, cache_dir), "derived"
    else:
        in_root = Path(data_root) / data["file"]
        if in_root.exists():
            return in_root, "data root"
    if not derived and data.get("download") and data.get("url"):
        log.info("downloading %s -> %s", data["url"], in_root)
        try:
            return download(data["url"], in_root), "download"
        except OSError as error:  # URLError, timeouts: offline
            raise DataNotFoundError(
                f"{data['file']} is not in the data root {data_root} and could not be downloaded "
                f"from {data['url']} ({reason(error)}). Run `make data` where there is network, "
                "set ROME_DATA=... (or paths.data=...) to a directory that has it, or pass "
                "data.path=/path/to/file."
            ) from None
    sample = data.get("sample")
    if sample and (BUNDLED / sample).exists():
        log.warning(
            "%s not found in the data root %s; using the bundled sample data/samples/%s "
            "(run `make data` or set ROME_DATA for the full file)",
            data["file"],
            data_root,
            sample,
        )
        return BUNDLED / sample, "bundled sample"
    if derived:
        raise DataNotFoundError(
            f"{derived} is built from files the data root {data_root} lacks: "
            f"{', '.join(DERIVED[derived][0](data_root))}. Set ROME_DATA (or paths.data=...) to a "
            "directory that has them, or pass data.path=/path/to/file."
        )
    raise DataNotFoundError(
        f"{data['file']} not found in the data root {data_root}. Run `make data` to download the "
        "official files, set ROME_DATA (or paths.data=...) to a directory that has it, or pass "
        "data.path=/path/to/file."
    )


def derived_provenance(path: str | Path) -> dict[str, Any]:
    """What run.json records of a derived file beside its path and sha256: `derived` and the
    sources' digests (from its sidecar); nothing for a file that was not derived."""
    meta = derived.provenance(path)
    return {"derived": True, "sources": meta["sources"]} if meta and meta.get("derived") else {}


def build_derived(data_root: Path, cache_dir: Path) -> dict[str, str]:
    """Build every derived file whose sources the data root has; report each."""
    outcome = {}
    for name, (missing, build) in DERIVED.items():
        absent = missing(data_root)
        if absent:
            outcome[name] = f"not built: missing {', '.join(absent)}"
            continue
        path = build(data_root, cache_dir)
        outcome[name] = f"derived: {path} (sha256 {derived.provenance(path)['sha256']})"
    return outcome


def reason(error: BaseException) -> str:
    """One line for a failed download: `<urlopen error [Errno -2] ...>` -> the inner reason."""
    inner = getattr(error, "reason", None)
    text = str(inner if inner is not None else error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def download_all(data_root: Path, names: list[str] | None = None) -> dict[str, str]:
    """Download the official files missing from the data root; report what happened to each."""
    outcome: dict[str, str] = {}
    for name in names or list(OFFICIAL_FILES):
        target = data_root / name
        if target.exists():
            outcome[name] = "present"
            continue
        try:
            download(OFFICIAL_FILES[name], target)
            outcome[name] = "downloaded"
        except OSError as error:
            outcome[name] = f"failed: {OFFICIAL_FILES[name]} ({reason(error)})"
    return outcome


def download_wikitext(data_root: Path, name: str = "wikitext-103-raw-v1") -> str:
    """Cache WikiText through `datasets` into `<data_root>/hf_datasets` (for key statistics)."""
    try:
        import datasets

        datasets.load_dataset("wikitext", name, cache_dir=str(data_root / "hf_datasets"))
        return "downloaded"
    except Exception as error:  # noqa: BLE001 - any failure is reported, the rest goes on
        return f"failed: {reason(error)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=os.environ.get("ROME_DATA", "data"))
    parser.add_argument("--cache", default=os.environ.get("ROME_CACHE", ".cache"))
    parser.add_argument("--no-wikitext", action="store_true")
    parser.add_argument("--derived-only", action="store_true", help="download nothing")
    args = parser.parse_args(argv)
    root = Path(args.root)
    outcome = {} if args.derived_only else download_all(root)
    if not (args.no_wikitext or args.derived_only):
        outcome["wikitext (datasets)"] = download_wikitext(root)
    outcome |= build_derived(root, Path(args.cache))
    for name, status in outcome.items():
        print(f"{name:28s} {status}")
    if any(status.startswith("failed") for status in outcome.values()):
        print(
            f"some files could not be fetched into {root} (no network?). Run `make data` where "
            "there is network and copy the data root here, or set ROME_DATA=... to a directory "
            "that has them; without them the stages use the samples in data/samples/."
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
