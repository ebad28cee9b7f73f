"""Speculative decoding inside the engine: greedy output identical to non-speculative greedy (n-gram,
the target as its own draft, a genuinely different draft), sampled output with the target's distribution
(chi-square against probabilities computed directly), KV rollback and release (aborts, preemption, the
draft's own pool), the load rule, and a draft with another vocabulary refused by name."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from lifecycle.errors import ConfigError
from serve.engine.llm_engine import EngineConfig, LLMEngine
from serve.engine.scheduler import Scheduler, SchedulerConfig
from serve.engine.sequence import Sequence
from serve.kv_cache.manager import KVCacheManager
from serve.types import FinishReason, Request, SamplingParams

PROMPTS = [
    "os.path.join(a, *p)\n\nJoin two or more pathname components",
    "class collections.OrderedDict",
    "Return",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n    print(i)\nfor i in range(10):\n",  # n-gram food
    "json.dumps(obj, *, skipkeys=False, ensure_ascii=True)\n\nSerialize",
]
MAX_TOKENS = [23, 7, 18, 21, 12]  # the last step's drafts are capped at the tokens left - 1


def greedy_params(**kw) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, **kw) for m in MAX_TOKENS]


# The tiny trained model's plain greedy output falls into repeating one token after a few steps; a
# repetition penalty keeps it varied for longer (and makes the target disagree with a draft that
# ignores penalties), so every parity check also runs with one.
PENALIZED = dict(repetition_penalty=1.3)


def make_engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), block_size=4, **{"dtype": "float32", **kw}))


def token_ids(outputs) -> list[tuple[int, ...]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_all_released(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.kv.usage == 0.0 and engine.kv.num_free_blocks == engine.kv.num_blocks
    engine.kv.block_pool.check_invariants()
    proposer = engine.speculator.proposer
    if hasattr(proposer, "kv"):  # the draft model's own pool
        assert proposer.num_requests == 0 and proposer.kv.usage == 0.0
        proposer.kv.block_pool.check_invariants()


def _derived_checkpoint(source: Path, out: Path, edit_config=None, edit_state=None, edit_tokenizer=None) -> Path:
    """A plain transformers directory derived from `source` (no manifest: loads with a warning)."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for file in source.iterdir():
        if file.name not in ("manifest.json", "model.safetensors", "config.json", "tokenizer.json"):
            shutil.copy(file, out / file.name)
    config = json.loads((source / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    state = load_file(str(source / "model.safetensors"))
    save_file(edit_state(state) if edit_state else state, str(out / "model.safetensors"))
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    (out / "tokenizer.json").write_text(json.dumps(edit_tokenizer(tokenizer) if edit_tokenizer else tokenizer))
    return out


@pytest.fixture(scope="module")
def small_draft(trained_checkpoint, tmp_path_factory) -> Path:
    """A genuinely different, cheaper draft with the target's tokenizer: the target's first layer only
    (layer skipping as a draft, as in self-speculative decoding, Zhang et al. 2023). It agrees with the
    target often but not always, so acceptance is strictly between 0 and 1."""
    return _derived_checkpoint(trained_checkpoint, tmp_path_factory.mktemp("draft") / "one_layer",
                               edit_config=lambda c: {**c, "num_hidden_layers": 1},
                               edit_state=lambda s: {k: v for k, v in s.items() if ".layers.1." not in k})


@pytest.fixture(scope="module")
def baseline(trained_checkpoint):
    """Non-speculative greedy outputs (the reference for every proposer)."""
    engine = make_engine(trained_checkpoint)
    return token_ids(engine.generate(PROMPTS, greedy_params()))


@pytest.fixture(scope="module")
def penalized_baseline(trained_checkpoint):
    engine = make_engine(trained_checkpoint)
    return token_ids(engine.generate(PROMPTS, greedy_params(**PENALIZED)))


def record_verifications(engine: LLMEngine) -> list[tuple[str, list[int]]]:
    """(seq_id, emitted tokens) of every verification the engine runs from now on."""
    records: list[tuple[str, list[int]]] = []
    verify = engine.speculator.verify

    def recording(items, logits):
        verified = verify(items, logits)
        records.extend((item.seq.seq_id, v.token_ids) for item, v in zip(items, verified))
        return verified

    engine.speculator.verify = recording
    return records


@pytest.fixture(params=["ngram", "self_draft", "small_draft"])
def spec_kwargs(request, trained_checkpoint, small_draft) -> dict:
    return {"ngram": dict(speculative_method="ngram"),
            "self_draft": dict(speculative_method="draft", draft_model=str(trained_checkpoint)),
            "small_draft": dict(speculative_method="draft", draft_model=str(small_draft))}[request.param]


def test_greedy_equals_non_speculative_greedy(trained_checkpoint, baseline, penalized_baseline, spec_kwargs):
    engine = make_engine(trained_checkpoint, **spec_kwargs)
    outs = engine.generate(PROMPTS, greedy_params())
    assert token_ids(outs) == baseline
    assert [len(o.outputs[0].token_ids) for o in outs] == MAX_TOKENS
    stats = engine.stats()
    print(f"{spec_kwargs}: accepted {stats.spec_accepted_tokens_total} of {stats.spec_draft_tokens_total}")
    assert stats.spec_draft_tokens_total > 0 and stats.spec_accepted_tokens_total > 0
    assert stats.num_generation_tokens_total == sum(MAX_TOKENS)
    if spec_kwargs.get("draft_model") == str(trained_checkpoint):
        assert stats.spec_acceptance_rate == 1.0  # the target as its own draft: every greedy draft is right
    elif "draft_model" in spec_kwargs:
        assert 0.0 < stats.spec_acceptance_rate < 1.0
    assert token_ids(engine.generate(PROMPTS, greedy_params(**PENALIZED))) == penalized_baseline
    assert engine.stats().spec_draft_tokens_total > stats.spec_draft_tokens_total
    assert_all_released(engine)


def test_stop_token_inside_accepted_drafts_ends_there(trained_checkpoint, penalized_baseline):
    """Find a verification step that emitted several tokens, make its first one a stop token: the rerun
    must end on it (the same greedy steps happen: stop ids do not change an argmax), the rest dropped."""
    engine = make_engine(trained_checkpoint, speculative_method="draft", draft_model=str(trained_checkpoint))
    records = record_verifications(engine)
    params = SamplingParams(max_tokens=23, temperature=0.0, ignore_eos=True, **PENALIZED)
    free = engine.generate([PROMPTS[0]], params)[0].outputs[0].token_ids
    assert free == penalized_baseline[0]
    # One request: token 0 comes from the prefill step, then every step verifies drafts (bar the very
    # last when one token is left), so the emissions tile free[1:]. Pick a token that first occurs as
    # the accepted first draft of a step that emitted more.
    starts = [1 + sum(len(tokens) for _, tokens in records[:i]) for i in range(len(records))]
    stop, first = next((tokens[0], start) for start, (_, tokens) in zip(starts, records)
                       if len(tokens) > 1 and free.index(tokens[0]) == start)
    records.clear()
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=23, temperature=0.0, ignore_eos=True,
                                                       stop_token_ids=[stop], **PENALIZED))[0].outputs[0]
    assert out.token_ids == free[:first + 1]
    assert out.finish_reason is FinishReason.STOP and out.stop_reason == stop
    last_step = records[-1][1]
    assert last_step.index(stop) < len(last_step) - 1  # tokens after the stop were verified, then dropped
    assert_all_released(engine)


def test_penalties_min_tokens_and_logprobs_are_exact_along_the_drafts(trained_checkpoint):
    # The draft (the target itself) proposes the raw argmax; with penalties the target's choice at draft
    # position j depends on drafts 1..j, so rejections happen and each position needs its own sampler row.
    params = [SamplingParams(max_tokens=m, temperature=0.0, repetition_penalty=1.4, presence_penalty=0.5,
                             frequency_penalty=0.3, min_tokens=min(m, 6), logprobs=2) for m in MAX_TOKENS]
    plain = make_engine(trained_checkpoint).generate(PROMPTS, params)
    engine = make_engine(trained_checkpoint, speculative_method="draft", draft_model=str(trained_checkpoint))
    spec = engine.generate(PROMPTS, params)
    assert token_ids(spec) == token_ids(plain)
    for a, b in zip(plain, spec):
        assert a.outputs[0].finish_reason is b.outputs[0].finish_reason
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.chosen.token_id == y.chosen.token_id and x.chosen.rank == y.chosen.rank
            assert x.chosen.logprob == pytest.approx(y.chosen.logprob, abs=1e-4)
            assert [t.token_id for t in x.top] == [t.token_id for t in y.top]
    stats = engine.stats()
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total
    assert_all_released(engine)


def test_preemption_with_speculation_matches(trained_checkpoint, baseline, spec_kwargs):
    engine = make_engine(trained_checkpoint, num_kv_blocks=32, **spec_kwargs)
    outs = engine.generate(PROMPTS, greedy_params())
    print(f"{engine.scheduler.num_preemptions_total} preemptions")
    assert engine.scheduler.num_preemptions_total > 0
    assert engine.stats().spec_draft_tokens_total > 0
    assert token_ids(outs) == baseline
    assert_all_released(engine)


def test_random_lifecycles_keep_kv_in_step_and_leave_nothing_behind(trained_checkpoint, small_draft):
    """Mixed greedy/sampled, n = 1/2, stops, opt-outs, aborts, a small pool (preemption) and prefix
    caching, all with draft-model speculation: between steps every running sequence holds exactly
    num_computed_tokens KV slots, and at the end both pools are empty."""
    import random

    rng = random.Random(0)
    engine = make_engine(trained_checkpoint, num_kv_blocks=24, speculative_method="draft",
                         draft_model=str(small_draft), num_speculative_tokens=3)
    pending = list(range(40))
    while pending or engine.has_unfinished_requests():
        if pending and rng.random() < 0.5:
            i = pending.pop()
            engine.add_request(f"r{i}", rng.choice(PROMPTS) + " " * rng.randrange(3), SamplingParams(
                max_tokens=rng.randint(1, 20), temperature=rng.choice([0.0, 1.0]), n=rng.choice([1, 1, 2]),
                stop_token_ids=rng.sample(range(3, 512), 20), speculative=rng.choice([None, None, False])))
        if engine._seqs and rng.random() < 0.1:
            engine.abort_request(rng.choice(sorted(engine._seqs)))
        engine.step()
        for seq in engine.scheduler.running:
            assert engine.kv.num_tokens(seq.seq_id) == seq.num_computed_tokens <= seq.num_tokens
        engine.kv.block_pool.check_invariants()
    stats = engine.stats()
    print(f"{stats.num_preemptions_total} preemptions, accepted {stats.spec_accepted_tokens_total} "
          f"of {stats.spec_draft_tokens_total}")
    assert stats.spec_draft_tokens_total > 0 and stats.num_preemptions_total > 0
    assert_all_released(engine)


def test_abort_mid_speculation_releases_both_pools(trained_checkpoint, small_draft):
    engine = make_engine(trained_checkpoint, speculative_method="draft", draft_model=str(small_draft))
    for rid, prompt in zip("abc", PROMPTS):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    while engine.speculator.num_draft_tokens_total == 0:
        engine.step()
    assert engine.speculator.proposer.num_requests == 3 and engine.speculator.proposer.kv.usage > 0
    assert engine.abort_request("b")
    assert engine.speculator.proposer.num_requests == 2
    engine.step()
    assert engine.abort_request("a")
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_released(engine)


def test_sampled_output_has_the_targets_distribution(trained_checkpoint, small_draft):
    """Joint law of the first two tokens over many unseeded requests in one batch: t1 is sampled as
    usual, t2 comes out of verification (an accepted draft, or a resample from norm(p - q)+). Expected
    P(t1 = a, t2 = b) = p(a | prompt) p(b | prompt, a), from transformers' logits directly. top_k = 4
    keeps the law on 16 cells (the tiny model's raw distributions are too flat to test cell by cell)
    and exercises the warpers on both p and q; the draft's top 4 differ from the target's at times."""
    from transformers import AutoModelForCausalLM

    num_requests, prompt, temperature, top_k = 1000, PROMPTS[1], 0.8, 4
    engine = make_engine(trained_checkpoint, speculative_method="draft", draft_model=str(small_draft),
                         num_speculative_tokens=2, speculative_max_num_seqs=num_requests,
                         max_num_seqs=num_requests, max_num_batched_tokens=1 << 16, enable_prefix_caching=False)
    torch.manual_seed(0)
    params = SamplingParams(max_tokens=4, temperature=temperature, top_k=top_k, ignore_eos=True)
    pairs = [o.outputs[0].token_ids[:2] for o in engine.generate([prompt] * num_requests, params)]
    stats = engine.stats()
    print(f"acceptance {stats.spec_acceptance_rate:.3f} over {stats.spec_draft_tokens_total} drafts")
    assert stats.spec_draft_tokens_total >= num_requests and 0.05 < stats.spec_acceptance_rate < 0.95

    def warped(logits: torch.Tensor) -> torch.Tensor:  # (rows, V) -> top-k, temperature, softmax
        logits = logits.double() / temperature
        return logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], float("-inf")).softmax(-1)

    model = AutoModelForCausalLM.from_pretrained(trained_checkpoint).eval()
    ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        p1 = warped(model(torch.tensor([ids])).logits[:, -1])[0]  # (V,)
        firsts = p1.nonzero()[:, 0].tolist()  # the top_k tokens
        p2 = warped(model(torch.tensor([ids + [a] for a in firsts])).logits[:, -1])  # (top_k, V)
    joint = p1[firsts, None] * p2  # (top_k, V)
    observed = torch.zeros_like(joint)
    for a, b in pairs:
        assert a in firsts and joint[firsts.index(a), b] > 0, f"({a}, {b}) is outside the target's support"
        observed[firsts.index(a), b] += 1
    big = joint * num_requests >= 5  # cells tested one by one; the rest pooled into one cell
    counts = torch.cat([observed[big], observed[~big].sum()[None]])  # (cells,)
    probs = torch.cat([joint[big], joint[~big].sum()[None]])  # (cells,)
    if probs[-1] * num_requests < 5:
        counts, probs = counts[:-1], probs[:-1] / probs[:-1].sum()
    expected = num_requests * probs
    statistic = ((counts - expected) ** 2 / expected).sum()
    df = counts.numel() - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2))
    tv = 0.5 * float((counts / num_requests - probs).abs().sum())
    print(f"chi2={float(statistic):.1f} df={df} p={p_value:.3f} tv={tv:.3f}")
    assert df >= 8 and p_value > 1e-3  # a correct sampler fails this one time in a thousand
    assert_all_released(engine)


def test_load_rule_turns_speculation_down_and_back_up(trained_checkpoint):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    busy = make_engine(trained_checkpoint, speculative_method="ngram", speculative_max_num_seqs=2)
    busy.generate([PROMPTS[3]] * 3, params)  # 3 running > 2: never speculates
    assert busy.stats().spec_draft_tokens_total == 0 and busy.speculator.num_steps_turned_down_total > 0

    # Budget 16, fraction 0.5: while more than 8 prompt tokens wait or prefill in chunks, the running
    # decode gets no drafts; once little enough is left, speculation comes back.
    engine = make_engine(trained_checkpoint, speculative_method="ngram", max_num_batched_tokens=16)
    engine.add_request("decoding", PROMPTS[3], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    while engine.speculator.num_draft_tokens_total == 0:
        engine.step()
    prompt = engine.tokenizer.encode(PROMPTS[0] + " " + PROMPTS[4], add_special_tokens=False)
    assert len(prompt) > 1 + 15 + 8  # two chunks of 15 (budget - the decode) before <= 8 are left
    engine.add_request("long", prompt, params)
    drafted, turned_down = engine.speculator.num_draft_tokens_total, engine.speculator.num_steps_turned_down_total
    engine.step()
    engine.step()
    assert engine.speculator.num_draft_tokens_total == drafted  # the prompt's chunks went first
    assert engine.speculator.num_steps_turned_down_total == turned_down + 2
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.speculator.num_draft_tokens_total > drafted
    assert_all_released(engine)


def test_per_request_switch(trained_checkpoint):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    quiet = make_engine(trained_checkpoint, speculative_method="ngram")
    off = quiet.generate([PROMPTS[3]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                      speculative=False))
    assert quiet.stats().spec_draft_tokens_total == 0
    on = quiet.generate([PROMPTS[3]], params)
    assert quiet.stats().spec_draft_tokens_total > 0 and token_ids(on) == token_ids(off)
    opt_in = make_engine(trained_checkpoint, speculative_method="ngram", speculative_by_default=False)
    opt_in.generate([PROMPTS[3]], params)
    assert opt_in.stats().spec_draft_tokens_total == 0
    opt_in.generate([PROMPTS[3]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, speculative=True))
    assert opt_in.stats().spec_draft_tokens_total > 0


def test_draft_with_another_vocabulary_is_refused_by_name(trained_checkpoint, tmp_path):
    def swap_two_tokens(tokenizer: dict) -> dict:  # same size, different token -> id map
        vocab = tokenizer["model"]["vocab"]
        a, b = [t for t, i in vocab.items() if i in (300, 301)]
        vocab[a], vocab[b] = vocab[b], vocab[a]
        return tokenizer

    draft = _derived_checkpoint(trained_checkpoint, tmp_path / "other_vocab", edit_tokenizer=swap_two_tokens)
    with pytest.raises(ConfigError, match=r"^draft_model: .*different tokenizer vocabulary"):
        make_engine(trained_checkpoint, speculative_method="draft", draft_model=str(draft))


@pytest.mark.parametrize("kwargs,field", [
    (dict(speculative_method="draft"), "draft_model"),
    (dict(draft_model="x"), "draft_model"),
    (dict(speculative_method="medusa"), "speculative_method"),
    (dict(speculative_method="ngram", num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(speculative_method="ngram", speculative_ngram_min=3, speculative_ngram_max=2), "speculative_ngram_min"),
    (dict(speculative_max_budget_fraction=0.0), "speculative_max_budget_fraction"),
])
def test_bad_speculative_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        EngineConfig(model="unused", **kwargs)


# --- the scheduler with fake drafts (no model) -------------------------------------------------------

def _two_decoding_seqs(budget: int) -> tuple[Scheduler, KVCacheManager, Sequence, Sequence]:
    """A pool of 6 blocks of 4; sequences a and b with 7 computed tokens (2 blocks each) and their first
    sampled token still to compute: 2 blocks free. Then the step budget is set to `budget`."""
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=14), kv)
    seqs = []
    for seq_id, first in (("a", 0), ("b", 100)):
        prompt = list(range(first, first + 7))
        request = Request(request_id=seq_id, prompt_token_ids=tuple(prompt), params=SamplingParams(),
                          arrival_time_s=time.monotonic())
        seqs.append(Sequence(seq_id=seq_id, request=request, index=0, token_ids=prompt, num_prompt_tokens=7))
        scheduler.add(seqs[-1])
    for item in scheduler.schedule().scheduled:
        scheduler.on_step_done(item)
        item.seq.token_ids.append(50)
    scheduler.config = SchedulerConfig(max_num_batched_tokens=budget)
    assert kv.num_free_blocks == 2
    return scheduler, kv, *seqs


def test_scheduler_gives_drafts_only_the_budget_left_and_rolls_back_rejected_ones():
    scheduler, kv, a, b = _two_decoding_seqs(budget=7)
    out = scheduler.schedule({"a": [1, 2, 3, 4], "b": [5, 6, 7, 8]})
    # mandatory tokens first (1 each), then drafts from the 5 budget tokens left, in scheduling order
    assert not out.preempted and [item.draft_token_ids for item in out.scheduled] == [[1, 2, 3, 4], [5]]
    assert out.num_tokens == 7 and kv.num_tokens("a") == 12 and kv.num_tokens("b") == 9
    assert all(item.completes_sequence for item in out.scheduled)
    item_a, item_b = out.scheduled
    scheduler.on_step_done(item_a, num_accepted_drafts=1)  # last token + 1 draft stay computed
    assert a.num_computed_tokens == 9 == kv.num_tokens("a")
    scheduler.on_step_done(item_b, num_accepted_drafts=0)
    assert b.num_computed_tokens == 8 == kv.num_tokens("b")
    assert kv.num_free_blocks == 1  # b's draft block went back
    kv.block_pool.check_invariants()


def test_scheduler_never_preempts_to_make_room_for_drafts():
    scheduler, kv, a, b = _two_decoding_seqs(budget=64)
    out = scheduler.schedule({"a": list(range(8)), "b": [5, 6, 7, 8]})  # a's 8 drafts take both free blocks
    assert not out.preempted and scheduler.num_preemptions_total == 0
    assert [(item.num_new_tokens, item.num_drafts) for item in out.scheduled] == [(9, 8), (1, 0)]
    assert kv.num_free_blocks == 0
