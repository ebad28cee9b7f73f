"""Byte-level BPE tokenizer: train, save, load, and measure compression.

The saved directory is a plain `PreTrainedTokenizerFast` (tokenizer.json, tokenizer_config.json,
special_tokens_map.json): `AutoTokenizer.from_pretrained(dir)` and vLLM load it without
`trust_remote_code`. The chat template is ChatML with `{% generation %}` markers, so TRL's
`assistant_only_loss` and `apply_chat_template(..., return_assistant_tokens_mask=True)` work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lifecycle.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"
IM_START, IM_END, PAD_TOKEN = "<|im_start|>", "<|im_end|>", "<|pad|>"
# Ids 0..3 in this order. <|endoftext|> is bos and eos (GPT-2/Qwen style) and the default pad.
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END, PAD_TOKEN)
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_MIN_FREQUENCY = 2
MODEL_MAX_LENGTH = 2048
NUM_BYTES = 256  # the ByteLevel alphabet: every byte has its own token, so nothing is ever unknown

# Qwen2/Llama-3's split regex (contractions, letter runs with one leading non-letter, digits in
# groups of 3, punctuation runs, newlines, whitespace) with one change for Chinese: Han runs are
# their own branch, capped at 4 characters. Without the cap an unspaced Chinese sentence is a
# single "word", so the BPE trainer keeps one rarely repeated entry per sentence (slow, memory
# heavy) and spends merges on sentence fragments; most Chinese words are 1-4 characters. Measured
# at 8k vocab on 2.3 MB of wiki + chinese-poetry + news: held-out Chinese chars/token within 2% of
# uncapped runs (cap 1: 0.962, 2: 0.970, 4: 0.975, uncapped: 0.988), English unchanged. The letter
# branch excludes Han so "abc中文" splits into "abc" | "中文".
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|\p{Han}{1,4}"
    r"|[^\r\n\p{L}\p{N}]?(?:(?!\p{Han})\p{L})+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# ChatML. `{% generation %}` wraps what the assistant says *and* its <|im_end|>, so assistant-only
# loss teaches the model to stop; the role header and the newline after <|im_end|> come from the
# template and are not trained on (same convention as TRL's training templates).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TOKENIZER_FILE = "tokenizer.json"
REPORT_FILE = "tokenizer_report.json"
# A held-out set larger than this is not needed to measure chars/token to 3 digits; the rest of
# the held-out documents are still kept out of training, just not evaluated (bounded memory).
MAX_HELDOUT_CHARS = 4_000_000


def _byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())  # no unk_token: the byte alphabet covers every input
    # NFC so that composed and decomposed accents (é vs e + U+0301) train and encode alike.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # trim_offsets=False keeps each token's character span exact, which
    # return_assistant_tokens_mask relies on (it maps template character spans to tokens).
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_training_args(vocab_size: int, min_frequency: int) -> None:
    min_vocab_size = NUM_BYTES + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab_size:
        raise ConfigError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least "
                          f"{min_vocab_size} (256 bytes + {len(SPECIAL_TOKENS)} special tokens); try 8192")
    if min_frequency < 1:
        raise ConfigError(f"--min-frequency must be at least 1, got {min_frequency}")


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    min_frequency: int = DEFAULT_MIN_FREQUENCY, show_progress: bool = True,
                    pad_token: str = EOS_TOKEN) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts` (streamed once) and wrap it for transformers.

    `pad_token` defaults to <|endoftext|> (Qwen style); pass "<|pad|>" when a collator masks pad
    ids out of the labels, or eos would never be learned.
    """
    _check_training_args(vocab_size, min_frequency)
    if pad_token not in SPECIAL_TOKENS:
        raise ConfigError(f"pad_token {pad_token!r} is not one of the special tokens {SPECIAL_TOKENS}")
    tok = _byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # Without the full alphabet, bytes absent from the corpus (rare scripts, emoji) would have
        # no token and be silently dropped at encode time.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=pad_token,
        extra_special_tokens=[IM_START, IM_END, PAD_TOKEN],
        model_max_length=MODEL_MAX_LENGTH,
        # transformers' clean-up turns " ." into "." and would break decode(encode(x)) == x.
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def _write_tokenizer_files(tok: PreTrainedTokenizerFast, directory: Path) -> None:
    # The template goes into tokenizer_config.json (not chat_template.jinja): every transformers
    # version and every tool that reads chat templates looks there.
    tok.save_pretrained(directory, save_jinja_files=False)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # Written for transformers 4 as well as 5 (older vLLM pins 4): v5's class name
    # "TokenizersBackend" and its list-valued "extra_special_tokens" (v4 expects a dict) break v4;
    # "PreTrainedTokenizerFast" and "additional_special_tokens" load in both.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)  # v5-only, and its default
    config["additional_special_tokens"] = config.pop("extra_special_tokens", [IM_START, IM_END, PAD_TOKEN])
    config.update(add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
                  model_max_length=tok.model_max_length)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                           encoding="utf-8")
    # transformers 5 no longer writes this file; older loaders and tools still read it.
    special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
               "additional_special_tokens": [IM_START, IM_END, PAD_TOKEN]}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def save_tokenizer(tok: PreTrainedTokenizerFast, out_dir: str | os.PathLike[str]) -> None:
    """Write `tok` to `out_dir` so that a crash never leaves a half-written tokenizer behind.

    The files are built in a temp dir beside `out_dir`. A new `out_dir` is one rename. An existing
    one may hold other things (a checkpoint's weights), so there each file is replaced on its own.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; give -o a directory to write the tokenizer into")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_tokenizer_files(tok, tmp)
        if not out.exists():
            tmp.chmod(0o755)  # mkdtemp makes it 0700: a server running as another user could not read it
            os.replace(tmp, out)
            return
        # A chat_template.jinja left by an earlier save would take priority over our template.
        (out / "chat_template.jinja").unlink(missing_ok=True)
        for path in tmp.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory written by `save_tokenizer` (or any fast HF tokenizer dir)."""
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(f"tokenizer directory {directory} does not exist; "
                        f"train one with `lmforge tokenizer train CORPUS -o {directory}`")
    if not (directory / TOKENIZER_FILE).is_file():
        raise DataError(f"{directory} has no {TOKENIZER_FILE}, so it is not a tokenizer directory; "
                        f"train one with `lmforge tokenizer train CORPUS -o {directory}`")
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise DataError(f"could not load the tokenizer in {directory} ({err}); re-train or re-copy it") from err
    if not tok.is_fast:
        raise DataError(f"{directory} loaded as a slow tokenizer; lmforge needs a {TOKENIZER_FILE} (fast) tokenizer")
    return tok


def tokenizer_hash(tok_dir: str | os.PathLike[str]) -> str:
    """sha256 of tokenizer.json: names the exact vocabulary a tokenized dataset was built with."""
    path = Path(tok_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"{path} not found; is {tok_dir} a tokenizer directory?")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def chars_per_token(tok: PreTrainedTokenizerFast, texts: Iterable[str]) -> float:
    """Characters (code points) per token over all `texts`, without special tokens."""
    num_chars = num_tokens = 0
    for batch in _batches(texts):
        # The backend directly: same ids as tok.encode, batched, and without transformers'
        # "longer than model_max_length" warning for long documents.
        num_chars += sum(map(len, batch))
        num_tokens += sum(len(e.ids) for e in tok.backend_tokenizer.encode_batch(batch, add_special_tokens=False))
    if num_tokens == 0:
        raise DataError("chars_per_token needs at least one non-empty text")
    return num_chars / num_tokens


def byte_baseline_chars_per_token(texts: Iterable[str]) -> float:
    """Chars/token of a byte-level tokenizer (one token per UTF-8 byte): ~1.0 English, ~0.33 Chinese."""
    num_chars = num_bytes = 0
    for text in texts:
        num_chars += len(text)
        num_bytes += len(text.encode("utf-8"))
    if num_bytes == 0:
        raise DataError("byte_baseline_chars_per_token needs at least one non-empty text")
    return num_chars / num_bytes


def _is_cjk_ideograph(ch: str) -> bool:
    # CJK Unified Ideographs, Extension A, Compatibility Ideographs, Extensions B..F (SIP).
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0xF900 <= cp <= 0xFAFF
            or 0x20000 <= cp <= 0x2FA1F)


def is_cjk_text(text: str, threshold: float = 0.3) -> bool:
    """True when at least `threshold` of the non-space characters are CJK ideographs."""
    chars = [ch for ch in text if not ch.isspace()]
    if not chars:
        return False
    return sum(map(_is_cjk_ideograph, chars)) / len(chars) >= threshold


def compression_report(tok: PreTrainedTokenizerFast, texts: Iterable[str]) -> dict[str, dict[str, Any] | None]:
    """Chars/token vs. the byte baseline, per language. A language with no documents is None
    (absent), never 0, so a report cannot read as "compresses nothing"."""
    by_language: dict[str, list[str]] = {"english": [], "chinese": []}
    for text in texts:
        if text:
            by_language["chinese" if is_cjk_text(text) else "english"].append(text)
    report: dict[str, dict[str, Any] | None] = {}
    for language, docs in by_language.items():
        if not docs:
            report[language] = None
            continue
        cpt, baseline = chars_per_token(tok, docs), byte_baseline_chars_per_token(docs)
        report[language] = {"chars_per_token": round(cpt, 4), "baseline_chars_per_token": round(baseline, 4),
                            "ratio": round(cpt / baseline, 3), "num_docs": len(docs)}
    return report


def is_heldout(text: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic split by a hash of the text: same corpus, same split, on any machine and
    process (Python's `hash` is salted per process). Duplicates land on the same side, so a
    repeated document cannot leak from training into evaluation."""
    digest = hashlib.sha256(f"{seed}\0{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def add_command(sub: argparse._SubParsersAction) -> None:
    from lifecycle.cli import add_subcommand  # the CLI module imports every command module

    group = add_subcommand(sub, "tokenizer", help="train and inspect byte-level BPE tokenizers",
                           example="lmforge tokenizer train corpus.jsonl -o tok/")
    group_sub = group.add_subparsers(title="tokenizer commands", metavar="COMMAND", dest="tokenizer_command")
    train = add_subcommand(
        group_sub, "train", help="train a byte-level BPE tokenizer (ChatML template) and report its compression",
        example="lmforge tokenizer train wiki.txt news_zh.jsonl -o tok/ --vocab-size 8192",
        description="Train byte-level BPE on INPUT files (.txt/.jsonl/...), hold out a fraction of the documents, "
                    f"save a transformers tokenizer to OUT_DIR and write OUT_DIR/{REPORT_FILE} with chars/token "
                    "on held-out English and Chinese next to a one-token-per-byte baseline.")
    train.add_argument("inputs", nargs="*", metavar="INPUT", help="corpus files (text or JSON lines)")
    train.add_argument("-o", "--output-dir", required=True, metavar="OUT_DIR", help="directory to write")
    train.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="default: %(default)s")
    train.add_argument("--min-frequency", type=int, default=DEFAULT_MIN_FREQUENCY,
                       help="least count of a pair to merge (default: %(default)s)")
    train.add_argument("--text-field", default="text", help="JSON field holding the text (default: %(default)s)")
    train.add_argument("--txt-mode", choices=("paragraph", "line", "file"), default="paragraph",
                       help="what one document is in a .txt file (default: %(default)s)")
    train.add_argument("--heldout-fraction", type=float, default=0.02,
                       help="share of documents kept out of training for the report (default: %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="salt of the held-out hash (default: %(default)s)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the tokenizer in an OUT_DIR that already holds one (never a checkpoint's)")
    train.set_defaults(func=run_train)


def check_tokenizer_output(out: Path, overwrite: bool) -> None:
    """Where `tokenizer train` may write: a new or tokenizer-only directory. In a checkpoint the new tokenizer
    would replace the one its weights were trained with (and break its manifest's hashes)."""
    from lifecycle.checkpoint import check_output_dir

    check_output_dir(out, None, "-o")  # not a file
    marker = next((n for n in ("manifest.json", "config.json", "model.safetensors") if (out / n).exists()), None)
    if marker is not None:
        raise ConfigError(f"-o {out}: holds a checkpoint ({marker}); a new tokenizer there would replace the one its "
                          "weights were trained with: write it to a new directory")
    if (out / "tokenizer.json").exists() and not overwrite:
        raise ConfigError(f"-o {out}: already holds a tokenizer; pass --overwrite to replace it")


def run_train(args: argparse.Namespace) -> int:
    from lifecycle.data.readers import ReadStats, expand_inputs, iter_documents

    if not args.inputs:
        raise ConfigError("lmforge tokenizer train needs at least one INPUT corpus file, "
                          "e.g. `lmforge tokenizer train corpus.jsonl -o tok/`")
    if not 0.0 <= args.heldout_fraction < 1.0:
        raise ConfigError(f"--heldout-fraction must be in [0, 1), got {args.heldout_fraction}")
    # Fail on a bad flag or a missing file now, not after minutes of reading the corpus.
    _check_training_args(args.vocab_size, args.min_frequency)
    check_tokenizer_output(Path(args.output_dir), args.overwrite)
    expand_inputs(args.inputs)
    stats = ReadStats()
    heldout: list[str] = []
    counts = {"train": 0, "heldout": 0, "heldout_chars": 0}

    def training_texts() -> Iterator[str]:
        for doc in iter_documents(args.inputs, text_field=args.text_field, txt_mode=args.txt_mode, stats=stats):
            if not is_heldout(doc.text, args.heldout_fraction, args.seed):
                counts["train"] += 1
                yield doc.text
                continue
            counts["heldout"] += 1
            if counts["heldout_chars"] < MAX_HELDOUT_CHARS:
                heldout.append(doc.text)
                counts["heldout_chars"] += len(doc.text)

    tok = train_tokenizer(training_texts(), vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    if counts["train"] == 0:
        raise DataError(f"no training documents in {', '.join(map(str, args.inputs))}: {stats.summary()}; "
                        f"{counts['heldout']} held out. Give more text or a smaller --heldout-fraction")
    out = Path(args.output_dir)
    save_tokenizer(tok, out)
    report = {
        "vocab_size": len(tok), "num_train_docs": counts["train"], "num_heldout_docs": counts["heldout"],
        "num_skipped_records": stats.num_skipped, "heldout_fraction": args.heldout_fraction, "seed": args.seed,
        "tokenizer_sha256": tokenizer_hash(out), "heldout": compression_report(tok, heldout),
    }
    tmp = out / f".{REPORT_FILE}.tmp"
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / REPORT_FILE)
    print(f"tokenizer: {len(tok)} tokens, trained on {counts['train']} documents -> {out}")
    for language, row in report["heldout"].items():
        if row is None:
            print(f"  {language:8s} no held-out documents")
        else:
            print(f"  {language:8s} {row['chars_per_token']:.3f} chars/token vs {row['baseline_chars_per_token']:.3f} "
                  f"for bytes ({row['ratio']:.2f}x) on {row['num_docs']} held-out documents")
    print(f"  report: {out / REPORT_FILE}")
    return 0
