"""How far a quantized model's next-token distribution moved from its fp32 parent's, on the same held-out tokens.

Perplexity alone cannot tell 4-bit methods apart on a model that is far from converged: every method moves it by
less than rounding noise does, and a quantized model can come out "better than fp32". llama.cpp's perplexity tool
reports, for this reason, the KL divergence of the quantized model's distribution from the parent's at every
position, and how often the two agree on the most likely token. This module is that measurement:

    KL(P || Q) at one position = Σ_v P(v) · (log P(v) − log Q(v)),   P = parent, Q = quantized

summarised per held-out set as the mean over positions, its 99th percentile (the rare positions where a method
breaks), and top-1 agreement (the share of positions where argmax P == argmax Q).

The parent's log-probabilities are computed once per block and kept in a float32 file (one row per position,
`vocab` wide) under a temporary directory, so memory stays at one block however many children are compared;
the file is deleted when the cache is closed. float32 because the KL of a good 4-bit model is ~1e-3 nats:
float16 log-probs would add errors of that size.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def token_kl(parent_logp: torch.Tensor, child_logp: torch.Tensor) -> torch.Tensor:
    """(T, V) log-probabilities (each row log-normalised) -> (T,) KL(parent || child) per position, in nats."""
    if parent_logp.shape != child_logp.shape:
        raise ValueError(f"log-prob shapes differ: {tuple(parent_logp.shape)} vs {tuple(child_logp.shape)}")
    p = parent_logp.double()
    q = child_logp.double()
    # 0 · log 0 = 0: a token the parent gives probability 0 contributes nothing, whatever the child says.
    terms = torch.where(p > -math.inf, p.exp() * (p - q), torch.zeros_like(p))
    return terms.sum(-1)


def top1_agreement(parent_logp: torch.Tensor, child_logp: torch.Tensor) -> torch.Tensor:
    """(T, V), (T, V) -> (T,) bool: the two distributions' most likely tokens are the same."""
    return parent_logp.argmax(-1) == child_logp.argmax(-1)


def summarize(kl: torch.Tensor | np.ndarray, agree: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Per-position KL values and top-1 matches of one eval set -> mean KL, its 99th percentile, agreement."""
    kl = np.asarray(kl, dtype=np.float64)
    agree = np.asarray(agree, dtype=bool)
    if kl.size == 0 or kl.shape != agree.shape:
        raise ValueError(f"summarize: need one KL value and one match per position (got {kl.shape}, {agree.shape})")
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "top1_agreement": float(agree.mean()), "positions": int(kl.size)}


class ParentLogProbs:
    """The parent's log-softmax for every (set, block, position), on disk, float32. Use as a context manager."""

    def __init__(self, eval_sets: dict[str, torch.Tensor], vocab: int, directory: str | Path | None = None):
        self._dir = Path(tempfile.mkdtemp(prefix=".parent-logprobs-", dir=directory))
        self._maps: dict[str, np.memmap] = {}
        for name, blocks in eval_sets.items():
            n, seq = blocks.shape
            self._maps[name] = np.memmap(self._dir / f"{name}.f32", dtype=np.float32, mode="w+",
                                         shape=(n, seq - 1, vocab))  # (block, position, vocab)
        self.nbytes = sum(m.nbytes for m in self._maps.values())

    def put(self, name: str, block: int, logp: torch.Tensor) -> None:
        self._maps[name][block] = logp.float().numpy()

    def get(self, name: str, block: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._maps[name][block]))  # a copy: (positions, vocab)

    def close(self) -> None:
        self._maps.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ParentLogProbs:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@torch.no_grad()
def evaluate_set(model, blocks: torch.Tensor, name: str, cache: ParentLogProbs | None, *, parent: bool,
                 desc: str = "eval", progress: bool = True) -> dict[str, float]:
    """One pass over (num_blocks, seq_len) held-out ids: perplexity of every token after the first of each block,
    and — for a child, given the parent's cache — KL from the parent and top-1 agreement at the same positions.
    `parent=True` fills the cache instead (the parent's own KL is 0 by definition and is not computed)."""
    from tqdm.auto import tqdm

    total_nll, count = 0.0, 0
    kls, agrees = [], []
    for i, row in enumerate(tqdm(blocks, desc=desc, unit="block", disable=not progress, leave=False)):
        logp = torch.log_softmax(model(row[None]).logits[0, :-1].float(), dim=-1)  # (seq - 1, vocab)
        total_nll -= float(logp.gather(1, row[1:, None]).sum())
        count += row.numel() - 1
        if cache is None:
            continue
        if parent:
            cache.put(name, i, logp)
        else:
            ref = cache.get(name, i)
            kls.append(token_kl(ref, logp))
            agrees.append(top1_agreement(ref, logp))
        del logp
    out = {"perplexity": math.exp(total_nll / count)}
    if kls:
        out.update(summarize(torch.cat(kls), torch.cat(agrees)))
    return out


def main(argv: list[str] | None = None) -> int:
    """KL(REFERENCE || OTHER) between any two checkpoints of one parent (e.g. two solvers' GPTQ children), on the
    held-out sets `lmforge quantize` uses; the parent only supplies the architecture and the held-out text."""
    import argparse
    import json

    from quant.cli import _eval_sets, default_wikitext
    from quant.quantize import open_source
    from quant.report import load_dequantized

    ap = argparse.ArgumentParser(prog="python -m quant.divergence", description=main.__doc__)
    ap.add_argument("parent", help="the unquantized parent checkpoint")
    ap.add_argument("reference", help="checkpoint whose distribution is P (the parent itself, or a quantized child)")
    ap.add_argument("other", help="checkpoint whose distribution is Q")
    ap.add_argument("--eval-blocks", type=int, default=40)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--wikitext", default=str(default_wikitext()))
    args = ap.parse_args(argv)
    src = open_source(args.parent)
    sets = _eval_sets(src, args)

    def load(path: str):
        return src.load_model(dtype=torch.float32).eval() if Path(path).resolve() == src.path.resolve() \
            else load_dequantized(src.path, Path(path))

    result = {}
    with ParentLogProbs(sets, int(src.config["vocab_size"])) as cache:
        ref = load(args.reference)
        ppl_ref = {n: evaluate_set(ref, b, n, cache, parent=True, desc=f"{n} (reference)")["perplexity"]
                   for n, b in sets.items()}
        del ref
        other = load(args.other)
        for n, b in sets.items():
            ev = evaluate_set(other, b, n, cache, parent=False, desc=f"{n} (other)")
            result[n] = {"perplexity_reference": ppl_ref[n], "perplexity_other": ev.pop("perplexity"), **ev}
    print(json.dumps({"reference": args.reference, "other": args.other, "sets": result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
