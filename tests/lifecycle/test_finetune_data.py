"""Fine-tuning data: formats, detection, bad records, column maps, loss masks, truncation, mixing, plan."""

from __future__ import annotations

import csv
import json

import pytest

from lifecycle.data.chat_encoding import encode_conversation, encode_preference, mask_runs
from lifecycle.data.formats import (BadRecord, Message, parse_column_map, ranked_pairs, read_conversations,
                                    read_preferences)
from lifecycle.data.mixing import mix_counts, parse_sources, plan_mix
from lifecycle.data.readers import ReadStats
from lifecycle.errors import ConfigError, DataError


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from lifecycle.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


# ------------------------------------------------------------------------------------- formats


def test_each_sft_format_parses(tmp_path):
    alpaca = _jsonl(tmp_path / "a.jsonl", [{"instruction": "add", "input": "1 2", "output": "3", "system": "sys",
                                            "history": [["hi", "hello"]]}])
    messages = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                           {"role": "assistant",
                                                            "content": [{"type": "text", "value": "a"}]}]}])
    share = tmp_path / "s.json"
    share.write_text(json.dumps([{"system": "S", "conversations": [
        {"from": "human", "value": "q1"}, {"from": "function_call", "value": "call"},
        {"from": "observation", "value": "result"}, {"from": "gpt", "value": "a1"}]}]))
    convs = read_conversations([alpaca, messages, share])
    assert [[(m.role, m.content) for m in c.messages] for c in convs] == [
        [("system", "sys"), ("user", "hi"), ("assistant", "hello"), ("user", "add\n\n1 2"), ("assistant", "3")],
        [("user", "q"), ("assistant", "a")],
        [("system", "S"), ("user", "q1"), ("assistant", "call"), ("tool", "result"), ("assistant", "a1")]]
    assert [(c.source, c.line) for c in convs] == [(str(alpaca), 1), (str(messages), 1), (str(share), 1)]


def test_csv_and_parquet_and_column_map(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "answer"])
        writer.writerow(["what is 2+2?", "4"])
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), tmp_path / "d.parquet")
    columns = parse_column_map("instruction=question,output=answer")
    convs = read_conversations([path, tmp_path / "d.parquet"], columns=columns)
    assert [c.messages[-1].content for c in convs] == ["4", "a"]
    assert convs[0].line == 2  # the header is line 1
    with pytest.raises(ConfigError, match="--columns"):
        parse_column_map("instruction")


def test_preference_formats_and_ranked_expansion(tmp_path):
    pairwise = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "p1", "chosen": "c", "rejected": "r"},
        {"instruction": "i", "input": "x", "output": ["good", "bad"]},  # LLaMA-Factory alpaca pair
        {"conversations": [{"from": "human", "value": "h"}], "chosen": {"from": "gpt", "value": "gc"},
         "rejected": {"from": "gpt", "value": "gr"}},
        {"chosen_messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "yes"}],
         "rejected_messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "no"}]}])
    pairs = read_preferences([pairwise], fmt="pairwise")
    assert [(p.prompt[-1].content, p.chosen, p.rejected) for p in pairs] == [
        ("p1", "c", "r"), ("i\n\nx", "good", "bad"), ("h", "gc", "gr"), ("u", "yes", "no")]
    ranked = _jsonl(tmp_path / "r.jsonl", [
        {"prompt": "q", "output": ["A", "B", "C"]},
        {"prompt": "q2", "choices": [{"text": "y", "rank": 2}, {"text": "x", "rank": 1}, {"text": "z", "rank": 3}]}])
    got = [(p.prompt[-1].content, p.chosen, p.rejected) for p in read_preferences([ranked])]  # detected: ranked
    assert got == [("q", "A", "B"), ("q", "A", "C"), ("q", "B", "C"),
                   ("q2", "x", "y"), ("q2", "x", "z"), ("q2", "y", "z")]
    assert ranked_pairs(["1", "2", "3", "4"]) == [("1", "2"), ("1", "3"), ("1", "4"), ("2", "3"), ("2", "4"),
                                                  ("3", "4")]


def test_format_detected_per_file_and_forced(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    assert len(read_conversations([a, b])) == 2
    stats = ReadStats()
    assert read_conversations([b], fmt="alpaca", stats=stats) == []  # forced: a sharegpt record is not alpaca
    assert stats.num_skipped == 1 and 'missing "instruction"' in stats.examples[0]


def test_bad_records_skipped_with_file_line_and_what_is_missing(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"instruction": "i", "output": "o"}, {"instruction": "no output"}, "{oops",
                                         {"messages": [{"role": "user", "content": "q"}]}])
    stats = ReadStats()
    convs = read_conversations([path], stats=stats)
    assert len(convs) == 1 and stats.num_skipped == 3
    assert stats.examples[0].startswith(f"{path}:2: ") and 'missing "output"' in stats.examples[0]
    assert stats.examples[1].startswith(f"{path}:3: invalid JSON")
    with pytest.raises(DataError, match=rf"{path}:2: .*missing \"output\""):
        read_conversations([path], strict=True)
    mixed = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError, match="must end with an assistant turn"):
        read_conversations([mixed], fmt="messages", strict=True)
    with pytest.raises(DataError, match="fits no preference format"):
        read_preferences([_jsonl(tmp_path / "x.jsonl", [{"text": "t"}])], strict=True)


# ------------------------------------------------------------------------------------- loss masks


def _targets(tok, enc):
    """The decoded text of each run of loss-carrying tokens."""
    return [tok.decode(enc.input_ids[a:b]) for a, b in mask_runs(enc.assistant_masks)]


@pytest.mark.parametrize("system", [None, "be short"])
def test_single_turn_mask_is_exactly_the_answer(tok, system):
    messages = ([Message("system", system)] if system else []) + [Message("user", "say the model"),
                                                                  Message("assistant", "the model")]
    enc = encode_conversation(tok, messages, max_len=256)
    prompt = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages[:-1]],
                                     tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
    answer = tok("the model<|im_end|>", add_special_tokens=False)["input_ids"]
    # Loss on the answer and its <|im_end|>, nothing before (system, user, headers), not the newline after.
    expected = [0] * len(prompt) + [1] * len(answer) + [0] * (len(enc.input_ids) - len(prompt) - len(answer))
    assert enc.assistant_masks == expected
    assert enc.input_ids[len(prompt):len(prompt) + len(answer)] == answer


def test_multi_turn_mask_last_answer_or_all_answers(tok):
    messages = [Message("system", "sys"), Message("user", "u1"), Message("assistant", "a one"),
                Message("user", "u2"), Message("assistant", "a two")]
    assert _targets(tok, encode_conversation(tok, messages, max_len=256)) == ["a two<|im_end|>"]
    both = encode_conversation(tok, messages, max_len=256, train_on_history=True)
    assert _targets(tok, both) == ["a one<|im_end|>", "a two<|im_end|>"]
    # tool call then tool result then answer: the final exchange's answer only
    tool = [Message("user", "u"), Message("assistant", "call"), Message("tool", "result"), Message("assistant", "done")]
    assert _targets(tok, encode_conversation(tok, tool, max_len=256)) == ["done<|im_end|>"]


def test_history_truncated_from_the_left_by_whole_exchanges(tok):
    turns = [Message("system", "sys")]
    for i in range(6):
        turns += [Message("user", f"question {i} " + "the model " * 5), Message("assistant", f"answer {i}")]
    full = encode_conversation(tok, turns, max_len=10_000)
    short = encode_conversation(tok, turns, max_len=len(full.input_ids) - 1)
    assert short.num_dropped_exchanges == 1
    text = tok.decode(short.input_ids)
    assert text.startswith("<|im_start|>system\nsys<|im_end|>") and "question 0" not in text
    assert "question 1" in text and text.endswith("answer 5<|im_end|>\n")
    with pytest.raises(BadRecord, match="longer than --max-len"):
        encode_conversation(tok, turns, max_len=8)
    pair = encode_preference(tok, turns[:-1], "good answer", "bad", max_len=len(short.input_ids))
    assert tok.decode(pair.chosen_ids) == "good answer<|im_end|>\n" and pair.num_dropped_exchanges >= 1


# ------------------------------------------------------------------------------------- mixing and plan


def test_mixing_weights_counts_and_determinism():
    assert [(s.path, s.weight) for s in parse_sources(["d.jsonl:0.2,g.jsonl:0.8"])] == [("d.jsonl", 0.2),
                                                                                         ("g.jsonl", 0.8)]
    assert [s.weight for s in parse_sources(["a", "b"])] == [0.5, 0.5]
    assert mix_counts([100, 1000], [0.2, 0.8]) == [100, 400]  # the scarce source bounds the total
    assert mix_counts([100, 1000], [0.2, 0.8], total=1000) == [200, 800]  # repeats the scarce one
    order = plan_mix([100, 1000], [0.2, 0.8], seed=3, total=1000)
    assert order == plan_mix([100, 1000], [0.2, 0.8], seed=3, total=1000) != plan_mix([100, 1000], [0.2, 0.8],
                                                                                       seed=4, total=1000)
    first = [i for s, i in order if s == 0]
    assert len(first) == 200
    assert sorted(set(first)) == list(range(100))  # every scarce example used before any repeats twice
    with pytest.raises(ConfigError, match="weight"):
        parse_sources(["a.jsonl:-1"])


def test_plan_learning_rate_and_domain_share():
    from lifecycle.plan import default_finetune_lr, domain_share_warning

    assert default_finetune_lr(is_lora=False, global_batch_size=32) == pytest.approx(2e-5)
    assert default_finetune_lr(is_lora=True, global_batch_size=128) == pytest.approx(2e-4)
    assert domain_share_warning("pretrain", 0.10) is None and "15%" in domain_share_warning("pretrain", 0.2)
    assert domain_share_warning("sft", 0.5) is None and domain_share_warning("sft", 0.6)


def test_plan_cli_shows_lr_and_warns(capsys):
    from lifecycle.cli import main

    assert main(["plan", "--preset", "tiny", "--stage", "pretrain", "--domain-share", "0.3",
                 "--micro-batch-size", "8", "--grad-accum", "4"]) == 0
    out = capsys.readouterr().out
    assert "full 2.00e-05, LoRA 1.00e-04" in out and "30% domain data in continued pretraining" in out


def test_demo_instruction_and_preference_data(tmp_path):
    from lifecycle.demo import DemoFinetuneConfig, write_instruction_data

    corpus = tmp_path / "train.jsonl"
    docs = [{"text": "t", "qualname": f"mod.f{i}", "kind": "function", "signature": "", "summary": f"Does the documented thing number {i}."}
            for i in range(40)] + [{"text": "t", "qualname": "mod", "kind": "module", "signature": "",
                                    "summary": "A module, not a function."}]
    _jsonl(corpus, docs)
    cfg = DemoFinetuneConfig(sft_steps=3, dpo_steps=2, batch_size=2, num_eval=3)
    files = write_instruction_data(corpus, tmp_path / "out", cfg)
    read = {k: [json.loads(ln) for ln in p.read_text().splitlines()] for k, p in files.items()}
    assert [len(read[k]) for k in ("sft_train", "sft_eval", "dpo_train", "dpo_eval")] == [6, 3, 4, 3]
    summary = {f"What does {d['qualname']} do?": d["summary"] for d in docs}
    for row in read["sft_train"] + read["sft_eval"]:
        assert summary[row["instruction"]] == row["output"]
    for row in read["dpo_train"] + read["dpo_eval"]:
        assert row["chosen"] == summary[row["prompt"]] != row["rejected"]
        assert row["rejected"] in summary.values()  # another function's documentation
    sft_q = {r["instruction"] for r in read["sft_train"] + read["sft_eval"]}
    assert not sft_q & {r["prompt"] for r in read["dpo_train"] + read["dpo_eval"]}
    assert "What does mod do?" not in sft_q
