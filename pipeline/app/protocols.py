"""The evaluate stage's three protocols over CounterFact cases, beside `CaseEditor`.

- Independent (`run_independent`, the paper's protocol): each case is edited on the unedited
  model. A batch of cases computes its updates together and is scored together, each case's rows
  under its own rank-one update (hooks, no weight copies). The unedited scores are computed once
  per case and model and cached under `pre_dir`, for every editor. Each finished case is one line
  of `cases-<shard>.jsonl` (appended and fsynced), so a rerun continues where a run stopped.
- Mass (`run_mass`): for each N of `eval.mass_sizes`, the first N cases in one joint edit, then
  all N scored on the edited model; editors that write requests one after another make the whole
  curve in one resumable pass (`_mass_one_after_another`).
- Sequential (`run_sequential`): edits accumulate in one model, scored at checkpoints.

Each protocol holds its results directory's lock (`exclusive`) and resumes from what is on disk;
the stage (`pipeline/evaluate.py`) reads the config, calls one and writes the summary.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from metrics import counterfact as cf
from metrics.intervals import mean_ci
from pipeline.app.damage import HeldOutPerplexity
from pipeline.app.editors import CaseEditor
from pipeline.app.generation_scores import Reference, generation_metrics
from pipeline.app.results import (
    GenerationCache,
    PreCache,
    append_jsonl,
    case_record,
    edit_summary,
    headline,
    read_jsonl,
    scored,
    summarize_records,
)
from pipeline.app.stage import Run
from pipeline.app.tracking import RunningRates
from pipeline.core import files
from pipeline.core.editing.requests import (
    EditResult,
    contradictions,
    refuse_contradictions,
    update_of,
)
from pipeline.core.editing.updates import (
    DenseUpdate,
    LowRankUpdate,
    RankOneUpdate,
    apply_update,
    as_list,
    edited,
    preserved_weights,
)
from pipeline.core.models import LoadedModel, peak_memory_gib
from pipeline.core.scoring import score_cases, too_long
from pipeline.data.records import CounterfactCase, Loaded, RecordError

log = logging.getLogger(__name__)


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def damage_of(damage: HeldOutPerplexity | None) -> dict[str, Any]:
    """The perplexity of the model as it is now (edits written in), for a curve point."""
    return {} if damage is None else {"perplexity": damage.measure()}


def perplexity_summary(damage: HeldOutPerplexity | None) -> dict[str, Any]:
    """The held-out text and the unedited model's perplexity, for a mass or sequential summary."""
    if damage is None:
        return {}
    return {"perplexity": {"text": damage.describe(), "unedited": damage.unedited()}}


def independent_perplexity(
    cfg: DictConfig, run: Run, lm: LoadedModel, loaded: Loaded, damage: HeldOutPerplexity
) -> None:
    """`perplexity.json`: the unedited model's perplexity and, for the first
    `eval.perplexity_cases` cases (bad records left out), each case's edit alone on the unedited
    model, averaged window by window (`metrics.perplexity.over_edits`). The edits are computed
    again (updates are not stored); a rerun with the same text and cases keeps the file."""
    skipped = {r["id"] for r in read_jsonl(sorted(run.out_dir.glob("skipped-*.jsonl")))}
    chosen = [c for c in loaded.records if c.id not in skipped][: int(cfg.eval.perplexity_cases)]
    path, text, ids = run.path("perplexity.json"), damage.describe(), [c.id for c in chosen]
    saved = files.read_json(path) if path.exists() else {}
    if saved.get("text") == text and saved.get("cases") == ids:
        return
    editor = CaseEditor(cfg, lm)
    unedited = damage.unedited()
    if editor.editor is None:
        edited_ppl = dict(unedited, edits=0)
    else:
        edited_ppl = damage.over_edits([update_of(r) for r in editor.updates(chosen)])
    run.write_json(
        "perplexity.json",
        {
            "text": text,
            "statistics_text": run.meta.get("statistics_text"),
            "unedited": unedited,
            "edited": edited_ppl,
            "cases": ids,
            "note": (
                f"edited: the first {len(ids)} cases' edits, each alone on the unedited model, "
                "averaged window by window; the interval is over the text's windows"
            ),
        },
    )
    print(
        f"perplexity on {text['name']} ({text['tokens']} tokens): unedited "
        f"{unedited['mean']:.2f}, edited {edited_ppl['mean']:.2f} (first {len(ids)} cases)"
    )


@contextlib.contextmanager
def exclusive(run: Run, name: str, work: str) -> Iterator[None]:
    """Hold the lock `name` of the results directory for the block, or stop at once.

    A second job on the same work stops (non-zero, naming the lock) rather than waiting: waiting
    would hold a node only to find the work done, and two jobs writing the same files would each
    do all of it and keep only what it read at its start. The kernel frees the lock when its
    holder dies, so a killed or requeued job's rerun is never blocked."""
    lock = run.path(f".{name}.lock")
    try:
        with files.try_lock(lock):
            yield
    except files.LockHeld:
        raise SystemExit(
            f"another job is already {work} in {run.out_dir} (it holds {lock}); "
            "not starting a second one. Rerun when it has finished or died: it resumes."
        ) from None


def shard_of(loaded: Loaded, cases: Sequence[CounterfactCase]) -> Loaded:
    """The records `cases` of `loaded`, with their positions in the file (for error messages)."""
    index_of = dict(zip((c.id for c in loaded.records), loaded.indices, strict=True))
    return Loaded(loaded.path, loaded.schema, list(cases), [], [index_of[c.id] for c in cases])


CONTRADICTIONS = ("refuse", "drop_later")


def drop_contradictions(cfg: DictConfig, loaded: Loaded) -> tuple[Loaded, list[dict[str, Any]]]:
    """`eval.contradictions`, for the protocols that write many requests into one model (mass,
    sequential): `refuse` (the default) stops before any edit where two cases fill one prompt
    with two targets (`refuse_contradictions`); `drop_later` leaves out the later case of each
    such pair, in the data's order, and returns them (id, the earlier case, the prompt, both
    targets) for the summary. The later edit would otherwise overwrite the earlier one, and
    one of the two cases would be scored as a failure that no editor can avoid. MEMIT's and
    AlphaEdit's own runs use multi_counterfact, built without such pairs; CounterFact's
    first 1,000 cases hold one (978 and 1031, the twin city of two Athens), the 2,000 of
    `counterfact-union` three. Load a case more per dropped case (`data.limit`) to keep N."""
    rule = cfg.eval.get("contradictions", "refuse")
    if rule == "refuse":
        return loaded, []
    if rule != "drop_later":
        raise ValueError(f"eval.contradictions must be one of {CONTRADICTIONS}, got {rule!r}")
    found = contradictions(CaseEditor.requests(loaded.records))
    later = {request.id for _, request in found}
    dropped = [
        {"id": b.id, "with": a.id, "prompt": b.filled, "targets": [a.target_new, b.target_new]}
        for a, b in found
    ]
    for row in dropped:
        log.warning(
            "eval.contradictions=drop_later: case %r left out, it contradicts case %r (%r: %r "
            "vs %r)",
            row["id"],
            row["with"],
            row["prompt"],
            *row["targets"],
        )
    return shard_of(loaded, [c for c in loaded.records if c.id not in later]), dropped


def reject_too_long(
    cfg: DictConfig, lm: LoadedModel, editor: CaseEditor, loaded: Loaded, with_generation: bool
) -> list[RecordError]:
    """Drop from `loaded` the cases whose inputs do not fit the model (bad records: named,
    counted, `data.on_error` applies), logging each."""
    new_tokens = int(cfg.eval.max_new_tokens) if with_generation else 0
    prefix = editor.prefix_tokens()
    rejected = loaded.reject(
        lambda case: too_long(lm, case, edit_prefix=prefix, new_tokens=new_tokens),
        cfg.data.on_error,
    )
    for error in rejected:
        log.warning("skipped a bad record: %s", error)
    return rejected


def generation_ids(cfg: DictConfig, cases: Sequence[CounterfactCase]) -> set[int] | None:
    """The cases whose generation prompts are sampled (GE, RS): the first
    `eval.generation_cases` of the data, whichever shard holds them, or every case (None).
    Generation is nearly all of the full protocol's time (BENCHMARKS.md), so a 1,000-case run
    may score every case and generate for its first 200; GE's n says how many."""
    limit = cfg.eval.get("generation_cases")
    return None if limit is None else {c.id for c in cases[: int(limit)]}


def run_independent(
    cfg: DictConfig,
    run: Run,
    lm: LoadedModel,
    cases: Loaded,
    tag: str,
    data_file: Path,
    generated: set[int] | None = None,
) -> None:
    """Evaluate the shard's unfinished cases, holding the lock of its cases file (`exclusive`);
    generation for the cases in `generated` (None: all)."""
    with exclusive(run, f"cases-{tag}", f"evaluating shard {tag}"):
        _run_independent(cfg, run, lm, cases, tag, data_file, generated)


def _run_independent(
    cfg: DictConfig,
    run: Run,
    lm: LoadedModel,
    shard: Loaded,
    tag: str,
    data_file: Path,
    generated: set[int] | None,
) -> None:
    cases = shard.records
    written = read_jsonl(sorted(run.out_dir.glob("cases-*.jsonl")))
    finished = {r["id"] for r in written}
    todo = shard_of(shard, [c for c in cases if c.id not in finished])
    mine = {c.id for c in cases}  # running ES/PS/NS on W&B while the run goes
    rates = RunningRates(r["post"]["metrics"] for r in written if r["id"] in mine)
    log.info(
        "%d cases in this shard, %d already evaluated", len(cases), len(cases) - len(todo.records)
    )
    if not todo.records:
        return
    editor = CaseEditor(cfg, lm)
    with_generation = cfg.eval.generation is True or (
        cfg.eval.generation == "auto" and any(c.generation_prompts for c in cases)
    )
    rejected = reject_too_long(cfg, lm, editor, todo, with_generation)
    if rejected:
        append_jsonl(run.path(f"skipped-{tag}.jsonl"), [e.as_dict() for e in rejected])
    todo = todo.records
    if not todo:
        return
    pre_cache = PreCache(Path(cfg.pre_dir), tag, lm)
    generation_cache = GenerationCache(Path(cfg.pre_dir), tag, lm)
    rows_per_pass = int(cfg.eval.rows_per_pass)
    references = Reference(Path(data_file).parent, cases) if with_generation else None
    bar = tqdm(total=len(todo), desc=f"evaluate {editor.name}", unit="case")
    for batch in batches(todo, int(cfg.eval.cases_per_batch)):
        started = time.perf_counter()
        results = editor.updates(batch)
        pre = pre_cache.get(batch, rows_per_pass)
        updates = [update_of(r) for r in results]
        post_probs = score_cases(lm, batch, updates, batch_size=rows_per_pass)
        post = [scored(p) for p in post_probs]
        chosen = [i for i, c in enumerate(batch) if generated is None or c.id in generated]
        if with_generation and chosen:
            gen_cases, gen_results = [batch[i] for i in chosen], [results[i] for i in chosen]
            unedited = unedited_generations(generation_cache, lm, gen_cases, cfg, references)
            # Sampling is seeded by the case, so with no update written (the unedited model,
            # or every edit refused) the post-edit texts are the pre-edit ones: not sampled twice.
            edited = (
                unedited
                if all(update_of(r) is None for r in gen_results)
                else generation_metrics(lm, gen_cases, gen_results, cfg, references)
            )
            for targets, texts in ((pre, unedited), (post, edited)):
                for i, extra in zip(chosen, texts, strict=True):
                    targets[i].update(extra)
        seconds = (time.perf_counter() - started) / len(batch)
        lines = [
            case_record(c, p, q, r, seconds)
            for c, p, q, r in zip(batch, pre, post, results, strict=True)
        ]
        append_jsonl(run.path(f"cases-{tag}.jsonl"), lines)
        running = rates.add(line["post"]["metrics"] for line in lines)
        run.tracker.log({**running, "progress/seconds_per_case": seconds})
        bar.update(len(batch))
    bar.close()


def unedited_generations(
    cache: GenerationCache,
    lm: LoadedModel,
    cases: Sequence[CounterfactCase],
    cfg: DictConfig,
    references: Reference,
) -> list[dict[str, Any]]:
    """The unedited model's generation metrics of `cases`, from the cache where any run of this
    model and data sampled them, else sampled (and cached): the model must be unedited now."""
    settings = {
        "seed": int(cfg.seed),
        "max_new_tokens": int(cfg.eval.max_new_tokens),
        "top_k": int(cfg.eval.top_k),
        "rs": references.tfidf is not None,
    }
    return cache.get(
        cases,
        settings,
        lambda missing: generation_metrics(lm, missing, [None] * len(missing), cfg, references),
    )


def within(requested: Sequence[int], available: int, setting: str) -> tuple[list[int], list[int]]:
    """The requested counts that `available` cases can make (sorted), and those they cannot,
    which are named in a warning (and by the caller in the summary), never dropped unsaid."""
    wanted = sorted({int(n) for n in requested})
    over = [n for n in wanted if n > available]
    if over:
        log.warning(
            "%s: %s above the %d cases loaded, not run (load more cases: data.limit)",
            setting,
            over,
            available,
        )
    return [n for n in wanted if n <= available], over


def run_sequential(
    cfg: DictConfig,
    run: Run,
    lm: LoadedModel,
    loaded: Loaded,
    damage: HeldOutPerplexity | None = None,
) -> None:
    """Edits accumulate, `eval.sequential_batch` requests per joint edit; at each checkpoint
    every case edited so far is scored again. A checkpoint inside a batch is scored at the end
    of that batch (the first count of edits at or after it that the model passes through): its
    curve point has `edits` (what was scored) and `requested` (the checkpoints it stands for).
    Each case's scores at a checkpoint go to `checkpoint-<edits>.jsonl` (metrics only, no
    probabilities: the paired comparisons between editors read them).
    The model's edited weights and the editor's state are saved to `sequential-progress.pt`
    every `PROGRESS_EVERY` edits and at each checkpoint, so a stopped run goes on where it
    stopped (with the same weights, bit for bit) and a run over more cases extends a finished
    one. Without that file (a copy of the run's small files in another checkout) the edits are
    made again from the first, and each checkpoint scored before is kept, not scored again, where
    the edited weights come out as they were then (`weights_sha256`, each point's digest of
    them); from the first that differs on, the points are scored again. Each point carries the
    model's perplexity on the held-out text (`damage`). One job per directory (`exclusive`)."""
    with exclusive(run, "sequential", "editing sequentially"):
        _run_sequential(cfg, run, lm, loaded, damage)


def _run_sequential(
    cfg: DictConfig, run: Run, lm: LoadedModel, loaded: Loaded, damage: HeldOutPerplexity | None
) -> None:
    progress_path = run.path("sequential-progress.pt")
    resume = load_progress(progress_path)  # refused at once if it is not ours
    editor = CaseEditor(cfg, lm)
    if editor.editor is None:
        raise ValueError("sequential mode needs an editor (editor=rome, memit, ...)")
    loaded, dropped = drop_contradictions(cfg, loaded)
    reject_too_long(cfg, lm, editor, loaded, with_generation=False)
    cases = loaded.records
    batch = int(cfg.eval.sequential_batch)
    requested, beyond = within(cfg.eval.checkpoints, len(cases), "eval.checkpoints")
    checkpoints = sorted({*requested, len(cases)})
    rows_per_pass = int(cfg.eval.rows_per_pass)
    ids = [c.id for c in cases]
    if resume and (resume["ids"] != ids[: len(resume["ids"])] or resume["done"] > len(cases)):
        raise SystemExit(
            f"{progress_path} holds {resume['done']} edits of other cases than these first "
            f"{len(cases)}; remove it (or the directory) to start over."
        )
    curve = [point for point in resume["curve"]] if resume else []
    failed = list(resume["failed"]) if resume else []
    replayed = None if resume else scored_before(run)
    if resume:
        log.info("sequential editing resumes after %d edits", resume["done"])
    elif replayed:  # a copy of the run's files without its weights (another checkout)
        curve = [point for point in replayed["checkpoints"] if "weights_sha256" in point]
        log.info(
            "no %s: the edits are made again from the first; the %d checkpoints scored before "
            "are kept where the weights come out the same, bit for bit",
            progress_path.name,
            len(curve),
        )
    fluency = CheckpointGeneration(cfg, lm, cases)
    unedited_before = (replayed or {}).get("generation", {})
    if fluency.cases and resume:
        fluency.unedited = resume.get("generation_unedited")
    elif fluency.cases and unedited_before.get("cases") == [c.id for c in fluency.cases]:
        fluency.unedited = unedited_before["unedited"]
    elif fluency.cases:  # before the first edit, once; shared by every editor
        cache = GenerationCache(Path(cfg.pre_dir), "sequential", lm)
        fluency.unedited = fluency.measure(cache)
    last = resume["done"] if resume else 0  # the edits done at the call before

    def on_checkpoint(done: int, results: list[EditResult]) -> None:
        nonlocal last
        failed.extend(not r.ok for r in results[len(failed) - (done - len(results)) :])
        reached = [n for n in checkpoints if last < n <= done]
        saving = reached or done // PROGRESS_EVERY > last // PROGRESS_EVERY
        last = done
        digest = editor.weights_digest() if reached else None
        if reached and any(p["edits"] == done and p.get("weights_sha256") != digest for p in curve):
            log.warning(  # a replay whose floating point differs: score again from here
                "the weights after %d edits are not those scored before: the checkpoints from "
                "there on are scored again",
                done,
            )
            curve[:] = [point for point in curve if point["edits"] < done]
        if reached and all(point["edits"] != done for point in curve):
            probs = score_cases(lm, cases[:done], batch_size=rows_per_pass)
            metrics = [cf.case_metrics(p) for p in probs]
            files.atomic_write(  # each case's scores, for editor-against-editor comparisons
                run.path(f"checkpoint-{done}.jsonl"),
                "".join(
                    json.dumps({"id": c.id, "post": {"metrics": m}}) + "\n"
                    for c, m in zip(cases[:done], metrics, strict=True)
                ),
            )
            summary = cf.summarize(metrics, seed=int(cfg.seed))
            point = {
                "edits": done,
                "failed": sum(failed[:done]),
                "weights_sha256": digest,
                **damage_of(damage),
            }
            if fluency.cases:
                point |= fluency.measure()
            moved = reached != [done]
            if moved:  # checkpoints inside the batch just written
                point["requested"] = reached
            curve.append(point | summary)
            run.tracker.log(
                {f"sequential/{k}": summary[k]["mean"] for k in ("S", "ES", "PS", "NS")},
                step=done,
            )
            run.write_json("sequential.json", {"checkpoints": curve, **fluency.summary()})
            print(
                f"after {done} edits: "
                + " ".join(f"{k}={summary[k]['mean']:.1f}" for k in ("S", "ES", "PS", "NS"))
                + (
                    f" (for checkpoint {', '.join(map(str, reached))}: the end of the batch of "
                    f"eval.sequential_batch={batch} that reaches it)"
                    if moved
                    else ""
                )
            )
        if saving:
            state = editor.snapshot(done) | {"ids": ids[:done], "failed": failed[:done]}
            state["curve"] = curve
            state["generation_unedited"] = fluency.unedited
            save_progress(progress_path, state)
            run.note_time()

    if not resume or resume["done"] < len(cases):
        for start in range(last, len(cases), batch):  # the batches to write, before any edit
            refuse_contradictions(editor.requests(cases[start : start + batch]))
        editor.edit_sequentially(cases, on_checkpoint, batch, resume)
    run.write_json("sequential.json", {"checkpoints": curve, **fluency.summary()})
    extra: dict[str, Any] = {"sequential_batch": batch, **perplexity_summary(damage)}
    if beyond:
        extra["checkpoints_beyond_the_cases"] = beyond
    if dropped:
        extra["dropped_contradictions"] = dropped
    write_protocol_summary(cfg, run, "sequential", loaded.report(), **extra)


class CheckpointGeneration:
    """GE (and RS where ROME's files are in the data root) of the model as it is at a sequential
    checkpoint, on the generation prompts of one fixed set of cases: the data's first
    `eval.generation_cases` (none when that is null: sampling every case edited so far at
    every checkpoint would cost more than the edits). The same prompts and the same sampling
    seed at every checkpoint, and once before the first edit (`unedited`, from the generation
    cache every editor's run of this model and data shares), so the points differ only by the
    edits written in. The fixed cases are edited in the course of the run (the first
    of them at the first edits), as in AlphaEdit's setting (Fang et al. 2025)."""

    def __init__(self, cfg: DictConfig, lm: LoadedModel, cases: Sequence[CounterfactCase]):
        limit = cfg.eval.get("generation_cases")
        wanted = cfg.eval.generation is True or cfg.eval.generation == "auto"
        chosen = list(cases[: int(limit)]) if limit is not None and wanted else []
        self.cases = [c for c in chosen if c.generation_prompts]
        if cfg.eval.generation is True and chosen and not self.cases:
            raise ValueError(
                "eval.generation=true, but the cases have no generation prompts (CounterFact in "
                "EasyEdit's reduced schema has none: use data=counterfact-first1000 or another "
                "full-schema file)"
            )
        self.cfg, self.lm = cfg, lm
        self.references = Reference(Path(cfg.paths.data), self.cases) if self.cases else None
        self.unedited: dict[str, Any] | None = None

    def measure(self, unedited: GenerationCache | None = None) -> dict[str, Any]:
        """{"GE": interval, "RS": interval (where computed), "generation_cases": n} of the model
        as it is now; `unedited`: the model is unedited, so its texts may come from (and go to)
        that cache, which every editor's run of this model and data shares."""
        if unedited is not None:
            texts = unedited_generations(unedited, self.lm, self.cases, self.cfg, self.references)
        else:
            texts = generation_metrics(
                self.lm, self.cases, [None] * len(self.cases), self.cfg, self.references
            )
        out: dict[str, Any] = {"GE": mean_ci([t["GE"] for t in texts])}
        if all("RS" in t for t in texts):
            rs = mean_ci([t["RS"] for t in texts])
            out["RS"] = {k: v * 100 if k != "n" else v for k, v in rs.items()}
        return out | {"generation_cases": len(self.cases)}

    def summary(self) -> dict[str, Any]:
        """What sequential.json records beside the curve: the cases and the unedited values."""
        if not self.cases:
            return {}
        return {
            "generation": {
                "cases": [c.id for c in self.cases],
                "unedited": self.unedited,
                "note": "GE (RS) on these cases' generation prompts at every checkpoint, "
                "the same prompts and sampling seed each time",
            }
        }


def scored_before(run: Run) -> dict[str, Any] | None:
    """The sequential.json of a run whose progress file is gone (its small files restored into
    a fresh checkout: `pipeline.app.snapshot`), or None."""
    path = run.path("sequential.json")
    return files.read_json(path) if path.exists() else None


def save_progress(path: Path, state: dict[str, Any]) -> None:
    """A resumable run's state (tensors, updates and plain values), written atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    files.atomic_write(path, buffer.getvalue())


def load_progress(path: Path) -> dict[str, Any] | None:
    """`save_progress`'s state, or None if there is none. Read with `weights_only`: tensors,
    plain values and the update classes only, so a pickle planted in a results directory (a
    shared filesystem) is refused, never run; the error names the file."""
    if not path.exists():
        return None
    try:
        with torch.serialization.safe_globals([RankOneUpdate, LowRankUpdate, DenseUpdate]):
            return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise SystemExit(
            f"refusing to resume from {path}: it is not a progress file this pipeline writes "
            f"(only tensors, plain values and edit updates may be loaded; {error}). Remove it "
            "to start over."
        ) from None


PROGRESS_EVERY = 10  # edits between saves of a sequential run or a one-after-another mass pass


def run_mass(
    cfg: DictConfig,
    run: Run,
    lm: LoadedModel,
    loaded: Loaded,
    damage: HeldOutPerplexity | None = None,
) -> None:
    """For each N of `eval.mass_sizes`: the first N cases written in one joint edit, then all N
    scored on the edited model (`mass-<N>.jsonl`, and the curve in `mass.json`). A rerun skips
    the sizes already done. Editors that write requests one after another (ROME, KN) make the
    whole curve in one resumable pass (`_mass_one_after_another`). One job per directory
    (`exclusive`), which reads `mass.json` once it holds the lock: two jobs that each rewrote it
    from the copy read at their start lost each other's sizes."""
    with exclusive(run, "mass", "editing the mass curve"):
        _run_mass(cfg, run, lm, loaded, damage)


def _run_mass(
    cfg: DictConfig, run: Run, lm: LoadedModel, loaded: Loaded, damage: HeldOutPerplexity | None
) -> None:
    editor = CaseEditor(cfg, lm)
    if editor.editor is None:
        raise ValueError("mass mode needs an editor (editor=memit, rome, ...)")
    loaded, dropped = drop_contradictions(cfg, loaded)
    reject_too_long(cfg, lm, editor, loaded, with_generation=False)
    cases = loaded.records
    sizes, beyond = within(cfg.eval.mass_sizes, len(cases), "eval.mass_sizes")
    if not sizes:
        raise ValueError(
            f"eval.mass_sizes {list(cfg.eval.mass_sizes)}: none fits {len(cases)} cases"
        )
    refuse_contradictions(editor.requests(cases[: max(sizes)]))  # the largest edit has all
    pre_cache = PreCache(Path(cfg.pre_dir), "mass", lm)
    rows_per_pass = int(cfg.eval.rows_per_pass)
    saved = run.path("mass.json")
    curve = files.read_json(saved)["curve"] if saved.exists() else []
    done = {point["size"] for point in curve}
    todo = [n for n in sizes if n not in done]

    def add_point(n: int, records: list[dict], edit_seconds: float, info: dict) -> None:
        nonlocal curve
        files.atomic_write(
            run.path(f"mass-{n}.jsonl"), "".join(json.dumps(r) + "\n" for r in records)
        )
        summary = summarize_records(records, seed=int(cfg.seed))
        point = {"size": n, "edit_seconds": round(edit_seconds, 2), **info}
        point["peak_memory_gib"] = round(peak_memory_gib(lm.device), 2)
        point |= summary
        curve = sorted([*curve, point], key=lambda point: point["size"])
        files.write_json(saved, {"curve": curve})
        run.note_time()
        run.tracker.log(
            {f"mass/{k}": summary["post"][k]["mean"] for k in ("S", "ES", "PS", "NS")}, step=n
        )
        print(f"{n} edits at once ({edit_seconds:.0f} s): " + headline(summary).split("\n")[1])

    if todo and not editor.editor.joint_solve:
        _mass_one_after_another(
            run, lm, editor, cases, todo, pre_cache, rows_per_pass, add_point, damage
        )
    for n in todo if editor.editor.joint_solve else []:
        batch = cases[:n]
        started = time.perf_counter()
        edit = editor.mass(batch)
        edit_seconds = time.perf_counter() - started
        pre = pre_cache.get(batch, rows_per_pass)
        with edited(lm, [edit.updates]):
            post = [scored(p) for p in score_cases(lm, batch, batch_size=rows_per_pass)]
            damaged = damage_of(damage)
        seconds = time.perf_counter() - started
        records = [
            case_record(c, p, q, r, seconds / n)
            for c, p, q, r in zip(batch, pre, post, edit.results, strict=True)
        ]
        reused = sum(bool((r.info or {}).get("z_reused")) for r in edit.results)
        info: dict[str, Any] = {"values_reused": reused, **damaged}
        if "seconds" in edit.info:  # the editor's own split of edit_seconds (z, spread)
            info["edit_seconds_by_step"] = edit.info["seconds"]
        add_point(n, records, edit_seconds, info)
    extra: dict[str, Any] = {"sizes_beyond_the_cases": beyond} if beyond else {}
    if dropped:
        extra["dropped_contradictions"] = dropped
    extra |= perplexity_summary(damage)
    write_protocol_summary(cfg, run, "mass", loaded.report(), **extra)


def mass_curve(run: Run, seed: int) -> list[dict[str, Any]]:
    """The mass curve of every size on disk: `mass.json`'s points, and for a `mass-<N>.jsonl`
    without one (a job stopped between the two writes, or a directory that two jobs wrote at
    once before the lock) a point summarised from its records, marked `rebuilt_from`."""
    saved = run.path("mass.json")
    points = {p["size"]: p for p in (files.read_json(saved)["curve"] if saved.exists() else [])}
    for path in run.out_dir.glob("mass-*.jsonl"):
        size = int(path.stem.removeprefix("mass-"))
        if size not in points:
            log.warning("%s has no point in %s: summarised from its records", path, saved)
            records = read_jsonl([path])
            points[size] = {"size": size, "rebuilt_from": path.name}
            points[size] |= summarize_records(records, seed=seed)
    return [points[size] for size in sorted(points)]


def write_protocol_summary(
    cfg: DictConfig, run: Run, mode: str, data_report: dict[str, Any], **extra: Any
) -> None:
    """`summary.json` of a mass or sequential run, from its files on disk (a run's end, or
    `pipeline.merge` of its directory)."""
    if mode == "mass":
        points = {"curve": mass_curve(run, int(cfg.seed))}
    else:
        saved = run.path("sequential.json")
        points = {"checkpoints": files.read_json(saved)["checkpoints"] if saved.exists() else []}
    if not next(iter(points.values())):
        raise SystemExit(f"no {mode} results in {run.out_dir} to summarize")
    summary = {"mode": mode, "model": cfg.model.name, "editor": cfg.editor.name}
    run.write_summary(summary | {"data": data_report} | points | extra)


PROTOCOLS: dict[
    str, Callable[[DictConfig, Run, LoadedModel, Loaded, HeldOutPerplexity | None], None]
] = {
    "mass": run_mass,
    "sequential": run_sequential,
}


def _mass_one_after_another(
    run: Run,
    lm: LoadedModel,
    editor: CaseEditor,
    cases: Sequence[CounterfactCase],
    sizes: Sequence[int],
    pre_cache: PreCache,
    rows_per_pass: int,
    add_point: Callable[[int, list[dict], float, dict], None],
    damage: HeldOutPerplexity | None = None,
) -> None:
    """The mass curve of an editor whose joint edit writes requests one after another: the
    joint edit of N passes through that of every smaller N, so one pass writes the cases in
    order, in place, and scores the first n at each size n. Each case's updates are saved to
    `mass-progress.pt` every `PROGRESS_EVERY` edits and after each size; a rerun re-applies them
    in the same order (the same weights, bit for bit) and goes on, a larger size later starts
    where the pass stopped, and a smaller one replays the first n. Each chunk is the editor's
    own `joint`, so the edits are those a single joint edit of N makes."""
    last = max(sizes)
    pre = pre_cache.get(cases[:last], rows_per_pass)  # on the unedited model, before any edit
    progress_path = run.path("mass-progress.pt")
    ids = [c.id for c in cases[:last]]
    state: dict[str, Any] = {"ids": [], "updates": [], "edits": [], "edit_seconds": []}
    if progress_path.exists():
        state = load_progress(progress_path)
        have = state["ids"][: len(ids)]
        if have != ids[: len(have)]:
            differing = next(a for a, b in zip(have, ids, strict=False) if a != b)
            raise SystemExit(
                f"{progress_path} holds edits of other cases than these (first differing case "
                f"{differing!r}); remove it to start the pass over."
            )
        log.info("one-after-another mass pass: %d edits saved", len(state["ids"]))

    def score(n: int) -> None:
        batch = cases[:n]
        post = [scored(p) for p in score_cases(lm, batch, batch_size=rows_per_pass)]
        seconds = sum(state["edit_seconds"][:n])
        records = [
            {**case_record(c, p, q, None, seconds / n), "edit": e}
            for c, p, q, e in zip(batch, pre[:n], post, state["edits"][:n], strict=True)
        ]
        add_point(n, records, seconds, {"values_reused": 0, **damage_of(damage)})

    with preserved_weights(lm, editor.editor.layers):
        applied = 0
        for n in sorted(sizes):
            if n <= len(state["ids"]):  # saved edits reach this size: replay, then score
                for updates in state["updates"][applied:n]:
                    apply_update(lm, updates)
                applied = n
                score(n)
        for updates in state["updates"][applied:]:
            apply_update(lm, updates)
        done = len(state["ids"])
        stops = sorted(
            {n for n in sizes if n > done} | set(range(done + PROGRESS_EVERY, last, PROGRESS_EVERY))
        )
        bar = tqdm(total=last, initial=min(done, last), desc=f"{editor.name}: one after another")
        for stop in stops:
            chunk = cases[len(state["ids"]) : stop]
            started = time.perf_counter()
            edit = editor.mass(chunk)
            apply_update(lm, edit.updates)
            seconds = (time.perf_counter() - started) / len(chunk)
            state["ids"] += [c.id for c in chunk]
            state["updates"] += [as_list(r.update) for r in edit.results]
            state["edits"] += [edit_summary(r) for r in edit.results]
            state["edit_seconds"] += [seconds] * len(chunk)
            bar.update(len(chunk))
            if stop in sizes:
                score(stop)  # before saving: a crash in between redoes the chunk, then scores
            save_progress(progress_path, state)
            run.note_time()
        bar.close()
