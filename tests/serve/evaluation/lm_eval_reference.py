"""lm-evaluation-harness 0.4 on local task YAML, offline: a checkpoint in-process (HFLM, fp32, CPU), or a served
model through its `local-completions` model (OpenAI /v1/completions, token-id prompts from the checkpoint's
tokenizer).

Run as a separate process (one for all tasks: importing lm-eval costs tens of seconds) (`python -m tests.serve.evaluation.lm_eval_reference SPEC.json OUT.json`) so
lm-eval's offline switches, logging and dataset cache stay out of the test process. SPEC: {"checkpoint",
"task_dir", "tasks", "limit", "max_length", and for local-completions "base_url" and "model"}; OUT: {task: {"results": ..., "samples": [{"doc_id", "resps"}]}}.
"""

from __future__ import annotations

import json
import os
import sys


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      HF_DATASETS_CACHE=os.path.join(spec["task_dir"], "hf_datasets_cache"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if spec.get("base_url"):
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        lm = LocalCompletionsAPI(base_url=spec["base_url"], model=spec["model"], tokenizer=spec["checkpoint"],
                                 tokenizer_backend="huggingface", tokenized_requests=True, num_concurrent=4,
                                 max_length=spec.get("max_length"))
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=spec["checkpoint"], device="cpu", dtype="float32", batch_size=16,
                  max_length=spec.get("max_length"))
    out = simple_evaluate(model=lm, tasks=spec["tasks"], task_manager=TaskManager(include_path=spec["task_dir"]),
                          log_samples=True, limit=spec.get("limit"))
    by_task = {}
    for task in spec["tasks"]:
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        by_task[task] = {"results": out["results"][task],
                         "samples": [{"doc_id": s["doc_id"], "resps": s["filtered_resps"]} for s in samples]}
    with open(out_path, "w") as fh:
        json.dump(by_task, fh, default=float)


if __name__ == "__main__":
    main(*sys.argv[1:])
