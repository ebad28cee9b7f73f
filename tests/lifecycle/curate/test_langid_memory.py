"""Language id's memory in forked workers: lingua's models are preloaded once in the main process and shared.

lingua loads n-gram models lazily, and which ones depends on a text's characters: a worker that met its first
"½" loaded ~180 MB in one step, mid-run (langid.py, docs/BENCHMARKS.md). `preload_models` loads them all in
the main process before the workers fork. These tests run in a fresh interpreter each (a preload starts
lingua's thread pool, which this test process should not inherit into anything it forks later), fork a real
child the way datatrove's local executor does, and check in the child: the same detections as the parent,
no model loading (its heap does not grow), the models still shared with the parent (not copied), and no hang
(lingua's preload in a forked child would deadlock; lazy detection must not).
"""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, os, sys
from lifecycle.data.curate.config import LangIdConfig
from lifecycle.data.curate.langid import LanguageId, preload_models

TEXTS = [
    "The committee met on Tuesday and agreed to publish the report before the end of the month.",
    "The boards for the cap are ½ inch ( 13 mm ) thick and 9 inches ( 230 mm ) wide at the base .",
    "今天天气很好，我们一起去公园散步，然后在湖边喝茶聊天。",
    "The museum opened in 1901. 博物馆在一九零一年开放，当时吸引了很多游客前来参观。",
    "Der Ausschuss hat am Dienstag beschlossen, den Bericht noch vor Ende des Monats zu veröffentlichen.",
    "Комитет собрался во вторник и решил опубликовать доклад до конца месяца.",
    "委員会は火曜日に集まり、月末までに報告書を公表することに合意しました。",
]


def rollup_mb():
    out = {}
    for line in open("/proc/self/smaps_rollup").read().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) // 1024
    return out


config = LangIdConfig()
if sys.argv[1] == "preload":
    preload_models(config.candidates)
read_fd, write_fd = os.pipe()
pid = os.fork()
if pid == 0:
    block = LanguageId(config, sys.argv[2])  # what a worker does: a fresh block, set up lazily in the child
    block.setup()
    before = rollup_mb()["Anonymous"]
    got = [block.detect(t) for t in TEXTS]
    after = rollup_mb()
    os.write(write_fd, json.dumps({"detections": got, "anon_growth_mb": after["Anonymous"] - before,
                                   "private_dirty_mb": after["Private_Dirty"],
                                   "shared_dirty_mb": after["Shared_Dirty"]}).encode())
    os._exit(0)
os.waitpid(pid, 0)
child = json.loads(os.read(read_fd, 1 << 20))
parent = LanguageId(config, sys.argv[2])  # after the child: in "lazy" mode nothing was loaded before the fork
parent.setup()
expected = [parent.detect(t) for t in TEXTS]
print(json.dumps({"parent": expected, "parent_anon_mb": rollup_mb()["Anonymous"], **child}))
"""


def _same(a: list, b: list) -> bool:
    """Same languages and mixed flags; confidences equal up to float summation order (lingua sums in hash order)."""
    return len(a) == len(b) and all(x[0] == y[0] and x[2] == y[2] and abs(x[1] - y[1]) < 1e-9 for x, y in zip(a, b))


def _run(mode: str, tmp_path) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(tmp_path)], capture_output=True, text=True,
                          timeout=180)  # a deadlocked child would hang the parent's waitpid: the timeout fails it
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_preloaded_models_are_shared_by_a_forked_worker_which_loads_nothing(tmp_path) -> None:
    r = _run("preload", tmp_path)
    assert _same(r["detections"], r["parent"]), r
    languages = [d[0] for d in r["detections"]]
    assert languages[0] == languages[1] == "en" and languages[2] == "zh" and languages[4] == "de", languages
    assert languages[5] == "ru" and languages[6] == "ja", languages
    assert r["anon_growth_mb"] < 20, r  # no model loaded in the child
    assert r["shared_dirty_mb"] > 150, r  # the ~244 MB of models are the parent's pages, still shared
    assert r["private_dirty_mb"] < 60, r  # ... not copied into the child


def test_without_preload_the_worker_loads_models_itself(tmp_path) -> None:
    """The contrast that makes the preload worth its 244 MB in the main process: a lazy worker loads its own."""
    r = _run("lazy", tmp_path)
    assert _same(r["detections"], r["parent"]), r
    preloaded = _run("preload", tmp_path)
    assert r["private_dirty_mb"] > preloaded["private_dirty_mb"] + 100, (r, preloaded)
