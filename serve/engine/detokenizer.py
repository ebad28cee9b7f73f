"""IncrementalDetokenizer: token ids -> streamable text deltas, with stop strings. One per sequence.

Call order: `update(new_token_ids)` once per engine step (any number of ids, e.g. accepted drafts),
then `finish()` once when the sequence ends for a reason other than a stop string (EOS, stop token,
max_tokens, abort). Both return the text delta that is safe to stream now; the concatenation of
all deltas equals `output_text`, which equals `tokenizer.decode(generated_ids, skip_special_tokens)`
cut at the first stop string.

Decoding is incremental, the prefix_offset/read_offset technique of vLLM
(vllm/transformers_utils/detokenizer_utils.py, `detokenize_incrementally`) and HF's TextStreamer:
each step decodes a short window, `ids[prefix_offset:]`, and `ids[prefix_offset:read_offset]`
(text already emitted), and emits the difference. The window then slides to start at the old
read_offset, so every decode covers O(tokens of the last two steps), never the whole output.
Why the window starts before the new tokens instead of decoding them alone:
- A byte-level BPE token is bytes, not characters: a Chinese character is 3 bytes and an emoji 4,
  often split over several tokens. Decoding a partial character gives U+FFFD, so text ending in
  U+FFFD is held back (not emitted, window not slid) until the character completes.
- Byte-level BPE carries its spaces inside the tokens ("Ġmodel" decodes to " model"), so for our
  tokenizers a token decodes to the same text alone or in context. SentencePiece-style decoders
  (Llama, Mistral: Metaspace / `Strip(" ", 1, 0)`) do not: they drop the leading space of the
  *first* token of a decode, so "▁world" alone is "world". Starting the window at an already
  emitted token keeps that token first and the new token's space intact; for the same reason
  the first window is seeded with the prompt's last tokens (the first generated token is not
  the first token of the text) and the window never starts at a skipped special token only.
Stop strings are searched in the generated text only (the prompt never enters `output_text`), and
with `min_tokens` only where they end in the text of a generated id past the first `min_tokens`
(vLLM v1's detokenizer, PR #22014: the first min_tokens ids can neither stop on EOS nor on a string;
a stop string may still *begin* in their text, so prefixes of stop strings are held back there too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete/invalid UTF-8 sequence
# vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET. A UTF-8 character is at most 4 byte tokens,
# so 5 prompt tokens hold the prompt's last character whole plus one token of context.
NUM_PROMPT_CONTEXT_TOKENS = 5


class SupportsDecode(Protocol):
    """The part of a transformers tokenizer this module uses."""

    all_special_ids: list[int]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Streams the text of one generated sequence; detects stop strings and holds back their prefixes.

    With `stop` and `include_stop_str_in_output=False`, a trailing piece of text that could be the
    beginning of a stop string (e.g. "Obs" for stop "Observation:") is held back until the next
    text shows it is not, so no streamed delta ever contains text that a stop string later removes.
    That is at most `max(len(s) for s in stop) - 1` characters, and only while they are a proper
    prefix of some stop string (vLLM holds that many characters always, adding latency to every
    stream that has stop strings). With `include_stop_str_in_output=True` nothing is held back:
    a stop string found later only truncates text after itself, which was never streamed.
    """

    def __init__(self, tokenizer: SupportsDecode, prompt_token_ids: Sequence[int], *,
                 skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False, min_tokens: int = 0) -> None:
        if isinstance(stop, str):
            raise TypeError(f"stop must be a list of strings, got the string {stop!r}; write [{stop!r}]")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        self._stop = tuple(stop)
        self._include_stop_str_in_output = include_stop_str_in_output
        # The decoding window is ids[prefix_offset:] of the full sequence; we keep only it, so
        # offsets are relative to it: _window_ids[:_num_read_ids] is text already taken into
        # output, and _num_pending_chars counts characters of the decode after that boundary
        # already taken (the complete characters before a trailing partial one).
        self._window_ids = list(prompt_token_ids[max(0, len(prompt_token_ids) - NUM_PROMPT_CONTEXT_TOKENS):])
        context_text = self._decode(self._window_ids)
        if context_text.endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character: seeding would glue its bytes to the first
            # generated ones and hide them. Start clean, so output == decode(generated ids).
            self._window_ids, context_text = [], ""
        self._num_read_ids = len(self._window_ids)
        self._num_read_chars: int | None = len(context_text)  # len(decode(window[:read])); None: unknown
        self._num_pending_chars = 0
        self._streamed_pieces: list[str] = []  # output_text = "".join(pieces) + _held_text
        self._held_text = ""  # output not streamed yet: may begin a stop string
        self._max_stop_len = max(map(len, self._stop), default=1)
        self._recent_text = ""  # the output's last _max_stop_len - 1 chars (ends with _held_text)
        self.stop_string_hit: str | None = None
        self._is_finished = False
        self._num_unchecked_ids = min_tokens  # generated ids still to come whose text ends no stop string

    @property
    def stopped(self) -> bool:
        return self.stop_string_hit is not None

    @property
    def output_text(self) -> str:
        """All generated text so far (including held-back text); final after a stop or `finish`."""
        if len(self._streamed_pieces) > 1:  # compact, so repeated reads stay linear overall
            self._streamed_pieces = ["".join(self._streamed_pieces)]
        return "".join(self._streamed_pieces) + self._held_text

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Add generated ids; return the text now safe to stream. After a stop string hit this
        returns the final remainder once, then "" (ids still in flight are ignored)."""
        if self.stopped or self._is_finished or not new_token_ids:
            return ""
        num_unchecked = self._num_unchecked_ids
        if 0 < num_unchecked < len(new_token_ids):  # crosses the min_tokens boundary: split it there
            return self.update(new_token_ids[:num_unchecked]) + self.update(new_token_ids[num_unchecked:])
        self._num_unchecked_ids = max(0, num_unchecked - len(new_token_ids))
        self._window_ids.extend(new_token_ids)
        return self._take(self._decode_new_text(is_final=False), is_final=False, checks_stops=num_unchecked == 0)

    def finish(self) -> str:
        """Flush held-back text (a trailing partial character decodes as U+FFFD, as `decode` does)."""
        if self.stopped or self._is_finished:
            return ""
        self._is_finished = True
        # The flushed text is the last ids' trailing partial character: checked if they were.
        return self._take(self._decode_new_text(is_final=True), is_final=True,
                          checks_stops=self._num_unchecked_ids == 0)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _is_skipped(self, token_id: int) -> bool:
        return self._skip_special_tokens and token_id in self._special_ids

    def _decode_new_text(self, *, is_final: bool) -> str:
        """Text of the window not yet taken; slides the window when it ends on a whole character."""
        if self._num_read_chars is None:  # once per slide: the new context is the last emitted chunk
            self._num_read_chars = len(self._decode(self._window_ids[:self._num_read_ids]))
        text = self._decode(self._window_ids)
        start = self._num_read_chars + self._num_pending_chars
        is_partial = text.endswith(REPLACEMENT_CHAR) and not is_final
        # A partial character only changes the trailing U+FFFD run: UTF-8 decoding resynchronizes
        # after every whole character, so the text before that run is final and can go out now
        # (chunked updates would otherwise hold back whole chunks, and stop strings in them).
        end = len(text.rstrip(REPLACEMENT_CHAR)) if is_partial else len(text)
        new_text = text[start:end] if end > start else ""
        if is_partial:
            self._num_pending_chars += len(new_text)
        elif any(not self._is_skipped(i) for i in self._window_ids[self._num_read_ids:]):
            # Slide: the chunk just taken becomes the context. (If it was only skipped special
            # tokens, it decodes to "" and would be no context at all, so keep the old one.)
            del self._window_ids[:self._num_read_ids]
            self._num_read_ids, self._num_read_chars = len(self._window_ids), None
            self._num_pending_chars = 0
        else:
            self._num_read_ids, self._num_read_chars = len(self._window_ids), len(text)
            self._num_pending_chars = 0
        return new_text

    def _take(self, new_text: str, *, is_final: bool, checks_stops: bool) -> str:
        """Append `new_text` to the output; cut at a stop string ending in it (when `checks_stops`);
        return what may be streamed."""
        # Only a stop string ending in new_text is new, and it starts at most max_len - 1 chars
        # before it: search the output's last max_len - 1 chars (_recent_text) plus new_text.
        text = self._recent_text + new_text
        num_streamed = len(self._recent_text) - len(self._held_text)  # text[:num_streamed] is out
        hit = self._find_stop(text, len(self._recent_text)) if checks_stops and new_text else None
        if hit is not None:
            stop_str, start = hit
            self.stop_string_hit = stop_str
            # start >= num_streamed: anything from start on was a stop-string prefix, so held.
            end = start + len(stop_str) if self._include_stop_str_in_output else start
            delta, self._held_text = text[num_streamed:end], ""
        else:
            num_held_chars = 0 if is_final else self._num_chars_to_hold(text)
            delta = text[num_streamed:len(text) - num_held_chars]
            self._held_text = text[len(text) - num_held_chars:]
        self._recent_text = text[max(0, len(text) - self._max_stop_len + 1):]
        if delta:
            self._streamed_pieces.append(delta)
        return delta

    def _find_stop(self, text: str, num_old_chars: int) -> tuple[str, int] | None:
        """The stop string that ends first in `text[num_old_chars:]` (then the longest), as the stream
        would see it char by char; so the result does not depend on how tokens were chunked into updates.
        A match ending in the old text was either found before or lies in text min_tokens exempted."""
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop_str in self._stop:
            # the first occurrence ending past the old text is the one that ends first
            start = text.find(stop_str, max(0, num_old_chars - len(stop_str) + 1))
            if start >= 0 and (best is None or (start + len(stop_str), start) < best[:2]):
                best = (start + len(stop_str), start, stop_str)
        return None if best is None else (best[2], best[1])

    def _num_chars_to_hold(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        if not self._stop or self._include_stop_str_in_output:
            return 0
        for k in range(min(len(text), self._max_stop_len - 1), 0, -1):
            suffix = text[len(text) - k:]
            if any(len(s) > k and s.startswith(suffix) for s in self._stop):
                return k
        return 0
