"""Conversations -> token ids with a loss mask, through the tokenizer's own chat template.

Which positions carry loss is decided here, once, and tested token by token
(tests/lifecycle/test_sft_masking.py): the template's `{% generation %}` blocks mark what the assistant
says (its text and closing <|im_end|>); everything else (system prompt, user turns, role headers) is
masked. By default only the *last* assistant turn is trained on: the earlier answers of a dialogue are
context the model is shown, not targets (`train_on_history=True` trains on them too).

A dialogue longer than `max_len` loses whole exchanges from the left (oldest first; the system prompt
stays), never part of an answer. If even the last exchange does not fit, the example is unusable and
the caller counts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lifecycle.data.formats import BadRecord, Message


@dataclass(frozen=True)
class EncodedChat:
    input_ids: list[int]
    assistant_masks: list[int]  # 1 where the token is a target (its logit at the previous position carries loss)
    num_dropped_exchanges: int  # exchanges removed from the left to fit max_len


def exchanges(messages: Sequence[Message]) -> tuple[list[Message], list[list[Message]]]:
    """(system messages, exchanges): an exchange is the non-assistant turns and the assistant turns after them."""
    system = [m for m in messages[:1] if m.role == "system"]
    groups: list[list[Message]] = []
    for message in messages[len(system):]:
        if not groups or (message.role != "assistant" and groups[-1][-1].role == "assistant"):
            groups.append([])
        groups[-1].append(message)
    return system, groups


def mask_runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s."""
    runs, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _render(tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    out = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages], tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask):
        raise ValueError("the chat template marks no assistant tokens: it needs {% generation %} blocks "
                         "(lmforge's tokenizer template has them)")
    return ids, mask


def encode_conversation(tokenizer, messages: Sequence[Message], *, max_len: int,
                        train_on_history: bool = False) -> EncodedChat:
    """Token ids and loss mask of one dialogue, left-truncated by whole exchanges to `max_len` tokens."""
    system, groups = exchanges(messages)
    for dropped in range(len(groups)):
        kept = [*system, *(m for g in groups[dropped:] for m in g)]
        ids, mask = _render(tokenizer, kept)
        if len(ids) <= max_len:
            break
    else:
        raise BadRecord(f"the last exchange alone is {len(ids)} tokens, longer than --max-len {max_len}")
    if not train_on_history:
        # The last answer's run(s): those of the assistant messages of the last exchange after its last
        # non-assistant turn. Every assistant message renders as exactly one run.
        last = groups[-1]
        num_final = len(last) - max(i for i, m in enumerate(last) if m.role != "assistant") - 1
        runs = mask_runs(mask)
        keep = runs[len(runs) - num_final:]
        mask = [0] * len(mask)
        for start, end in keep:
            mask[start:end] = [1] * (end - start)
    return EncodedChat(ids, mask, dropped)


def _ids(tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages], tokenize=True,
                                        return_dict=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]  # the dialogue up to and including the assistant header
    chosen_ids: list[int]  # the answer tokens after it (text, <|im_end|>, the template's newline)
    rejected_ids: list[int]
    num_dropped_exchanges: int


def encode_preference(tokenizer, prompt: Sequence[Message], chosen: str, rejected: str, *,
                      max_len: int) -> EncodedPair:
    """Prompt and the two answers as token ids; the prompt loses whole exchanges from the left until
    prompt + the longer answer fit in `max_len`; an answer is never cut."""
    system, groups = exchanges(prompt)

    def completion(prompt_ids: list[int], kept: list[Message], answer: str) -> list[int]:
        full = _ids(tokenizer, [*kept, Message("assistant", answer)], add_generation_prompt=False)
        if full[:len(prompt_ids)] != prompt_ids:
            raise BadRecord("the chat template renders the prompt differently before an answer")
        return full[len(prompt_ids):]

    for dropped in range(len(groups)):
        kept = [*system, *(m for g in groups[dropped:] for m in g)]
        prompt_ids = _ids(tokenizer, kept, add_generation_prompt=True)
        chosen_ids = completion(prompt_ids, kept, chosen)
        rejected_ids = completion(prompt_ids, kept, rejected)
        if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) <= max_len:
            return EncodedPair(prompt_ids, chosen_ids, rejected_ids, dropped)
    raise BadRecord(f"the last prompt turn and the longer answer are {len(prompt_ids)} + "
                    f"{max(len(chosen_ids), len(rejected_ids))} tokens, longer than --max-len {max_len}")
