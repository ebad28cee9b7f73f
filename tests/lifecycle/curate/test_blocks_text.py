"""Unit tests of the per-document text blocks: cleaning, CJK quality rules, PII (pure functions, real inputs)."""

from __future__ import annotations

from collections import Counter

import pytest

from lifecycle.data.curate.clean import drop_boilerplate_lines, remove_fillers, strip_control, strip_html
from lifecycle.data.curate.config import CleanConfig, QualityConfig
from lifecycle.data.curate.pii import cn_id_valid, find_pii, luhn_valid, scrub
from lifecycle.data.curate.quality_zh import (check_cjk, count_banned, dup_fraction, dup_ngram_char_fraction,
                                              top_ngram_char_fraction)

ZH_PROSE = ("北京是中华人民共和国的首都，也是全国的政治中心和文化中心。这座城市有三千多年的建城史，"
            "八百多年的建都史，留下了故宫、天坛和长城等大量名胜古迹。每年都有数以百万计的游客来到这里参观，"
            "感受历史与现代交融的独特魅力。近年来，北京在科技创新方面也取得了长足的进步。")


def test_strip_html_keeps_text_drops_scripts_and_decodes_entities():
    html = "<html><head><style>p{color:red}</style></head><body><p>Fish &amp; chips</p><script>x()</script>" \
           "<!-- note --><div>第二段 <b>粗体</b></div></body></html>"
    assert strip_html(html) == "Fish & chips\n\n第二段 粗体"
    assert strip_html("a <unk> token and x < y > z") == "a <unk> token and x < y > z"  # not markup


def test_control_characters_and_newlines():
    assert strip_control("a\x00b\u200bc\r\nd\te") == "abc\nd\te"


def test_boilerplate_lines_are_dropped_and_counted():
    text = "Real content here.\nAll rights reserved 2024\n版权所有 某某公司\nMore content."
    out, n = drop_boilerplate_lines(text, CleanConfig().boilerplate_patterns)
    assert (out, n) == ("Real content here.\nMore content.", 2)


@pytest.mark.parametrize("text, expected, n", [
    ("嗯嗯，我觉得这个方案可以。啊啊啊", "我觉得这个方案可以。", 2),
    ("Um, I think, uh, we should go.", "I think, we should go.", 2),
    ("The drum and the umbrella stay.", "The drum and the umbrella stay.", 0),  # not inside words
])
def test_fillers(text, expected, n):
    out, count = remove_fillers(text, CleanConfig().fillers)
    assert (out.strip(), count) == (expected, n)


def test_cjk_ngram_fractions_match_brute_force():
    chars = "天地玄黄宇宙洪荒天地玄黄日月盈昃"
    # most frequent 2-gram by brute force
    grams = Counter(chars[i:i + 2] for i in range(len(chars) - 1))
    gram, count = grams.most_common(1)[0]
    assert top_ngram_char_fraction(chars, 2) == pytest.approx(count * 2 / len(chars))
    # duplicated 4-grams: 天地玄黄 at 0 and 8 cover 8 characters
    assert dup_ngram_char_fraction(chars, 4) == pytest.approx(8 / len(chars))
    assert dup_fraction(["甲乙", "丙丁", "甲乙", ""]) == pytest.approx(2 / 6)


def test_cjk_rules_keep_prose_and_name_the_failed_rule():
    cfg = QualityConfig()
    assert check_cjk(ZH_PROSE, cfg) is None
    assert check_cjk("太短了。", cfg) == "cjk_too_short"
    assert check_cjk("点击这里！" * 30, cfg) in {"top_2gram", "dup_lines", "dup_5gram", "top_3gram", "top_4gram"}
    assert check_cjk("■□▲△●○◆◇★☆" * 5 + ZH_PROSE, cfg) == "symbol_ratio"
    assert check_cjk("This page is English text only, with no Chinese characters in it at all, none.", cfg) == \
        "cjk_ratio"


def test_banned_words_whole_words_and_cjk_substrings():
    assert count_banned("Casino night at the casinos; CASINO!", ("casino",)) == 2
    assert count_banned("这里有赌博网站，赌博违法", ("赌博",)) == 2


def _cn_id(prefix17: str) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return prefix17 + "10X98765432"[sum(int(d) * w for d, w in zip(prefix17, weights)) % 11]


def test_cn_id_checksum_and_luhn():
    good = _cn_id("11010519491231002")
    assert good == "11010519491231002X" and cn_id_valid(good)
    assert not cn_id_valid(good[:-1] + "1")  # wrong check character
    assert luhn_valid("4111 1111 1111 1111") and not luhn_valid("4111 1111 1111 1112")


def test_scrub_replaces_every_type_with_typed_placeholders():
    cn_id = _cn_id("44030619900101123")
    text = (f"联系人张三，手机 138-1234-5678 或 +86 139 1234 5678，座机 010-12345678，身份证号 {cn_id}，"
            "银行卡 6222 0202 0000 0000 008 (Luhn 校验)，邮箱 zhang.san@example.com.cn。"
            "Server at 192.168.1.20 and 2001:db8::8a2e:370:7334; api_key = 'Ab3dEf6hIj9kLm2nOp5q'. "
            "Call (555) 123-4567 or +44 20 7946 0958.")
    if not luhn_valid("6222020200000000008"):
        text = text.replace("6222 0202 0000 0000 008", "4111 1111 1111 1111")
    out, counts = scrub(text)
    assert counts == Counter({"phone": 5, "cn_id": 1, "bank_card": 1, "email": 1, "ip": 2, "secret": 1})
    for placeholder in ("<PHONE>", "<CN_ID>", "<BANK_CARD>", "<EMAIL>", "<IP>", "<SECRET>"):
        assert placeholder in out
    assert "138" not in out and cn_id not in out and "example.com" not in out


def test_scrub_leaves_clean_text_alone():
    clean = ("In 1990 2000 people lived there; by 2010 the town had 12,345 residents and a 3.5 km road. "
             "第3章第12节讲述了1949年的事情，共有365页。Version 2.1.3 was released on 2023-05-01.")
    assert find_pii(clean) == []
    bad_id = "110105194912310021"  # the right length, the wrong check character
    assert "cn_id" not in {kind for _, _, kind in find_pii(f"编号 {bad_id}")}


def test_clean_block_removes_fillers_only_when_asked(tmp_path):
    from datatrove.data import Document

    from lifecycle.data.curate.clean import Clean

    text = "<p>嗯嗯，我觉得这个方案可以。</p>"
    prose = Clean(CleanConfig(), str(tmp_path)).clean(text)
    dialogue = Clean(CleanConfig(remove_fillers=True), str(tmp_path)).clean(text)
    assert prose == ("嗯嗯，我觉得这个方案可以。", Counter({"html": 1}))
    assert dialogue == ("我觉得这个方案可以。", Counter({"html": 1, "fillers": 1}))
    kept = list(Clean(CleanConfig(), str(tmp_path)).run(iter([Document(text="<br/>", id="a", metadata={})])))
    assert kept == []  # cleaned down to nothing: removed as empty_after_clean
