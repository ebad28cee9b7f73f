"""A task's items from its data: resolve the files (serve/evaluation/data_root.py), read the records
(records.py), join side columns, take the few-shot examples, build the items (items.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lifecycle.errors import DataError
from serve.evaluation.data_root import DataRoot
from serve.evaluation.items import EvalItem, build_items
from serve.evaluation.records import ReadOptions, Record, inline_records, read_lines_column, read_records
from serve.evaluation.task import TaskSpec


def read_options(spec: TaskSpec) -> ReadOptions:
    return ReadOptions(format=spec.format, txt_split=spec.txt_split, txt_split_regex=spec.txt_split_regex,
                       lines_fields=spec.lines_fields, csv_delimiter=spec.csv_delimiter)


def read_task_records(spec: TaskSpec, root: DataRoot, patterns: Sequence[str], what: str,
                      max_records: int | None = None) -> list[Record]:
    records: list[Record] = []
    for pattern in patterns:
        for path in root.resolve(pattern, f"{spec.where(what)}: {what}"):
            for record in read_records(path, read_options(spec)):
                records.append(record)
                if max_records is not None and len(records) >= max_records:
                    return records
    return records


def load_items(spec: TaskSpec, root: DataRoot, *, limit: int | None = None,
               inline: Sequence[Mapping[str, Any]] | None = None, data: Sequence[str] | None = None,
               ) -> list[EvalItem]:
    """The task's items. `inline`: records given directly (the server's Evaluate items) instead of files;
    `data`: file patterns overriding the task's `data`."""
    if inline is not None:
        records = inline_records(inline)
    else:
        # join_lines pairs records with side files by position, so it needs all of them; otherwise stop at limit.
        records = read_task_records(spec, root, data or spec.data, "data",
                                    None if spec.join_lines else limit)
    if not records:
        raise DataError(f"{spec.where('data')}: the task's data holds no records")
    joined = {column: read_lines_column(root.resolve(path, f"{spec.where('join_lines')}: join_lines")[0])
              for column, path in spec.join_lines.items()} if inline is None else {}
    fewshot = (read_task_records(spec, root, spec.fewshot_data, "fewshot_data", spec.num_fewshot + 1)
               if spec.num_fewshot else [])
    if spec.num_fewshot and len(fewshot) < spec.num_fewshot:
        raise DataError(f"{spec.where('fewshot_data')}: {len(fewshot)} records, fewer than num_fewshot "
                        f"{spec.num_fewshot}")
    return build_items(spec, records, fewshot, limit=limit, joined=joined)
