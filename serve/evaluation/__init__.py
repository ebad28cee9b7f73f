"""Evaluation of served models: tasks over local data, scored through any EvalTarget.

    task.py        TaskSpec: a task file (YAML/JSON) -> validated spec; errors name file, line, key
    records.py     data files (jsonl/json/csv/parquet/txt/lines, .gz/.bz2) -> Records with file:line
    data_root.py   where relative data paths point; the server's fence around its --data-root
    dataset.py     spec + data root -> EvalItems (files resolved, side columns joined, few-shot examples)
    items.py       records -> EvalItems: one request each (log-likelihood, rolling, generation)
    metrics.py     pure scorers: acc / acc_norm, perplexities, extraction, exact match, BLEU, ROUGE
    results.py     answers, per-item and per-task metrics
    target.py      the EvalTarget Protocol, the gRPC target, open_target(url)
    openai_target.py  OpenAI-compatible /v1/completions (echo + logprobs)
    retry.py       exponential backoff on transient failures
    cache.py       the per-item JSON Lines cache that makes a run resumable
    runner.py      run_task: bounded concurrency, retries, progress, cache
    report.py      the JSON report and the printed table
    cli.py         `lmforge eval`
    server_job.py  the same tasks run inside the server (the Evaluation gRPC service)
    tasks/         shipped task files over ../shared/data
"""
