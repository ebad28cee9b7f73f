"""Final shards: `<output>/data/shard-<rank>-<k>.jsonl` ({"text", "id", "source", "language"} per line),
at most `docs_per_shard` documents each, and optionally packed token blocks for pretraining.

Packing (option `pack`): documents are tokenized with the project's tokenizer, each followed by EOS,
and cut into blocks of `seq_len` tokens (lifecycle/data/packing.py's rule), appended as int32 to
`<output>/packed/rank-<rank>.bin`, shape (num_blocks, seq_len) in row order; the tail shorter than a
block is dropped. Only the blocks and a remainder of < seq_len tokens are ever in memory.
Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from tqdm import tqdm

from lifecycle.data.curate.config import PackConfig
from lifecycle.data.curate.mixing import TokenCounter, document_counts
from lifecycle.data.curate.step import CurateStep, write_counts


class _Shards:
    def __init__(self, folder: Path, rank: int, docs_per_shard: int) -> None:
        self.folder, self.rank, self.docs_per_shard = folder, rank, docs_per_shard
        self.index, self.in_shard, self.fh, self.tmp = 0, 0, None, None

    def write(self, line: str) -> None:
        if self.fh is None:
            self.tmp = self.folder / f".shard-{self.rank:05d}-{self.index:05d}.jsonl.tmp"
            self.fh = open(self.tmp, "w", encoding="utf-8")
        self.fh.write(line)
        self.in_shard += 1
        if self.in_shard == self.docs_per_shard:
            self.close()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            os.replace(self.tmp, self.folder / f"shard-{self.rank:05d}-{self.index:05d}.jsonl")
            self.fh, self.index, self.in_shard = None, self.index + 1, 0


class OutputWriter(CurateStep):
    block = "output"
    name = "💽 shards (+ packed tokens)"

    def __init__(self, output_dir: str, work_dir: str, docs_per_shard: int, pack: PackConfig,
                 tokens: TokenCounter, show_progress: bool = True) -> None:
        super().__init__(work_dir)
        self.output_dir = output_dir
        self.docs_per_shard = docs_per_shard
        self.pack = pack
        self.tokens = tokens
        self.show_progress = show_progress

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        folder = Path(self.output_dir) / "data"
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"shard-{rank:05d}-*.jsonl"):  # a rerun of this rank rewrites all of its shards
            stale.unlink()
        shards = _Shards(folder, rank, self.docs_per_shard)
        packer = _Packer(Path(self.output_dir) / "packed", rank, self.pack, self.tokens) if self.pack.enabled else None
        counts: Counter[str] = Counter()
        for doc in tqdm(data, desc=f"write rank {rank}", unit="doc", position=rank, leave=False,
                        disable=not self.show_progress):
            counts.update(document_counts(doc, self.tokens))
            shards.write(json.dumps({"text": doc.text, "id": doc.id, "source": doc.metadata.get("source"),
                                     "language": doc.metadata.get("language")}, ensure_ascii=False) + "\n")
            if packer is not None:
                packer.add(doc.text)
            yield doc
        shards.close()
        if packer is not None:
            counts["packed_blocks"] += packer.close()
        write_counts(self.work_dir, self.block, rank, counts)


class _Packer:
    def __init__(self, folder: Path, rank: int, pack: PackConfig, tokens: TokenCounter) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.final = folder / f"rank-{rank:05d}.bin"
        self.tmp = folder / f".rank-{rank:05d}.bin.tmp"
        self.fh = open(self.tmp, "wb")
        self.seq_len, self.tokens = pack.seq_len, tokens
        self.buffer: list[int] = []
        self.num_blocks = 0
        self.eos: int | None = None

    def add(self, text: str) -> None:
        if self.eos is None:
            self.tokens.encode("")  # loads the tokenizer
            self.eos = self.tokens._tok.eos_token_id
            if self.eos is None:
                from lifecycle.errors import DataError

                raise DataError(f"{self.tokens.tokenizer_path}: the tokenizer has no eos_token; packing needs one")
        self.buffer += self.tokens.encode(text) + [self.eos]
        full = len(self.buffer) // self.seq_len * self.seq_len
        if full:
            np.asarray(self.buffer[:full], dtype=np.int32).tofile(self.fh)  # (k * seq_len,)
            self.num_blocks += full // self.seq_len
            self.buffer = self.buffer[full:]

    def close(self) -> int:
        self.fh.close()
        os.replace(self.tmp, self.final)
        return self.num_blocks
