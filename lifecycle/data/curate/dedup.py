"""Deduplication on datatrove's disk-based stages: exact (normalized hash) and MinHash-LSH, both streaming.

Exact: datatrove's ExactDedupSignature / ExactFindDedups / ExactDedupFilter on `normalized_text`
(lower case, no punctuation, whitespace collapsed: datatrove's simplify_text), so "Hello, World!"
and "hello world" are one document.

Near duplicates: datatrove's four MinHash stages (signatures -> per-band sorted buckets merged with a
heap -> union-find clusters -> filter), which keep memory bounded: signatures are sorted per band on
disk and merged, and only duplicate pairs are held in memory. Two things in them are wrong for us:
- Shingles: datatrove shingles words from its word tokenizer; for Chinese that is jieba's words,
  which makes a 5-gram span a whole clause. `CjkMinhashSignature` shingles characters for CJK text
  (`cjk_shingle_size`, default 5) and whitespace words otherwise.
- Threshold: LSH with b bands of r rows only makes a pair *likely* to collide when the Jaccard
  similarity s is above ~(1/b)^(1/r); some pairs below it collide too. `VerifiedMinhashCluster` keeps a
  candidate pair only if the fraction of agreeing MinHash values over all b*r of them (an unbiased
  estimate of s; Broder 1997) is at least `threshold`. The full signatures it reads are written by
  `CjkMinhashSignature` beside datatrove's files, one fixed-size record per document: the low 16 bits of each
  MinHash value (b-bit minwise hashing; Li & König 2010), 240 B per document for 40 x 3 hashes instead of 960.
  Two different values then agree by chance with probability 2^-16 (a bias of the estimate below 1.6e-5); what it
  buys is a 4x smaller file. The cluster stage reads it in batches of candidate pairs, each batch's rows in file
  order (an input larger than RAM has signatures larger than the page cache: ascending reads, not random ones).
One document per cluster is kept (the union-find root: the earliest in (rank, index) order that
datatrove's union by size leaves as root).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.dedup.minhash import (SENTINEL, MinhashConfig, MinhashDedupCluster, MinhashDedupSignature)
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.typeshelper import StatHints

from lifecycle.data.curate.config import DedupConfig
from lifecycle.data.curate.langid import script_mix

SIGNATURE_DTYPE = np.dtype("<u2")  # the low 16 bits of each MinHash value (module docstring)
NO_SIGNATURE = np.uint16(2**16 - 1)  # every value of a document too short to shingle: agrees with nothing
# Candidate pairs verified per batch in the cluster stage: at most 2x that many signature rows in memory (~4 MB at
# 240 B per row, and the comparison as many booleans) while their reads go out in file order.
PAIRS_PER_BATCH = 8192


def normalized_text(doc: Document) -> str:
    """The text exact dedup hashes (module level and annotated: datatrove picks the hash by return type)."""
    return simplify_text(doc.text, TextNormConfig())


def minhash_config(config: DedupConfig) -> MinhashConfig:
    # 64-bit hashes: with 32-bit ones, random collisions at band level become likely past ~10^5 documents.
    return MinhashConfig(n_grams=config.shingle_size, num_buckets=config.bands, hashes_per_bucket=config.rows,
                         hash_config=HashConfig(precision=64))


def shingles(text: str, word_n: int, cjk_n: int) -> list[str]:
    """Character n-grams for mostly-CJK text, word n-grams otherwise, of the simplified text."""
    simple = simplify_text(text, TextNormConfig())
    cjk, other = script_mix(simple[:2000])
    if cjk > other:
        chars = simple.replace(" ", "")
        n = min(cjk_n, len(chars))
        return [chars[i:i + n] for i in range(len(chars) - n + 1)] if n else []
    words = simple.split()
    n = min(word_n, len(words))
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)] if n else []


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class CjkMinhashSignature(MinhashDedupSignature):
    """datatrove's stage 1 with CJK character shingles, also writing full signatures for verification."""

    name = "🎯 MinHash signatures (CJK characters / words)"

    def __init__(self, output_folder: str, config: DedupConfig) -> None:
        super().__init__(output_folder, minhash_config(config))
        self.dedup = config
        self._full = None

    # datatrove's run calls get_shingles once per document, then get_signature if there are shingles: the
    # full signature record of each document is written from those two hooks, in document order.
    def get_shingles(self, text: str) -> np.ndarray:
        grams = shingles(text, self.dedup.shingle_size, self.dedup.cjk_shingle_size)
        if not grams and self._full is not None:
            self._full.write(np.full(self.num_hashes, NO_SIGNATURE, dtype=SIGNATURE_DTYPE).tobytes())
        return np.fromiter((self._hash_func(g) for g in grams), dtype=np.uint64, count=len(grams)).reshape((-1, 1))

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        buckets = super().get_signature(shingles)
        if self._full is not None:
            # (bands, rows) -> num_hashes values, each cut to its low 16 bits (astype wraps modulo 2^16)
            self._full.write(np.asarray(buckets, dtype=np.uint64).astype(SIGNATURE_DTYPE).tobytes())
        return buckets

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> None:
        full_dir = Path(self.output_folder.path) / "full"
        full_dir.mkdir(parents=True, exist_ok=True)
        with open(full_dir / f"{rank:05d}.sig", "wb") as self._full:
            super().run(data, rank, world_size)
        self._full = None


def similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of row i of `a` and row i of `b` ((n, num_hashes) signatures): the share of
    agreeing values. 0 where either is the record of a document that had no shingles (every value 0xFFFF, which a
    real signature is with probability 2^-16^num_hashes). In expectation s + (1 - s) * 2^-16: a bias below 1.6e-5,
    against a sampling error of ~0.045 at 120 hashes; not corrected, so a pair agreeing on exactly `threshold` of
    its values still passes."""
    sim = (a == b).mean(axis=1)
    sim[(a == NO_SIGNATURE).all(axis=1) | (b == NO_SIGNATURE).all(axis=1)] = 0.0
    return sim


class SignatureRows:
    """Full MinHash signatures of one rank's documents, read with `os.pread` (`read_sorted`: many rows in file order).

    Not a memory map: pages of a mapped file count in the process's RSS (and in a Slurm cgroup's limit) as they are
    touched, so mapping 960 B per document grew the cluster stage's RSS with the corpus (docs/BENCHMARKS.md,
    curation memory). pread copies the one row asked for; the kernel's page cache still does the caching."""

    def __init__(self, path: Path, num_hashes: int) -> None:
        self.path, self.row_bytes = path, SIGNATURE_DTYPE.itemsize * num_hashes
        self.num_rows = path.stat().st_size // self.row_bytes
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read_sorted(np.array([i]))[0]

    def read_sorted(self, rows: np.ndarray, max_gap: int = 16) -> np.ndarray:
        """Rows `rows` (ascending, distinct) as a (len(rows), num_hashes) array, read in file order: rows less than
        `max_gap` apart share one pread of the span between them, so the disk sees ascending reads, not one random
        read per row (what matters once the signatures outgrow the page cache: an input larger than RAM)."""
        out = np.empty((len(rows), self.row_bytes // SIGNATURE_DTYPE.itemsize), dtype=SIGNATURE_DTYPE)
        if len(rows) and not (0 <= rows[0] and rows[-1] < self.num_rows):
            bad = rows[(rows < 0) | (rows >= self.num_rows)][0]
            raise IndexError(f"{self.path}: signature row {bad} of {self.num_rows}")
        start = 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and rows[end] - rows[end - 1] < max_gap:
                end += 1
            first, last = int(rows[start]), int(rows[end - 1])
            size = (last - first + 1) * self.row_bytes
            data = os.pread(self._fd, size, first * self.row_bytes)
            if len(data) != size:
                raise OSError(f"{self.path}: short read at row {first}")
            span = np.frombuffer(data, dtype=SIGNATURE_DTYPE).reshape(last - first + 1, -1)
            out[start:end] = span[rows[start:end] - first]
            start = end
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class VerifiedMinhashCluster(MinhashDedupCluster):
    """datatrove's stage 3, keeping only candidate pairs whose estimated Jaccard is >= threshold."""

    name = "🎯 MinHash clusters (verified)"

    def __init__(self, input_folder: str, output_folder: str, signature_folder: str, config: DedupConfig) -> None:
        super().__init__(input_folder, output_folder, minhash_config(config))
        self.signature_folder = signature_folder
        self.threshold = config.threshold
        self.num_hashes = config.bands * config.rows

    def _signatures(self) -> dict[int, SignatureRows]:
        out = {}
        for path in sorted((Path(self.signature_folder) / "full").glob("*.sig")):
            if path.stat().st_size:
                out[int(path.stem)] = SignatureRows(path, self.num_hashes)
        return out  # rank -> rows of (num_hashes,) SIGNATURE_DTYPE

    def run(self, data: DocumentsPipeline = None, _: int = 0, world_size: int = 1):
        sigs = self._signatures()
        parent_of: dict[tuple[int, int], tuple[int, int]] = {}
        size: dict[tuple[int, int], int] = {}

        # Memory: only documents in verified pairs enter the union-find (duplicates, which the .remove files
        # list anyway); candidate pairs stream past. A pair that collides in several bands is verified again
        # each time instead of being remembered: a set of the candidate pairs seen would grow with the corpus.
        def find(x):
            root = x
            while parent_of.get(root, root) != root:
                root = parent_of[root]
            while x != root:  # path compression
                parent_of[x], x = root, parent_of[x]
            return root

        def union(a, b):
            ra, rb = find(a), find(b)
            if ra == rb:
                return
            if ra > rb:  # keep the earliest document of a cluster as its representative
                ra, rb = rb, ra
            parent_of.setdefault(ra, ra)
            parent_of[rb] = ra
            size[ra] = size.get(ra, 1) + size.pop(rb, 1)

        def verify(batch: list[tuple[int, int, int, int]]) -> None:
            """One batch of candidate pairs (rank, doc, rank, doc): the signatures it names are read per rank in
            file order (SignatureRows.read_sorted) and compared all at once; then, in order, a pair at or above the
            threshold joins its two clusters unless they are one already (what verified_pairs counts), exactly
            as verifying one pair at a time."""
            if not batch:
                return
            pairs = np.array(batch, dtype=np.int64)
            keys = np.concatenate([pairs[:, 0] << 32 | pairs[:, 1], pairs[:, 2] << 32 | pairs[:, 3]])
            unique, where = np.unique(keys, return_inverse=True)  # sorted: rank, then document
            rows = np.empty((len(unique), self.num_hashes), dtype=SIGNATURE_DTYPE)
            for rank in np.unique(unique >> 32):
                mine = (unique >> 32) == rank
                rows[mine] = sigs[int(rank)].read_sorted(unique[mine] & 0xFFFFFFFF)
            sim = similarities(rows[where[:len(batch)]], rows[where[len(batch):]])
            self.stat_update("candidate_pairs", value=len(batch))
            for i in np.flatnonzero(sim >= self.threshold).tolist():
                f1, d1, f2, d2 = batch[i]
                a, b = (f1, d1), (f2, d2)
                if find(a) != find(b):  # not already in one cluster
                    self.stat_update("verified_pairs")
                    union(a, b)

        with self.track_time():
            for dup_file in self.input_folder.list_files(glob_pattern="*.dups"):
                batch: list[tuple[int, int, int, int]] = []
                with self.input_folder.open(dup_file, "rb") as fh:
                    for pair in read_tuples_from_file(fh, "4I", lines_to_buffer=self.lines_to_buffer):
                        if pair[0] == SENTINEL:
                            continue
                        batch.append(pair)
                        if len(batch) == PAIRS_PER_BATCH:
                            verify(batch)
                            batch = []
                verify(batch)
            removals: dict[int, list[int]] = {}
            for node in sorted(parent_of):
                if find(node) != node:
                    removals.setdefault(node[0], []).append(node[1])
                    self.stat_update(StatHints.dropped)
            # every rank gets a .remove file, empty when it keeps everything (datatrove's filter warns otherwise)
            for file_id in sigs:
                removals.setdefault(file_id, [])
            for file_id, docs in removals.items():
                with self.output_folder.open(f"{file_id:06d}.remove", "wb") as out:
                    out.write(b"".join(struct.pack("<I", d) for d in sorted(docs)))
        for rows in sigs.values():
            rows.close()
