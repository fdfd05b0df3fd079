"""Text corpora for the key statistics C = E[k kᵀ].

Users get WikiText / Wikipedia through `datasets`; offline, the local files under
`<data root>/wikipedia/` are read (raw WikiText, tokenized WikiText, a MediaWiki XML `.bz2` dump
stripped to plain text). Where the data root has no text, the small WikiText sample bundled in
`data/samples/` is read (`read_sample`); the model can also sample its own.
Every source yields plain-text passages in a fixed order, so a corpus is reproducible.

Held-out text: the perplexity of an edited model (the damage an edit does) must be measured on
text the key statistics never read, or editors that use C would be favoured on their own data.
A local directory names its held-out files (`exclude` here; the statistics skip them), and the
bundled sample is split in two: its whole articles from `held_out_fraction` of its characters
from the end on are held out (`split_sample`), the rest feeds the statistics.
"""

from __future__ import annotations

import bz2
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from pipeline.data.sources import BUNDLED


class CorpusNotAvailableError(RuntimeError):
    """The configured corpus text could not be read here (offline, or not downloaded)."""


# --------------------------------------------------------------------------------------------
# WikiText


def read_wikitext_raw(path: Path) -> Iterator[str]:
    """Paragraphs of a raw WikiText file (" = Heading = " lines dropped)."""
    with open(path, encoding="utf-8") as handle:
        yield from wikitext_paragraphs(handle)


def wikitext_paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Paragraphs of raw WikiText lines (headings dropped, WikiText's tokenization undone)."""
    for line in lines:
        line = line.strip()
        if line and not _is_heading(line):
            yield detokenize_wikitext(line)


def _is_heading(line: str) -> bool:
    return line.startswith("=") and line.endswith("=")


_WIKITEXT_FIXES = [
    (re.compile(r" @(.)@ "), r"\1"),  # " @-@ " -> "-", " @,@ " -> ","
    (re.compile(r" ([.,;:!?)\]}'])"), r"\1"),
    (re.compile(r"([(\[{]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'m|'ll|'d)\b"), r"\1"),
    (re.compile(r'" (.*?) "'), r'"\1"'),
]


def detokenize_wikitext(text: str) -> str:
    """Undo WikiText's tokenization (" @-@ ", spaces before punctuation); `<unk>` is kept."""
    for pattern, replacement in _WIKITEXT_FIXES:
        text = pattern.sub(replacement, text)
    return text


# --------------------------------------------------------------------------------------------
# MediaWiki XML dumps

_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"<[^>]+>")
_FILE_LINK = re.compile(
    r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]",
    re.I,
)
_LINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXTERNAL = re.compile(r"\[https?://[^\s\]]+ ?([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+$", re.M)
_EMPHASIS = re.compile(r"'{2,}")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def strip_wiki_markup(text: str) -> str:
    """Plain text from MediaWiki markup: templates, tables, refs, links, emphasis removed."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    previous = None
    while previous != text:  # nested templates: strip innermost first
        previous, text = text, _TEMPLATE.sub("", text)
    text = _TABLE.sub("", text)
    text = _FILE_LINK.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _HEADING.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _TAG.sub("", text)
    text = text.replace("&nbsp;", " ").replace("&amp;", "&")
    return text


def read_mediawiki_dump(path: Path, min_chars: int = 80) -> Iterator[str]:
    """Paragraphs of the articles (namespace 0, no redirects) in a `.xml` or `.xml.bz2` dump."""
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rb") as handle:
        for _, element in ET.iterparse(handle, events=("end",)):
            if not element.tag.endswith("}page") and element.tag != "page":
                continue
            namespace = _child_text(element, "ns")
            text = _child_text(element, "revision/text") or ""
            element.clear()
            if namespace not in (None, "0") or text.lstrip().lower().startswith("#redirect"):
                continue
            for paragraph in _PARAGRAPH_BREAK.split(strip_wiki_markup(text)):
                paragraph = " ".join(paragraph.split())
                if len(paragraph) >= min_chars and not paragraph.startswith(("*", "|", "!", "#")):
                    yield paragraph


def _child_text(element: ET.Element, path: str) -> str | None:
    for child in element.iter():
        if child.tag.rsplit("}", 1)[-1] == path.rsplit("/", 1)[-1]:
            return child.text
    return None


# --------------------------------------------------------------------------------------------
# Sources


def local_files(directory: Path, exclude: Iterable[str] = ()) -> list[Path]:
    """The text files of a local corpus directory, in a fixed order, without those named in
    `exclude` (the held-out text)."""
    patterns = ("*.raw", "*.tokens", "*.txt", "*.xml", "*.xml.bz2", "*.bz2")
    found = {p for pattern in patterns for p in Path(directory).glob(pattern)}
    return sorted(p for p in found if p.name not in set(exclude))


def read_local(directory: Path, exclude: Iterable[str] = ()) -> Iterator[str]:
    files = local_files(directory, exclude)
    if not files:
        raise FileNotFoundError(
            f"no corpus files (*.raw, *.tokens, *.txt, *.xml[.bz2]) in {directory}"
            + (f" besides the held-out {sorted(exclude)}" if exclude else "")
        )
    for path in files:
        yield from read_file(path)


def read_file(path: Path) -> Iterator[str]:
    """Paragraphs of one corpus file, by its kind (MediaWiki dump or WikiText)."""
    if ".xml" in path.name or path.suffix == ".bz2":
        yield from read_mediawiki_dump(path)
    else:
        yield from read_wikitext_raw(path)


def sample_path(file: str = "wikitext_sample.txt") -> Path:
    path = BUNDLED / file
    if not path.exists():
        raise CorpusNotAvailableError(f"the bundled corpus sample {path} is missing")
    return path


def split_sample(lines: list[str], held_out_fraction: float) -> int:
    """The index of the first held-out line: the first article heading (" = Title = ") at or
    after `1 - held_out_fraction` of the characters, so no article is cut in two."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {held_out_fraction}")
    total = sum(len(line) for line in lines)
    seen = 0
    for index, line in enumerate(lines):
        stripped = line.strip()
        article = _is_heading(stripped) and not stripped.startswith("= =")
        if article and seen >= (1 - held_out_fraction) * total:
            return index
        seen += len(line)
    raise ValueError(
        f"no article starts in the last {held_out_fraction:.0%} of the sample: nothing to hold out"
    )


def read_sample(
    file: str = "wikitext_sample.txt", part: str = "all", held_out_fraction: float = 0.25
) -> Iterator[str]:
    """The corpus sample bundled in `data/samples/` (raw WikiText, a few hundred kB): `all` of
    it, its `statistics` part, or its `held_out` part (`split_sample`)."""
    with open(sample_path(file), encoding="utf-8") as handle:
        lines = handle.readlines()
    if part != "all":
        cut = split_sample(lines, held_out_fraction)
        parts = {"statistics": lines[:cut], "held_out": lines[cut:]}
        if part not in parts:
            raise ValueError(f"part must be all, statistics or held_out, got {part!r}")
        lines = parts[part]
    yield from wikitext_paragraphs(lines)


def has_hf_cache(cache_dir: str | Path | None) -> bool:
    """Whether `datasets` has cached some WikiText under `cache_dir` (what `make data` leaves)."""
    return cache_dir is not None and any(Path(cache_dir).glob("*wikitext*"))


def read_hf_wikitext(name: str = "wikitext-103-raw-v1", split: str = "train", cache_dir=None):
    """WikiText through `datasets` (needs the network the first time).

    Raises CorpusNotAvailableError, one line saying what to do, when it is neither cached in
    `cache_dir` nor reachable on the hub.
    """
    import datasets

    try:
        dataset = datasets.load_dataset("wikitext", name, split=split, cache_dir=cache_dir)
    except (OSError, ValueError) as error:  # ConnectionError / FileNotFoundError offline
        raise CorpusNotAvailableError(
            f"the key statistics need corpus text: WikiText ({name}, {split}) through `datasets` "
            f"is not cached in {cache_dir} and the hub could not be reached "
            f"({type(error).__name__}: {_first_line(error)}). Run `make data` once with network, "
            "set ROME_DATA=... to a data root with wikipedia/ text (or corpus.local_dir=...), or "
            "use the bundled sample (corpus.source=sample)"
        ) from error
    for row in dataset:
        text = row["text"].strip()
        if text and not text.startswith("="):
            yield text


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else ""


@torch.no_grad()
def sample_from_model(
    model, tokenizer, n_texts: int, length: int = 64, seed: int = 0, batch_size: int = 16
) -> list[str]:
    """Texts the model writes itself from its BOS/EOS token, seeded (the no-corpus fallback)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    texts: list[str] = []
    while len(texts) < n_texts:
        rows = min(batch_size, n_texts - len(texts))
        ids = torch.full((rows, 1), start, dtype=torch.long, device=device)
        for _ in range(length):
            logits = model(ids).logits[:, -1].float().cpu()
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).to(device)
            ids = torch.cat([ids, nxt], dim=1)
        texts.extend(tokenizer.batch_decode(ids[:, 1:], skip_special_tokens=True))
    return texts
