"""Fluency (GE) and consistency (RS) of the cases' generations, under each case's edit.

The formulas are in `metrics.generation`; this module samples the texts and finds the reference
text about each new target that RS compares them with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from metrics import generation as gen
from pipeline.core.editing.requests import EditResult, update_of
from pipeline.core.models import LoadedModel
from pipeline.core.scoring import generate
from pipeline.data.records import CounterfactCase


def generation_metrics(
    lm: LoadedModel,
    cases: Sequence[CounterfactCase],
    results: Sequence[EditResult | None],
    cfg: DictConfig,
    references: Reference,
) -> list[dict[str, Any]]:
    """GE and RS per case from top-k samples of its generation prompts, under its update.

    Each case's prompts are sampled together, seeded by the case's id: a case's texts do not
    depend on which cases share its batch (a resumed or sharded run, another editor's run), so
    the unedited model's texts can be sampled once per case (`GenerationCache`)."""
    out = []
    for case, result in zip(cases, results, strict=True):
        texts = generate(
            lm,
            case.generation_prompts,
            updates=[update_of(result)] * len(case.generation_prompts),
            max_new_tokens=int(cfg.eval.max_new_tokens),
            top_k=int(cfg.eval.top_k),
            seed=int(cfg.seed) + int(case.id),
            batch_size=max(16, len(case.generation_prompts)),
        )
        out.append(
            {
                "texts": texts,
                "GE": gen.fluency(texts),
                **(
                    {"RS": gen.consistency(references.tfidf, texts, references.texts_about(case))}
                    if references.tfidf is not None
                    else {}
                ),
            }
        )
    return out


class Reference:
    """Reference text about each new target, and the tf-idf it is compared with (RS).

    ROME's files (`attribute_snippets.json`, `idf.npy`, `tfidf_vocab.json` in the data root)
    when present. Without them RS is not computed (the case records carry no RS, Table 4 leaves
    it blank and says why): a tf-idf fitted on other text would be another metric, which must
    not be reported under RS's name.
    """

    def __init__(self, data_root: Path, cases: Sequence[CounterfactCase]):
        snippets, idf, vocab = (
            data_root / name for name in ("attribute_snippets.json", "idf.npy", "tfidf_vocab.json")
        )
        self.tfidf: gen.TfIdf | None = None
        self.snippets: dict[tuple[str, str], list[str]] = {}
        if not (snippets.exists() and idf.exists() and vocab.exists()):
            self.source = f"none: ROME's tf-idf files and attribute snippets are not in {data_root}"
            return
        self.source = "ROME attribute snippets and tf-idf"
        self.tfidf = gen.TfIdf(json.loads(vocab.read_text()), np.load(idf))
        for entry in json.loads(snippets.read_text()):
            key = (entry["relation_id"], entry["target_id"])
            self.snippets.setdefault(key, []).extend(s["text"] for s in entry["samples"])

    def texts_about(self, case: CounterfactCase) -> list[str]:
        return self.snippets.get((case.relation_id, case.target_new_id), [])
