"""The curation pipeline as datatrove stages, run one after another by an executor.

    filter     InputReader(parts) > langid > clean > quality > classifier > perplexity > pii > decontam
               > ShardWriter(work/filtered) > ExactDedupSignature                       (N tasks)

N = input MB / task_mb tasks, rounded up to a multiple of `workers`, run on `workers` processes: a task's memory
grows with its share of the input (exact-dedup hashes and MinHash band signatures are sorted in memory at the end
of a task), so a larger corpus means more tasks, not bigger ones; a multiple of the workers, so that no worker
runs a last task alone while the others wait (1 GB on 2 workers: 5 tasks of 205 MB ran as 2 + 2 + 1 with
one core idle in the last round; now 6 of 171 MB, 3 full rounds). Every other stage streams or holds only duplicates.

    exact_find ExactFindDedups                                                         (1 task)
    near_sig   ShardReader(filtered) > ExactDedupFilter > ShardWriter(work/exact)
               > CjkMinhashSignature                                                    (N tasks)
    buckets    MinhashDedupBuckets                                                      (bands tasks)
    cluster    VerifiedMinhashCluster                                                   (1 task)
    dedup      ShardReader(exact) > MinhashDedupFilter > count > ShardWriter(work/deduped) (N tasks)
    mix        ShardReader(deduped) > Mixer(rates from dedup's counts) > OutputWriter    (N tasks)

Each stage is a datatrove executor with its own logging dir under `<output>/work/logs/<stage>`; a
task that completed is never run again (datatrove's `skip_completed`), so an interrupted run resumes
where it stopped when the same command is run again. Blocks that are switched off are left out;
stages with nothing to do are skipped. The executor is datatrove's LocalPipelineExecutor
(multiprocessing, `workers` processes) or RayPipelineExecutor (`executor: ray`); SlurmPipelineExecutor
takes the same stage lists (see docs in the README's curate section).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lifecycle.data.curate.config import CurateConfig
from lifecycle.data.manifest import atomic_write_text
from lifecycle.errors import ConfigError

log = logging.getLogger(__name__)

STAGES = ("filter", "exact_find", "near_sig", "buckets", "cluster", "dedup", "mix")


class Paths:
    def __init__(self, output_dir: str | Path) -> None:
        self.output = Path(output_dir)
        self.work = self.output / "work"
        self.filtered = self.work / "filtered"
        self.exact = self.work / "exact"
        self.deduped = self.work / "deduped"
        self.exact_sigs = self.work / "exact_sigs"
        self.exact_dups = self.work / "exact_dups"
        self.minhash_sigs = self.work / "minhash_sigs"
        self.minhash_buckets = self.work / "minhash_buckets"
        self.minhash_remove = self.work / "minhash_remove"

    def logs(self, stage: str) -> Path:
        return self.work / "logs" / stage


def per_document_blocks(config: CurateConfig, work: str) -> list:
    """The blocks that look at one document at a time, in pipeline order."""
    from lifecycle.data.curate.clean import Clean
    from lifecycle.data.curate.langid import LanguageId
    from lifecycle.data.curate.pii import Pii
    from lifecycle.data.curate.quality import Quality

    k = config.samples_per_reason
    blocks: list = []
    if config.langid.enabled:
        blocks.append(LanguageId(config.langid, work, k))
    if config.clean.enabled:
        blocks.append(Clean(config.clean, work, k))
    if config.quality.enabled:
        blocks.append(Quality(config.quality, work, k))
    if config.classifier.enabled:
        from lifecycle.data.curate.classifier import ClassifierFilter

        blocks.append(ClassifierFilter(config.classifier, work, k))
    if config.perplexity.enabled:
        from lifecycle.data.curate.perplexity import PerplexityFilter

        blocks.append(PerplexityFilter(config.perplexity, work, k))
    if config.pii.enabled:
        blocks.append(Pii(config.pii, work, k))
    if config.decontam.enabled:
        from lifecycle.data.curate.decontam import Decontaminate

        blocks.append(Decontaminate(config.decontam, work, k))
    return blocks


def _executor(config: CurateConfig, pipeline: list, tasks: int, logs: Path):
    workers = min(config.workers, tasks)
    if config.executor == "ray":
        try:
            from datatrove.executor.ray import RayPipelineExecutor
        except ImportError as err:
            raise ConfigError(f"executor: ray needs the `ray` package ({err}); pip install ray, "
                              "or use executor: local") from None
        return RayPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=str(logs))
    from datatrove.executor import LocalPipelineExecutor

    # fork: the steps are already built in this process; forkserver would re-import and pickle them all.
    return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=str(logs),
                                 start_method="fork")


def num_tasks(config: CurateConfig, files: dict[str, str]) -> int:
    """Tasks per stage: enough that none holds more than `task_mb` of input, rounded up to a multiple of the
    workers (equal shares: every round of tasks keeps every worker busy)."""
    import os

    total = sum(os.path.getsize(p) for p in files)
    needed = max(1, -(-total // (config.task_mb * 1_000_000)))
    return config.workers * -(-needed // config.workers)


def check_output_apart_from_inputs(config: CurateConfig, files: dict[str, str]) -> None:
    """The output directory must be a directory apart from the inputs: inside an input directory, a rerun (or a
    resume) would read the run's own shards as input; holding an input, the shards could overwrite it."""
    from lifecycle.checkpoint import check_output_dir

    check_output_dir(config.output_dir, None)  # not a file
    out = Path(config.output_dir).resolve()
    for raw in config.inputs:
        src = Path(raw).resolve()
        if src.is_dir() and (out == src or src in out.parents):
            raise ConfigError(f"--output-dir {config.output_dir}: inside the input directory {raw}, so a rerun would "
                              "read this run's output as input; write it somewhere outside the inputs")
    for path in files:
        if out in Path(path).resolve().parents:
            raise ConfigError(f"--output-dir {config.output_dir}: holds the input {path}, which the run's shards "
                              "could overwrite; write the output somewhere outside the inputs")


def check_resume(config: CurateConfig, paths: Paths) -> None:
    """A work dir belongs to one config: resuming with another would mix two runs' shards."""
    saved = paths.work / "config.json"
    current = json.dumps(config.to_dict(), sort_keys=True, indent=1)
    if saved.is_file():
        if saved.read_text(encoding="utf-8") != current:
            raise ConfigError(f"{paths.output}: holds an unfinished or finished run with another configuration "
                              f"({saved}); use another --output-dir, or delete it to start over")
        log.info("resuming the run in %s (finished tasks are not redone)", paths.output)
        return
    paths.work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, current)


def run_pipeline(config: CurateConfig, files: dict[str, str], *, show_progress: bool = True,
                 stop_after: str | None = None) -> Paths:
    """Run every stage (resuming finished tasks); returns the paths. `stop_after` (a stage name) is for tests."""
    from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                      ExactFindDedups)
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupFilter

    from lifecycle.data.curate.dedup import CjkMinhashSignature, VerifiedMinhashCluster, minhash_config, normalized_text
    from lifecycle.data.curate.mixing import Mixer, SourceCounter, TokenCounter, mixing_rates
    from lifecycle.data.curate.output import OutputWriter
    from lifecycle.data.curate.shards import InputReader, ShardReader, ShardWriter, plan_parts
    from lifecycle.data.curate.step import Guarded, read_counts

    check_output_apart_from_inputs(config, files)
    paths = Paths(config.output_dir)
    check_resume(config, paths)
    work = str(paths.work)
    n = num_tasks(config, files)
    k = config.samples_per_reason
    tokens = TokenCounter(config.pack.tokenizer)
    exact_cfg = ExactDedupConfig(content_getter=normalized_text)
    stages: list[tuple[str, list, int]] = []

    parts = plan_parts(list(files), n, txt_mode=config.txt_mode, split_bytes=config.split_bytes)
    log.info("inputs: %d files in %d parts, %d tasks over %d workers", len(files), sum(map(len, parts)), n,
             config.workers)
    filter_steps = [InputReader(files, work, text_field=config.text_field, txt_mode=config.txt_mode,
                                show_progress=show_progress, parts=parts),
                    *per_document_blocks(config, work), ShardWriter(paths.filtered)]
    if config.dedup.exact:
        filter_steps.append(ExactDedupSignature(str(paths.exact_sigs), exact_cfg))
    stages.append(("filter", filter_steps, n))
    if config.dedup.exact:
        stages.append(("exact_find", [ExactFindDedups(str(paths.exact_sigs), str(paths.exact_dups), exact_cfg)], 1))
    near_steps: list = [ShardReader(paths.filtered)]
    if config.dedup.exact:
        near_steps.append(Guarded(ExactDedupFilter(str(paths.exact_dups), exact_cfg), "dedup_exact",
                                  "exact_duplicate", work, k))
    near_steps.append(ShardWriter(paths.exact))
    if config.dedup.near:
        near_steps.append(CjkMinhashSignature(str(paths.minhash_sigs), config.dedup))
    stages.append(("near_sig", near_steps, n))
    dedup_steps: list = [ShardReader(paths.exact)]
    if config.dedup.near:
        mh = minhash_config(config.dedup)
        stages.append(("buckets", [MinhashDedupBuckets(str(paths.minhash_sigs), str(paths.minhash_buckets),
                                                       config=mh)], config.dedup.bands))
        stages.append(("cluster", [VerifiedMinhashCluster(str(paths.minhash_buckets), str(paths.minhash_remove),
                                                          str(paths.minhash_sigs), config.dedup)], 1))
        dedup_steps.append(Guarded(MinhashDedupFilter(str(paths.minhash_remove)), "dedup_near", "near_duplicate",
                                   work, k))
    dedup_steps += [SourceCounter("deduped", tokens, work), ShardWriter(paths.deduped)]
    stages.append(("dedup", dedup_steps, n))

    total = len(stages) + 1
    for number, (name, steps, tasks) in enumerate(stages, 1):
        log.info("stage %d/%d: %s (%d tasks)", number, total, name, tasks)
        executor = _executor(config, steps, tasks, paths.logs(name))
        if name == "filter" and config.langid.enabled and config.executor == "local" \
                and executor.get_incomplete_ranks():
            from lifecycle.data.curate.langid import preload_models

            preload_models(config.langid.candidates)  # once, shared by the forked workers (langid.py, memory)
        executor.run()
        if name == stop_after:
            return paths

    counted = read_counts(work, "deduped")
    per_source = {key.split("/", 2)[2]: v for key, v in counted.items() if key.startswith("tokens/source/")}
    rates = mixing_rates(per_source, dict(config.mix.weights))
    atomic_write_text(paths.work / "mix_rates.json", json.dumps(rates, indent=1, sort_keys=True))
    mix_steps: list = [ShardReader(paths.deduped)]
    if config.mix.weights:
        mix_steps.append(Mixer(rates, config.mix.seed, work, k))
    mix_steps.append(OutputWriter(str(paths.output), work, config.docs_per_shard, config.pack, tokens,
                                  show_progress=show_progress))
    log.info("stage %d/%d: mix and write (%d tasks)", total, total, n)
    _executor(config, mix_steps, n, paths.logs("mix")).run()
    return paths


def quiet_datatrove() -> None:
    """datatrove logs every step at INFO to stderr, which buries our progress bars: keep its warnings on stderr.

    Its per-task logger (utils.logging.add_task_logger, called by the executor for every task) is replaced by
    one that writes the same full log to `<logs>/logs/task_<rank>.log` but only WARNING and above to stderr.
    """
    import sys

    import datatrove.executor.base as base
    from datatrove.utils import logging as dt_logging
    from loguru import logger

    def add_task_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
        logger.remove()
        logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
        logger.add(sys.stderr, level="WARNING", format="datatrove {level}: {message}")
        logger.add(logfile, level="DEBUG", colorize=False)
        return logfile

    def setup_default_logger():  # what close_task_logger restores after an in-process task
        logger.remove()
        logger.add(sys.stderr, level="WARNING", format="datatrove {level}: {message}")

    setup_default_logger()
    base.add_task_logger = add_task_logger
    dt_logging.add_task_logger = add_task_logger
    dt_logging.setup_default_logger = setup_default_logger
