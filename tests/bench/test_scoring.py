from deploy.bench.scoring import rouge_l, score


def test_exact_and_contains_ignore_case_and_punctuation():
    assert score("Paris.", "paris") == {"exact": 1.0, "contains": 1.0, "rouge_l": 1.0}
    s = score("The capital of France is Paris.", "Paris")
    assert s["exact"] == 0.0 and s["contains"] == 1.0 and 0 < s["rouge_l"] < 1


def test_rouge_l_is_lcs_f1_on_words():
    # LCS "the cat the mat" = 4 of 6 answer words and 4 of 5 reference words.
    expected = 2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5)
    assert abs(rouge_l("the cat sat on the mat", "the cat lay the mat") - expected) < 1e-9


def test_chinese_is_scored_by_characters():
    assert score("中国的首都是北京。", "北京")["contains"] == 1.0
    assert abs(rouge_l("首都是北京", "北京") - 2 * (2/5) * 1 / (2/5 + 1)) < 1e-9
    assert rouge_l("上海", "北京") == 0.0
