"""Stage `edit`: edit facts into a model, show its generations before and after, save it.

    python -m pipeline.edit 'request={prompt: "The mother tongue of {} is",
                                      subject: Danielle Darrieux, target_new: English}'
    python -m pipeline.edit requests=my_requests.json editor=memit model=gpt2-xl

Requests are plain (`prompt` with "{}" for the subject, or with the subject written in;
`subject`, `target_new`, optionally `target_true`) or CounterFact records of either schema. They
are checked as `evaluate` checks its records (`edited_model.PendingEdit.check`), against the
loaded model, before anything is written: a bad one ends the run with one line naming it. The
requests are written in one edit (as `pipeline.api`'s `Model.edit`); the results directory gets
`generations.md` and `generations.json` (each prompt's continuation before and after; the table
is printed too), `requests.json`, and with `edit.save_model` the edited model in `model/`
(`transformers.AutoModelForCausalLM.from_pretrained` loads it; `model/edit.json` says what it
is).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.app.edited_model import (
    NothingEdited,
    PendingEdit,
    as_records,
    generation_markdown,
    request_slug,
)
from pipeline.app.editors import check_settings
from pipeline.app.stage import Run, stage
from pipeline.core import files
from pipeline.core.editing.requests import ContradictoryRequests
from pipeline.core.models import load_model
from pipeline.data.records import RecordError, load_requests


def given_requests(cfg: DictConfig) -> tuple[list[Any], str]:
    """The raw requests of `request` and `requests` (a JSON file, or a list), and what names
    them in an error: `request` (the command line) or the file."""
    raws: list[Any] = []
    sources = []
    if cfg.requests is not None:
        if isinstance(cfg.requests, ListConfig):
            raws += OmegaConf.to_container(cfg.requests, resolve=True)
            sources.append("requests")
        else:
            path = Path(str(cfg.requests))
            if not path.is_file():
                raise SystemExit(f"error: requests={path}: no such file")
            loaded = files.read_json(path)
            raws += loaded if isinstance(loaded, list) else [loaded]
            sources.append(str(path))
    if cfg.request is not None:
        if not isinstance(cfg.request, DictConfig):
            raise SystemExit(
                f"error: request={cfg.request!r}: a request is a dict, "
                "'request={prompt: \"...{}...\", subject: ..., target_new: ...}'"
            )
        raws.append(OmegaConf.to_container(cfg.request, resolve=True))
        sources.append("request")
    if not raws:
        raise SystemExit(
            'error: no request: give one with \'request={prompt: "The mother tongue of {} is", '
            "subject: Danielle Darrieux, target_new: English}' or a file with requests=FILE"
        )
    return raws, " + ".join(sources)


def check(cfg: DictConfig) -> PendingEdit:
    """The requests checked against the model and editor before the run writes anything."""
    raws, source = given_requests(cfg)
    try:
        load_requests(as_records(raws), source)  # the checks of the records alone, before loading
        lm = load_model(
            cfg.model,
            device=cfg.device,
            dtype=cfg.dtype,
            cache_dir=cfg.paths.cache,
            seed=int(cfg.seed),
        )
        check_settings(cfg, lm.n_layers)
        pending = PendingEdit.check(cfg, lm, raws, source)
    except (RecordError, ContradictoryRequests, TypeError) as error:
        raise SystemExit(f"error: {error}") from None
    if cfg.edit.name is None:
        cfg.edit.name = request_slug(pending.cases)
    return pending


@stage("edit", before=check)
def main(cfg: DictConfig, run: Run, ready: PendingEdit) -> None:
    try:
        edit = ready.apply()
    except NothingEdited as error:
        raise SystemExit(f"error: {error}") from None
    run.write_json("requests.json", [c.to_dict() for c in edit.cases])
    prompts = [*edit.prompts(), *cfg.edit.prompts]
    rows = edit.generate(
        list(dict.fromkeys(prompts)),
        max_new_tokens=int(cfg.edit.max_new_tokens),
        top_k=int(cfg.edit.top_k),
        seed=int(cfg.seed),
    )
    table = generation_markdown(rows)
    files.atomic_write(run.path("generations.md"), table)
    options = {"max_new_tokens": int(cfg.edit.max_new_tokens), "top_k": int(cfg.edit.top_k)}
    run.write_json("generations.json", {"rows": rows, **options})
    print(table, end="")
    for failure in edit.failed:
        print(f"not edited: request {failure['id']}: {failure['error']}")
    saved = edit.save(run.path("model")) if cfg.edit.save_model else None
    if saved is not None:
        print(f"edited model: {saved} (AutoModelForCausalLM.from_pretrained loads it)")
    run.tracker.table(
        "generations", ["prompt", "before", "after"], [list(r.values()) for r in rows]
    )
    manifest = edit.manifest()
    run.write_summary(
        {
            "model": edit.lm.name,
            "editor": edit.editor_name,
            "requests": len(edit.cases),
            "failed": edit.failed,
            "edit_seconds": round(edit.seconds, 3),
            "update": manifest["update"],
            "statistics": manifest["statistics"],
            "saved_model": str(saved) if saved is not None else None,
        }
    )
    edit.restore()


if __name__ == "__main__":
    main()
