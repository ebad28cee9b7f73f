"""Tests of lifecycle/tokenizer.py: byte-level BPE training, chat template, save/load, compression."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lifecycle.cli import main
from lifecycle.errors import ConfigError, DataError
from lifecycle.tokenizer import (
    CHAT_TEMPLATE,
    IM_END,
    SPECIAL_TOKENS,
    byte_baseline_chars_per_token,
    chars_per_token,
    compression_report,
    is_cjk_text,
    is_heldout,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

SUBJECTS = ["The model", "A tokenizer", "Our team", "The old library", "Every student", "This function"]
VERBS = ["reads", "compresses", "writes", "learns from", "splits", "measures"]
OBJECTS = ["the long document", "Chinese and English text", "three thousand files", "its own output",
           "a corpus of 1,234,567 words", "the evaluation set"]
ENDINGS = [".", "!", "?", ", and then it stops.", " quickly.", " (again)."]
CHINESE = ["今天天气很好，我们去公园散步吧。", "机器学习模型需要大量的数据进行训练。",
           "中文分词是自然语言处理的基础任务之一。", "北京是中华人民共和国的首都，也是政治和文化中心。",
           "他说：“我明天再来看你。”", "这个分词器把每个字节都当作一个基本单位。"]


def _english_corpus(num_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    def sentence() -> str:
        return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"

    return [" ".join(sentence() for _ in range(rng.randint(2, 6))) for _ in range(num_docs)]


def _chinese_corpus(num_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.sample(CHINESE, 3)) for _ in range(num_docs)]


@pytest.fixture(scope="module")
def tok():
    # ~150 KB: enough for merges across both scripts, trains in well under a second.
    return train_tokenizer(_english_corpus(1500) + _chinese_corpus(400), vocab_size=1000, show_progress=False)


ROUND_TRIP_TEXTS = [
    "Hello, world! It's 2024 and we've got 1234567 tokens.\n\n  Indented\tline with trailing space ",
    "中文测试：今天天气很好，我们去公园散步吧。混合 English 和中文123。",
    "Emoji 😀👍🏽 and flags 🇨🇳, math ∑∫√, Cyrillic Привет, Korean 안녕하세요, Thai สวัสดี",
    "",
    " ",
    "\n",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_is_identity(tok, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_round_trip_random_bytes_as_latin1(tok) -> None:
    # Every code point 0..255, control characters included: all must survive (no unknown token).
    rng = random.Random(1)
    for _ in range(50):
        text = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))).decode("latin-1")
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_every_byte_has_a_token(tok) -> None:
    # 256 byte tokens + 4 specials are in any vocabulary, whatever the corpus held.
    assert len(tok) >= 256 + len(SPECIAL_TOKENS)
    assert tok.unk_token is None


def test_special_tokens_are_single_ids(tok) -> None:
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    for token in SPECIAL_TOKENS:
        assert tok.encode(f"x{token}y", add_special_tokens=False)[1] == tok.convert_tokens_to_ids(token)
    assert tok.bos_token == tok.eos_token == tok.pad_token == "<|endoftext|>"
    # GPT-2/Qwen style: plain encode adds nothing.
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False)
    assert tok.decode(tok.encode(f"a{IM_END}b"), skip_special_tokens=True) == "ab"


def test_han_runs_are_split_from_latin_letters(tok) -> None:
    # The pre-tokenizer keeps "abc" and "中文" apart, so no token spans both scripts.
    pieces = [tok.convert_tokens_to_string([t]) for t in tok.tokenize("abc中文")]
    assert not any(any(c.isascii() for c in p) and any(is_cjk_text(c) for c in p) for p in pieces)


def test_pad_token_can_be_the_dedicated_pad() -> None:
    tok = train_tokenizer(_english_corpus(50), vocab_size=300, pad_token="<|pad|>", show_progress=False)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 3


def test_chat_template_renders_chatml(tok) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert not tok.apply_chat_template(messages, tokenize=False).endswith("<|im_start|>assistant\n")


CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}],
    "with_system": [{"role": "system", "content": "You answer in Chinese."},
                    {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "你好！很高兴见到你。"}],
    "multi_turn": [{"role": "system", "content": "Be kind."},
                   {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"},
                   {"role": "user", "content": "中文呢？"}, {"role": "assistant", "content": "当然可以，我们说中文。"},
                   {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome 😀"}],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_assistant_mask_marks_exactly_the_assistant_tokens(tok, name: str) -> None:
    messages = CONVERSATIONS[name]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    input_ids, mask = out["input_ids"], out["assistant_masks"]
    # Expected: rebuild the same ids turn by turn and mark each assistant reply plus its <|im_end|>
    # (so the model learns to stop); headers, other roles and the newline after <|im_end|> are 0.
    expected_ids: list[int] = []
    expected_mask: list[int] = []
    for message in messages:
        header = tok.encode(f"<|im_start|>{message['role']}\n", add_special_tokens=False)
        body = tok.encode(message["content"] + IM_END, add_special_tokens=False)
        newline = tok.encode("\n", add_special_tokens=False)
        is_assistant = int(message["role"] == "assistant")
        expected_ids += header + body + newline
        expected_mask += [0] * len(header) + [is_assistant] * len(body) + [0] * len(newline)
    assert input_ids == expected_ids
    assert mask == expected_mask
    assert tok.decode([i for i, m in zip(input_ids, mask) if m]) == "".join(
        m["content"] + IM_END for m in messages if m["role"] == "assistant")


def test_save_load_with_auto_tokenizer(tok, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    save_tokenizer(tok, out)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir cleaned up
    assert out.stat().st_mode & 0o055 == 0o055  # readable by others, unlike mkdtemp's 0700
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["add_bos_token"] is False and config["model_max_length"] == 2048
    assert config["chat_template"] == CHAT_TEMPLATE
    loaded = AutoTokenizer.from_pretrained(str(out))  # no trust_remote_code
    assert loaded.is_fast and loaded.model_max_length == 2048
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|endoftext|>",) * 3
    for text in ROUND_TRIP_TEXTS:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    messages = CONVERSATIONS["multi_turn"]
    assert loaded.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True) == \
        tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assert load_tokenizer(out).encode("中文") == tok.encode("中文")


def test_save_into_existing_dir_keeps_other_files(tok, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "chat_template.jinja").write_text("stale")  # would shadow the config's template
    save_tokenizer(tok, out)
    save_tokenizer(tok, out)
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert not (out / "chat_template.jinja").exists()
    assert load_tokenizer(out).chat_template == CHAT_TEMPLATE


def test_tokenizer_hash_follows_tokenizer_json(tok, tmp_path: Path) -> None:
    save_tokenizer(tok, tmp_path / "a")
    save_tokenizer(tok, tmp_path / "b")
    assert tokenizer_hash(tmp_path / "a") == tokenizer_hash(tmp_path / "b")
    assert len(tokenizer_hash(tmp_path / "a")) == 64
    other = train_tokenizer(_english_corpus(50), vocab_size=300, show_progress=False)
    save_tokenizer(other, tmp_path / "c")
    assert tokenizer_hash(tmp_path / "c") != tokenizer_hash(tmp_path / "a")
    with pytest.raises(DataError, match="tokenizer.json"):
        tokenizer_hash(tmp_path)


def test_load_tokenizer_errors_name_the_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_vocab_size_too_small_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--vocab-size 100 .* at least 260"):
        train_tokenizer(["hello"], vocab_size=100)


def test_byte_baseline_and_cjk_detection() -> None:
    assert byte_baseline_chars_per_token(["hello"]) == 1.0
    assert byte_baseline_chars_per_token(["中文"]) == pytest.approx(1 / 3)
    assert is_cjk_text("今天天气很好，我们去公园散步吧。")
    assert is_cjk_text("GPU 训练需要很多显存")  # 3 of 11 non-space characters are Latin
    assert not is_cjk_text("An English sentence with one 字.")
    assert not is_cjk_text("   ")


def test_compression_report_splits_languages_and_reports_absent_as_none(tok) -> None:
    english, chinese = _english_corpus(20, seed=7), _chinese_corpus(10, seed=7)
    report = compression_report(tok, english + chinese)
    assert report["english"]["num_docs"] == 20 and report["chinese"]["num_docs"] == 10
    assert report["english"]["chars_per_token"] == pytest.approx(chars_per_token(tok, english), abs=1e-4)
    assert report["chinese"]["ratio"] > 1.5  # trained on these sentences: Han characters merged
    assert compression_report(tok, english)["chinese"] is None


def test_heldout_split_is_deterministic() -> None:
    texts = _english_corpus(2000)
    split = [is_heldout(t, 0.1) for t in texts]
    assert split == [is_heldout(t, 0.1) for t in texts]
    assert 0.05 < sum(split) / len(split) < 0.15
    assert split != [is_heldout(t, 0.1, seed=1) for t in texts]
    assert not any(is_heldout(t, 0.0) for t in texts)


def test_cli_train_writes_tokenizer_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.jsonl"
    docs = _english_corpus(600) + _chinese_corpus(300)
    corpus.write_text("".join(json.dumps({"body": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    out = tmp_path / "tok"
    code = main(["tokenizer", "train", str(corpus), "-o", str(out), "--vocab-size", "600",
                 "--text-field", "body", "--heldout-fraction", "0.1"])
    assert code == 0
    report = json.loads((out / "tokenizer_report.json").read_text())
    assert report["num_train_docs"] + report["num_heldout_docs"] == len(docs)
    assert report["tokenizer_sha256"] == tokenizer_hash(out)
    assert report["heldout"]["english"]["ratio"] > 1 and report["heldout"]["chinese"]["ratio"] > 1
    assert "chars/token" in capsys.readouterr().out
    assert load_tokenizer(out).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.parametrize("argv, message", [
    (["tokenizer", "train", "-o", "OUT"], "at least one INPUT"),
    (["tokenizer", "train", "CORPUS", "-o", "OUT", "--vocab-size", "200"], "--vocab-size 200"),
    (["tokenizer", "train", "CORPUS", "-o", "OUT", "--heldout-fraction", "1.5"], "--heldout-fraction"),
    (["tokenizer", "train", "MISSING", "-o", "OUT"], "no such file"),
    (["tokenizer", "train", "EMPTY", "-o", "OUT"], "no training documents"),
])
def test_cli_bad_input_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         argv: list[str], message: str) -> None:
    (tmp_path / "corpus.txt").write_text("some text\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    names = {"OUT": tmp_path / "out", "CORPUS": tmp_path / "corpus.txt", "MISSING": tmp_path / "nope.txt",
             "EMPTY": tmp_path / "empty.txt"}
    assert main([str(names.get(a, a)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_cli_train_never_replaces_a_checkpoints_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          tiny_tokenizer_dir: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in _english_corpus(300)), encoding="utf-8")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_tokenizer_dir, ckpt)
    (ckpt / "config.json").write_text("{}")  # a checkpoint's marker beside its tokenizer
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert main(["tokenizer", "train", str(corpus), "-o", str(ckpt), "--vocab-size", "600", "--overwrite"]) == 2
    assert "holds a checkpoint (config.json)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    # A tokenizer directory is replaced only when asked.
    tok = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, tok)
    assert main(["tokenizer", "train", str(corpus), "-o", str(tok), "--vocab-size", "600"]) == 2
    assert "already holds a tokenizer; pass --overwrite" in capsys.readouterr().err
    assert main(["tokenizer", "train", str(corpus), "-o", str(tok), "--vocab-size", "600", "--overwrite"]) == 0
    report = json.loads((tok / "tokenizer_report.json").read_text())
    assert report["tokenizer_sha256"] == tokenizer_hash(tok) != tokenizer_hash(tiny_tokenizer_dir)


def _poetry_documents(path: Path) -> list[str]:
    """chinese-poetry json: lists of poems/chapters whose lines sit under "paragraphs" or "content"
    (possibly nested in collections, as in 唐詩三百首); one document per poem/chapter."""
    docs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("paragraphs", "content", "abstract") and isinstance(value, list) \
                        and value and all(isinstance(v, str) for v in value):
                    docs.append("\n".join(value))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(path.read_text(encoding="utf-8")))
    return docs


@pytest.mark.shared_data
def test_compression_on_real_english_and_chinese(shared_data: Path) -> None:
    wiki = (shared_data / "pretrain/llamafactory/wiki_demo.txt").read_text(encoding="utf-8").splitlines()
    news = (shared_data / "misc/langid/lingua-sentences/zh.txt").read_text(encoding="utf-8").splitlines()
    poetry_files = sorted((shared_data / "pretrain/chinese-poetry").rglob("*.json"))
    poetry = [d for path in poetry_files for d in _poetry_documents(path)]
    docs = [d for d in wiki + news + poetry if d]
    # Wikipedia has only 30 articles (one per line), so hold out more of it than of the rest.
    heldout_english = [d for d in wiki if d and is_heldout(d, 0.15)]
    heldout = set(heldout_english) | {d for d in news + poetry if d and is_heldout(d, 0.1)}
    train = [d for d in docs if d not in heldout]
    assert sum(len(d.encode()) for d in train) < 3_000_000  # keeps this test to seconds
    tok = train_tokenizer(train, vocab_size=8192, show_progress=False)
    report = compression_report(tok, sorted(heldout))
    news_report = compression_report(tok, [d for d in news if d in heldout])
    print(f"\nheld-out english: {report['english']}\nheld-out chinese: {report['chinese']}"
          f"\nheld-out chinese news only: {news_report['chinese']}")
    assert report["english"]["num_docs"] >= 2 and report["chinese"]["num_docs"] >= 50
    assert report["english"]["chars_per_token"] >= 2.5 * report["english"]["baseline_chars_per_token"]
    assert report["chinese"]["chars_per_token"] >= 2.0 * report["chinese"]["baseline_chars_per_token"]
    assert news_report["chinese"]["chars_per_token"] >= 2.0 * news_report["chinese"]["baseline_chars_per_token"]
