"""IncrementalDetokenizer against `tokenizer.decode` on a real byte-level BPE (English, Chinese, emoji)."""

from __future__ import annotations

import random

import pytest

from serve.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

EN_WORDS = ("the model reads text and learns to predict the next token from the ones before it while "
            "optimizer follows gradient of loss over many steps training on packed sequences").split()
ZH_CHARS = "我们今天学习语言模型预测下一个词的方法中文文本训练数据很多大家都喜欢读书写字"
EMOJI = "😀🎉👍🚀"
SAMPLES = [
    "The model reads text and learns to predict the next token.",
    "我们今天学习语言模型，预测下一个词。",
    "Emoji 😀🎉 and 中文 mixed: 你好, world! 👩‍👩‍👧 done",
    "  leading spaces\n\nnew lines\ttabs, accents é and 数字 12345.",
    "🚀🚀🚀 rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and ✓ check",
]


@pytest.fixture(scope="module")
def tok():
    from lifecycle.tokenizer import train_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "."
             for _ in range(200)]
    texts += ["".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(5, 20))) + "。" for _ in range(200)]
    texts += [f"{rng.choice(EN_WORDS)} {rng.choice(EMOJI)} {rng.choice(ZH_CHARS)}" for _ in range(50)]
    return train_tokenizer(texts, vocab_size=600, show_progress=False)


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def chunked(ids: list[int], rng: random.Random | None, max_chunk: int = 6) -> list[list[int]]:
    """One id per chunk when rng is None, else random chunk sizes 1..max_chunk."""
    chunks, i = [], 0
    while i < len(ids):
        n = 1 if rng is None else rng.randint(1, max_chunk)
        chunks.append(ids[i:i + n])
        i += n
    return chunks


def stream(tok, ids, *, prompt=(), rng=None, **kwargs) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tok, list(prompt), **kwargs)
    deltas = [detok.update(chunk) for chunk in chunked(ids, rng)]
    deltas.append(detok.finish())
    return detok, deltas


def reference_stop(text: str, stop: list[str], include: bool, num_exempt_chars: int = 0) -> tuple[str, str | None]:
    """Brute force: the stop string whose first occurrence ending past `num_exempt_chars` (the text of the
    first min_tokens ids) ends first (ties: the longer one)."""
    starts = [(text.find(s, max(0, num_exempt_chars - len(s) + 1)), s) for s in stop]
    hits = [(start + len(s), start, s) for start, s in starts if start >= 0]
    if not hits:
        return text, None
    end, start, s = min(hits)
    return text[:end if include else start], s


# --- decoding matches tokenizer.decode ----------------------------------------------------------

@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("sample", SAMPLES)
def test_deltas_concatenate_to_decode(tok, sample, skip_special_tokens):
    rng = random.Random(sample)
    ids = encode(tok, sample)
    for _ in range(3):  # sprinkle special tokens (between characters): skipped or kept as text
        boundaries = [p for p in range(len(ids) + 1) if not tok.decode(ids[:p]).endswith(REPLACEMENT_CHAR)]
        ids.insert(rng.choice(boundaries), rng.choice(tok.all_special_ids))
    expected = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert REPLACEMENT_CHAR not in expected
    for chunk_rng in [None, random.Random(1), random.Random(2), random.Random(3)]:
        detok, deltas = stream(tok, ids, prompt=encode(tok, "Prompt: 中文😀"), rng=chunk_rng,
                               skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == detok.output_text == expected
        assert not any(REPLACEMENT_CHAR in d for d in deltas), deltas  # partial characters held back


def test_multi_token_characters_are_held_until_complete(tok):
    ids = encode(tok, "😀")
    assert len(ids) > 1  # 4 UTF-8 bytes, rare in the corpus: several byte tokens
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.update([i]) for i in ids] == [""] * (len(ids) - 1) + ["😀"]


def test_chunk_ending_in_a_partial_character_streams_its_whole_characters(tok):
    ids = encode(tok, "Hi there 😀")
    detok = IncrementalDetokenizer(tok, [], stop=["there"])
    assert detok.update(ids[:-1]) == "Hi " and detok.stopped  # not held until the emoji completes


def test_prompt_ending_inside_a_character_is_not_glued_to_the_output(tok):
    prompt, gen = encode(tok, "中文😀")[:-1], encode(tok, "😀")[-1:] + encode(tok, " ok")
    _, deltas = stream(tok, gen, prompt=prompt)
    assert "".join(deltas) == tok.decode(gen) and tok.decode(gen).startswith(REPLACEMENT_CHAR)


@pytest.mark.parametrize("seed", range(8))
def test_random_ids_match_decode(tok, seed):
    # Random ids make invalid and truncated UTF-8, special tokens anywhere, prompts ending mid-character.
    rng = random.Random(seed)
    ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 200))]
    prompt = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 8))]
    for skip in (True, False):
        expected = tok.decode(ids, skip_special_tokens=skip)
        for chunk_rng in [None, random.Random(seed)]:
            detok, deltas = stream(tok, ids, prompt=prompt, rng=chunk_rng, skip_special_tokens=skip)
            assert "".join(deltas) == expected


def test_prompt_seeds_leading_space_for_sentencepiece_style_decoder():
    """Llama-style decoders drop the leading space of a decode's first token: context fixes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    backend.train_from_iterator(["hello world the model reads text"] * 20,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>", *byte_tokens]))
    sp = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", clean_up_tokenization_spaces=False)
    prompt, gen = encode(sp, "hello"), encode(sp, "world the model")
    assert sp.decode(gen[:1]) == "world"  # alone, the space is gone
    detok = IncrementalDetokenizer(sp, prompt)
    assert detok.update(gen[:1]) == " world"
    assert "".join([detok.update(gen[1:2]), detok.update(gen[2:]), detok.finish()]) == " the model"
    # A skipped special token between words is no context: the window keeps the previous one.
    eos = sp.convert_tokens_to_ids("</s>")
    ids = [*gen[:1], eos, *gen[1:]]
    _, deltas = stream(sp, ids, prompt=prompt)
    expected = sp.decode(prompt + ids, skip_special_tokens=True)[len("hello"):]
    assert "".join(deltas) == expected == " world the model"


def test_window_stays_small_over_2000_tokens(tok):
    """Not quadratic: every decode covers a few tokens, total work is linear in the output."""
    ids = (encode(tok, " ".join(SAMPLES)) * 100)[:2000]
    decoded_lengths: list[int] = []

    class CountingTokenizer:
        all_special_ids = tok.all_special_ids

        def decode(self, token_ids, skip_special_tokens=True):
            decoded_lengths.append(len(token_ids))
            return tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    detok, deltas = stream(CountingTokenizer(), ids, prompt=ids[:50])
    assert "".join(deltas) == tok.decode(ids)
    assert max(decoded_lengths) <= 10  # last chunk + a partial emoji (<= 4 byte tokens) + 1
    assert sum(decoded_lengths) <= 8 * len(ids)


# --- stop strings -------------------------------------------------------------------------------

def run_stop(tok, text, stop, *, include=False, rng=None, prompt=(), min_tokens=0):
    """Stream `text` with stop strings, checking after every delta that nothing streamed is ever
    taken back: the running concatenation is a prefix of the final text and (without min_tokens,
    which lets stop strings through in the first tokens' text) holds no stop string."""
    detok = IncrementalDetokenizer(tok, list(prompt), stop=stop, include_stop_str_in_output=include,
                                   min_tokens=min_tokens)
    streamed = ""
    for chunk in chunked(encode(tok, text), rng):
        streamed += detok.update(chunk)
        if (not include or not detok.stopped) and not min_tokens:
            assert not any(s in streamed for s in stop), (streamed, stop)
        assert detok.output_text.startswith(streamed)
    streamed += detok.finish()
    assert streamed == detok.output_text
    return detok


TEXT = "The model reads text and learns to predict the next token."


def test_single_token_stop(tok):
    assert len(encode(tok, " model")) == 1
    detok = run_stop(tok, TEXT, [" model"])
    assert (detok.output_text, detok.stop_string_hit, detok.stopped) == ("The", " model", True)


def test_multi_token_stop(tok):
    assert len(encode(tok, " learns to predict")) > 1
    assert run_stop(tok, TEXT, ["learns to predict"]).output_text == "The model reads text and "


def test_stop_straddling_a_token_boundary(tok):
    ids = encode(tok, TEXT)
    assert tok.decode(ids[:2]).endswith("The model") and tok.decode(ids[2:3]) == " reads"
    assert run_stop(tok, TEXT, ["el re"]).output_text == "The mod"


def test_stop_inside_one_token(tok):
    assert len(encode(tok, " model")) == 1
    detok = run_stop(tok, TEXT, ["ode"])
    assert detok.output_text == "The m"  # the rest of " model" is dropped with the stop string


def test_earliest_stop_wins_not_list_order(tok):
    detok = run_stop(tok, TEXT, ["reads", "model"])
    assert (detok.output_text, detok.stop_string_hit) == ("The ", "model")
    # Even when both arrive in one update, "he" wins: it ends first (the stream sees it first).
    detok = run_stop(tok, TEXT, ["The model", "he"], rng=random.Random(0))
    assert (detok.output_text, detok.stop_string_hit) == ("T", "he")


def test_include_stop_str_in_output(tok):
    detok = run_stop(tok, TEXT, ["el re"], include=True)
    assert detok.output_text == "The model re"


@pytest.mark.parametrize("stop", [["学习"], ["🎉"], ["😀🎉 and 中"]])
def test_stop_in_multi_byte_text(tok, stop):
    text = SAMPLES[1] if stop == ["学习"] else SAMPLES[2]
    assert run_stop(tok, text, stop).output_text == text[:text.index(stop[0])]


def test_stop_never_appearing_flushes_held_text_at_finish(tok):
    text = TEXT[:-1]  # ends with " token", which could begin " token!"
    detok = IncrementalDetokenizer(tok, [], stop=[" token!"])
    streamed = "".join(detok.update([i]) for i in encode(tok, text))
    assert streamed == text[:-len(" token")]
    assert detok.finish() == " token" and detok.stop_string_hit is None and detok.output_text == text


def test_only_possible_stop_prefixes_are_held(tok):
    # vLLM holds len(stop) - 1 chars always; here text that cannot begin a stop string streams at once.
    detok = IncrementalDetokenizer(tok, [], stop=["xyz"])
    ids = encode(tok, TEXT)
    assert [detok.update([i]) for i in ids] == [tok.decode([i]) for i in ids]


def test_prompt_is_not_searched_and_nothing_streams_after_a_stop(tok):
    detok = IncrementalDetokenizer(tok, encode(tok, "the model"), stop=["model"])
    assert detok.update(encode(tok, " reads")) == " reads" and not detok.stopped
    assert detok.update(encode(tok, " model and more")) == " " and detok.stopped
    assert detok.update(encode(tok, " text")) == "" and detok.finish() == ""
    assert detok.output_text == " reads "


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_stops_match_brute_force_for_any_chunking(tok, seed, include):
    rng = random.Random(seed)
    text = SAMPLES[seed % len(SAMPLES)]
    stop = []
    for _ in range(rng.randint(1, 3)):
        start = rng.randrange(len(text))
        stop.append(text[start:start + rng.randint(1, 8)])
    stop.append("never appears")
    expected = reference_stop(text, stop, include)
    for chunk_rng in [None, rng]:
        detok = run_stop(tok, text, stop, include=include, rng=chunk_rng)
        assert (detok.output_text, detok.stop_string_hit) == expected


def test_bad_stop_arguments_are_rejected(tok):
    with pytest.raises(TypeError, match="list of strings"):
        IncrementalDetokenizer(tok, [], stop="model")
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tok, [], stop=[""])


# --- min_tokens: stop strings ending in the first min_tokens ids' text are not checked ------------

def test_min_tokens_exempts_stop_strings_ending_in_the_first_tokens(tok):
    ids = encode(tok, TEXT)
    assert tok.decode(ids[:2]) == "The model"
    assert run_stop(tok, TEXT, ["e"]).output_text == "Th"
    detok = run_stop(tok, TEXT, ["e"], min_tokens=2)  # the e's of "The model" are exempt
    assert (detok.output_text, detok.stop_string_hit) == ("The model r", "e")
    assert run_stop(tok, TEXT, ["model"], min_tokens=2).output_text == TEXT  # only in exempt text


def test_min_tokens_stop_beginning_in_exempt_text_and_ending_after_it_matches(tok):
    # vLLM v1 (PR #22014): only the END of a match must lie past the first min_tokens ids' text.
    assert tok.decode(encode(tok, TEXT)[2:3]) == " reads"
    for chunk_rng in [None, random.Random(1)]:
        assert run_stop(tok, TEXT, ["el re"], min_tokens=2, rng=chunk_rng).output_text == "The mod"
        assert run_stop(tok, TEXT, ["el re"], min_tokens=3, rng=chunk_rng).output_text == TEXT  # ends in token 3


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_min_tokens_stops_match_brute_force_for_any_chunking(tok, seed, include):
    rng = random.Random(100 + seed)
    text = SAMPLES[seed % len(SAMPLES)]
    ids = encode(tok, text)
    # min_tokens at a token boundary that is also a character boundary, so "the first min_tokens
    # tokens' text" is a well-defined prefix of the text
    boundaries = [m for m in range(len(ids) + 1) if text.startswith(tok.decode(ids[:m]))
                  and not tok.decode(ids[:m]).endswith(REPLACEMENT_CHAR)]
    min_tokens = rng.choice(boundaries[1:])
    num_exempt_chars = len(tok.decode(ids[:min_tokens]))
    stop = [text[start:start + rng.randint(1, 4)] for start in rng.sample(range(len(text)), 3)]
    expected = reference_stop(text, stop, include, num_exempt_chars)
    for chunk_rng in [None, rng]:
        detok = run_stop(tok, text, stop, include=include, rng=chunk_rng, min_tokens=min_tokens)
        assert (detok.output_text, detok.stop_string_hit) == expected, (min_tokens, stop)

