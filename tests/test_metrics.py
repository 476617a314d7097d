"""llama_sft.evaluation.metrics: every metric on hand-checked examples, answer extraction, JSON
field accuracy and aggregation. Expected values are worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest

import llama_sft.evaluation.metrics as lm
from llama_sft.evaluation.metrics import aggregate, score_example

GSM = lm.GSM8K_ANSWER_REGEX


# ---------------------------------------------------------------- normalisation, EM, F1


def test_normalize_answer_is_squad_style():
    assert lm.normalize_answer("  The Cat,  sat!  ") == "cat sat"
    assert lm.normalize_answer("An apple a day") == "apple day"
    assert lm.normalize_answer("Theory") == "theory"  # 'the' only as a whole word
    assert lm.normalize_answer("don’t “quote”") == "dont quote"  # Unicode punctuation too


def test_exact_match():
    # both normalise to "cat sat on mat"
    assert lm.exact_match("The cat sat on a mat.", "the cat sat on the mat") == 1.0
    assert lm.exact_match("  positive\n", "positive") == 1.0
    assert lm.exact_match("Paris", "London") == 0.0
    assert lm.exact_match("Harborview Analytics Inc", "Harborview Analytics") == 0.0


def test_token_f1_hand_values():
    # 2 common of 3 predicted, 2 reference: P = 2/3, R = 1, F1 = 2PR/(P+R) = 0.8
    assert lm.token_f1("Harborview Analytics Inc", "Harborview Analytics") == pytest.approx(0.8)
    # 2 common ("blue", "black"), P = 2/4, R = 2/3: F1 = (2/3) / (7/6) = 4/7
    assert lm.token_f1("red green blue black", "blue black white") == pytest.approx(4 / 7)
    # counts are clipped: 1 common, P = 1/3, R = 1: F1 = (2/3) / (4/3) = 0.5
    assert lm.token_f1("blue blue blue", "blue") == pytest.approx(0.5)
    assert lm.token_f1("green", "blue") == 0.0
    assert lm.token_f1("", "blue") == 0.0
    assert lm.token_f1("the", "a") == 1.0  # both empty after normalisation


# ---------------------------------------------------------------- ROUGE-L and BLEU


def test_rouge_l_hand_values():
    # LCS("the cat sat on a mat", "the cat sat on the mat") = the cat sat on mat = 5 of 6 / 6
    assert lm.rouge_l("the cat sat on a mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # LCS = 1 word; P = 1/2, R = 1/3; F = 2 * (1/6) / (5/6) = 0.4
    assert lm.rouge_l("cat the", "the cat sat") == pytest.approx(0.4)
    assert lm.rouge_l("The Cat.", "the cat") == 1.0  # lowercased, punctuation dropped
    assert lm.rouge_l("", "the cat") == 0.0


def test_sentence_bleu_hand_values():
    # 6 tokens each, no brevity penalty. Matches: 1-grams 5/6, 2-grams 3/5 (the cat, cat sat,
    # sat on), 3-grams 2/4, 4-grams 1/3 -> BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** 0.25
    assert lm.sentence_bleu("the cat sat on a mat", "the cat sat on the mat") == pytest.approx(
        (1 / 12) ** 0.25)
    # all precisions 1, prediction 5 tokens vs 6: brevity penalty exp(1 - 6/5)
    assert lm.sentence_bleu("the cat sat on the", "the cat sat on the mat") == pytest.approx(
        math.exp(-0.2))
    assert lm.sentence_bleu("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert lm.sentence_bleu("", "positive") == 0.0


def test_corpus_bleu_hand_value():
    # counts summed over both sentences: 1-grams (6+5)/12, 2-grams (5+3)/10, 3-grams (4+2)/8,
    # 4-grams (3+1)/6; equal lengths, no brevity penalty
    expected = (11 / 12 * 8 / 10 * 6 / 8 * 4 / 6) ** 0.25
    got = lm.corpus_bleu(["the cat sat on the mat", "the cat sat on a mat"],
                         ["the cat sat on the mat", "the cat sat on the mat"])
    assert got == pytest.approx(expected)


# ---------------------------------------------------------------- answer regex


def test_answer_regex_gsm8k():
    ref = "The sandwiches cost 3 * $7 = $21.\nThe change is $50 - $21 = $29.\n#### 29"
    assert score_example("50 - 21 = 29\n#### 29", ref, answer_regex=GSM)["answer_exact_match"] == 1.0
    assert score_example("#### 29.0", ref, answer_regex=GSM)["answer_exact_match"] == 1.0
    assert score_example("#### 30", ref, answer_regex=GSM)["answer_exact_match"] == 0.0
    assert score_example("The answer is 29.", ref, answer_regex=GSM)["answer_exact_match"] == 0.0
    # the first match counts (a model that runs on into a second problem)
    assert score_example("#### 29\n#### 31", ref, answer_regex=GSM)["answer_exact_match"] == 1.0
    # no regex, or a reference without a match: not applicable
    assert score_example("#### 29", ref)["answer_exact_match"] is None
    assert score_example("#### 29", "twenty-nine", answer_regex=GSM)["answer_exact_match"] is None


def test_number_normalisation():
    assert score_example("#### 1,234", "#### 1234", answer_regex=GSM)["answer_exact_match"] == 1.0
    assert score_example("#### 1,234.50", "#### 1234.5", answer_regex=GSM)["answer_exact_match"] == 1.0
    assert score_example("#### -7", "#### -7.", answer_regex=GSM)["answer_exact_match"] == 1.0
    assert lm.normalize_number("$29.") == lm.normalize_number("29")
    assert lm.normalize_number("Paris") == "paris"


def test_extract_answer_group_and_whole_match():
    assert lm.extract_answer("x #### 42 y", GSM) == "42"
    assert lm.extract_answer("abc 17 def 9", r"\d+") == "17"  # no group: the whole match
    assert lm.extract_answer("none here", GSM) is None
    with pytest.raises(ValueError, match="not a valid regular expression"):
        lm.compile_answer_regex("(unclosed")


# ---------------------------------------------------------------- JSON field accuracy


REF_JSON = '{"name": "Julia Park", "company": "Northwind Energy", "date": "2023-06-27"}'


def test_json_field_accuracy():
    two_of_three = '{"name": "Julia Park", "company": "Northwind", "date": "2023-06-27"}'
    s = score_example(two_of_three, REF_JSON)
    assert s["json_field_accuracy"] == pytest.approx(2 / 3)
    assert s["json_valid"] == 1.0
    assert score_example(REF_JSON, REF_JSON)["json_field_accuracy"] == 1.0
    # key order and extra keys do not matter; whitespace around string values does not either
    s = score_example('{"date": "2023-06-27", "company": " Northwind Energy ", "name": "Julia '
                      'Park", "extra": 1}', REF_JSON)
    assert s["json_field_accuracy"] == 1.0
    # not JSON: 0, and json_valid 0
    s = score_example("Julia Park, Northwind Energy, 2023-06-27", REF_JSON)
    assert s["json_field_accuracy"] == 0.0 and s["json_valid"] == 0.0
    # a JSON array is not an object
    assert score_example('["Julia Park"]', REF_JSON)["json_field_accuracy"] == 0.0
    # code fences and text around one object are tolerated: 1 of 3 keys right
    fenced = '```json\n{"name": "Julia Park"}\n```'
    assert score_example(fenced, REF_JSON)["json_field_accuracy"] == pytest.approx(1 / 3)
    assert score_example('Here: {"name": "Julia Park"} done', REF_JSON)["json_field_accuracy"] == \
        pytest.approx(1 / 3)
    # a reference that is not a JSON object: not applicable
    s = score_example('{"a": 1}', "positive")
    assert s["json_field_accuracy"] is None and s["json_valid"] is None


def test_json_value_types():
    ref = '{"count": 3, "price": 19.5, "active": true, "city": "Lima"}'
    # 3 == 3.0 and 19.5 == 19.5; True is not 1; "lima" != "Lima" (case counts)
    pred = '{"count": 3.0, "price": 19.5, "active": 1, "city": "lima"}'
    assert lm.json_field_accuracy(pred, ref) == pytest.approx(2 / 4)
    assert lm.json_field_accuracy('{"active": true}', ref) == pytest.approx(1 / 4)


def test_score_example_schema_and_range():
    for pred, ref in [("positive", "positive"), ("", "Paris"), ("#### 5", "#### 5"),
                      (REF_JSON, REF_JSON), ("garbage ~~~", REF_JSON)]:
        s = score_example(pred, ref, answer_regex=GSM)
        assert tuple(s) == lm.METRIC_NAMES
        assert all(v is None or 0.0 <= v <= 1.0 for v in s.values())


# ---------------------------------------------------------------- aggregation


def _rows():
    return [
        {"category": "qa", "prediction": "Paris", "reference": "Paris", "new_tokens": 2,
         "ended_with_eos": True, "response_nll": 2.0, "response_tokens": 2,
         **score_example("Paris", "Paris", answer_regex=GSM)},
        {"category": "qa", "prediction": "Rome", "reference": "Paris", "new_tokens": 4,
         "ended_with_eos": False, "response_nll": 4.0, "response_tokens": 2,
         **score_example("Rome", "Paris", answer_regex=GSM)},
        {"category": "math", "prediction": "#### 5", "reference": "2 + 3 = 5\n#### 5",
         "new_tokens": 6, "ended_with_eos": True, "response_nll": 3.0, "response_tokens": 4,
         **score_example("#### 5", "2 + 3 = 5\n#### 5", answer_regex=GSM)},
    ]


def test_aggregate_overall_and_per_category():
    result = aggregate(_rows(), by="category")
    assert list(result) == ["overall", "by_category"]
    assert list(result["by_category"]) == ["math", "qa"]  # sorted
    qa, math_, overall = result["by_category"]["qa"], result["by_category"]["math"], result["overall"]
    assert qa["n"] == 2 and qa["exact_match"] == 0.5
    assert qa["avg_new_tokens"] == 3.0 and qa["eos_rate"] == 0.5
    # qa perplexity: (2.0 + 4.0) nats over 4 tokens -> exp(1.5)
    assert qa["response_loss"] == pytest.approx(1.5) and qa["perplexity"] == pytest.approx(math.exp(1.5))
    assert "answer_exact_match" not in qa  # applies to no qa row
    assert math_["answer_exact_match"] == 1.0 and math_["exact_match"] == 0.0
    assert overall["n"] == 3
    assert overall["exact_match"] == pytest.approx(1 / 3)
    assert overall["avg_new_tokens"] == pytest.approx(4.0)
    assert overall["eos_rate"] == pytest.approx(2 / 3)
    # 9 nats over 8 tokens
    assert overall["perplexity"] == pytest.approx(math.exp(9 / 8))
    assert overall["response_tokens"] == 8
    # answer_exact_match applies to 1 of the 3 rows: the mean is over that row only
    assert overall["answer_exact_match"] == 1.0 and overall["scored"] == {"answer_exact_match": 1}
    assert 0.0 <= overall["corpus_bleu"] <= 1.0


def test_aggregate_nested_metrics_missing_category_and_no_grouping():
    rows = [{"metrics": score_example("a b", "a b")}, {"metrics": score_example("x", "y")}]
    result = aggregate(rows)
    assert result["by_category"]["uncategorized"]["n"] == 2
    assert result["overall"]["exact_match"] == 0.5
    assert "avg_new_tokens" not in result["overall"] and "corpus_bleu" not in result["overall"]
    assert list(aggregate(rows, by=None)) == ["overall"]
    assert aggregate([])["overall"] == {"n": 0}


def test_deltas():
    tuned = {"overall": {"n": 2, "exact_match": 0.75, "perplexity": 3.0},
             "by_category": {"qa": {"exact_match": 1.0}}}
    base = {"overall": {"n": 2, "exact_match": 0.25, "perplexity": 5.0},
            "by_category": {"qa": {"exact_match": 0.5}}}
    d = lm.deltas(tuned, base)
    assert d["overall"] == {"exact_match": 0.5, "perplexity": -2.0}
    assert d["by_category"] == {"qa": {"exact_match": 0.5}}
