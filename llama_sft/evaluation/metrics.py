"""Per-example metrics for generated answers, and their aggregation overall and per category.

Used by llama_evaluate.py (through llama_sft.evaluation.evaluate) and the pilot. The API is
two functions:

    from llama_sft.evaluation.metrics import score_example, aggregate

    row = score_example("The answer is 29.\\n#### 29", "...\\n#### 29",
                        answer_regex=r"####\\s*(-?[\\d,.]+)")
    # -> {'exact_match': 0.0, 'token_f1': ..., 'rouge_l': ..., 'bleu': ...,
    #     'answer_exact_match': 1.0, 'json_field_accuracy': None, 'json_valid': None}

    rows = [{**row, "category": "math", "new_tokens": 12, "ended_with_eos": True,
             "prediction": pred, "reference": ref}, ...]
    summary = aggregate(rows, by="category")
    # -> {'overall': {'n': 50, 'exact_match': 0.42, ..., 'avg_new_tokens': 23.1,
    #                 'eos_rate': 0.96, 'corpus_bleu': 0.31},
    #     'by_category': {'math': {...}, 'closed_qa': {...}}}

Metrics (every value is in [0, 1]; None means "does not apply to this example"):

- exact_match: SQuAD normalisation on both sides (lowercase, drop punctuation, drop the
  articles a/an/the, collapse whitespace), then string equality.
- token_f1: SQuAD token F1 on the normalised words (bag-of-words overlap).
- rouge_l: ROUGE-L F-measure from `rouge_score` (its default tokenizer: lowercase, runs of
  [a-z0-9]; no stemming, as in HF `evaluate`'s default).
- bleu: sacrebleu sentence BLEU (13a tokenizer, exp smoothing, effective order) / 100.
  `aggregate` adds corpus_bleu (sacrebleu corpus BLEU / 100) when rows carry
  `prediction` and `reference`.
- answer_exact_match (only with an answer regex, and only when the reference matches it): the
  regex's first capture group (or whole match) from the first match in each text, compared
  after number normalisation: commas, a leading '$' and a trailing '.' dropped, then numeric
  equality ("1,234.50" == "1234.5"); non-numbers compare as normalised text. A prediction with
  no match scores 0.
- json_field_accuracy (only when the reference is a JSON object): the share of the reference's
  keys whose value the prediction's JSON object has equal (strings compared after stripping
  surrounding whitespace, numbers by value, booleans only with booleans). 0 when the
  prediction holds no JSON object. Code fences and text around one {...} object are tolerated.
- json_valid (only when the reference is a JSON object): 1 when a JSON object could be read
  from the prediction.

Aggregation takes the mean of each metric over the rows where it applies; a row's optional
`new_tokens`, `ended_with_eos`, `response_nll` (summed token NLL, nats) and `response_tokens`
give avg_new_tokens, eos_rate, response_loss and perplexity (exp of total NLL / total tokens).
"""

from __future__ import annotations

import json
import math
import re
import string
import unicodedata
from collections import Counter, defaultdict
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

METRIC_NAMES = ("exact_match", "token_f1", "rouge_l", "bleu", "answer_exact_match",
                "json_field_accuracy", "json_valid")


# The regex the sample data's math answers use ("#### 29"); GSM8K's convention.
GSM8K_ANSWER_REGEX = r"####\s*(-?[\d,.]+)"


_ARTICLES = re.compile(r"\b(a|an|the)\b")


_ASCII_PUNCT = set(string.punctuation)


def _unit(value: float) -> float:
    """Clamp to [0, 1]: sacrebleu's exp(log(...)) gives 1.0000000000000004 for a perfect match."""
    return min(1.0, max(0.0, float(value)))


def _is_punct(ch: str) -> bool:
    # SQuAD drops string.punctuation; we also drop Unicode punctuation (curly quotes, dashes)
    # so "don’t" and "don't" normalise alike.
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if not _is_punct(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1; when either side has no words, 1 if both are empty else 0."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def sentence_bleu(prediction: str, reference: str) -> float:
    import sacrebleu

    return _unit(sacrebleu.sentence_bleu(prediction, [reference]).score / 100.0)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    if not predictions:
        return 0.0
    return _unit(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100.0)


@lru_cache(maxsize=32)
def compile_answer_regex(pattern: str) -> re.Pattern:
    """Compile --answer-regex; a bad pattern raises ValueError naming it."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"--answer-regex {pattern!r} is not a valid regular expression: {e}") from None


def extract_answer(text: str, answer_regex: str | re.Pattern) -> str | None:
    """The first match's first capture group (the whole match if the regex has no group)."""
    rx = compile_answer_regex(answer_regex) if isinstance(answer_regex, str) else answer_regex
    m = rx.search(text)
    if m is None:
        return None
    value = m.group(1) if rx.groups else m.group(0)
    return value.strip() if value is not None else None


def normalize_number(text: str) -> Decimal | str:
    """'1,234.50' -> Decimal('1234.50'); '$29.' -> Decimal('29'); non-numbers -> normalised text."""
    s = text.strip().replace(",", "")
    if s.startswith("$"):
        s = s[1:]
    s = s.rstrip(".")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return normalize_answer(text)
    return value if value.is_finite() else normalize_answer(text)


def answers_match(prediction_answer: str | None, reference_answer: str) -> bool:
    if prediction_answer is None:
        return False
    return normalize_number(prediction_answer) == normalize_number(reference_answer)


def parse_json_object(text: str) -> dict[str, Any] | None:
    """A JSON object read from `text`: the whole text, or inside ``` fences, or the span from
    the first '{' to the last '}'. None when there is none."""
    s = text.strip()
    fenced = re.match(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", s, flags=re.S)
    if fenced:
        s = fenced.group(1).strip()
    candidates = [s]
    start, end = s.find("{"), s.rfind("}")
    if 0 <= start < end and (start, end) != (0, len(s) - 1):
        candidates.append(s[start:end + 1])
    for c in candidates:
        try:
            value = json.loads(c)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None


def _reference_json(reference: str) -> dict[str, Any] | None:
    """The reference as a JSON object, only when the whole reference is one."""
    s = reference.strip()
    if not (s.startswith("{") and s.endswith("}")):
        return None
    try:
        value = json.loads(s)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def json_values_equal(predicted: Any, expected: Any) -> bool:
    if isinstance(predicted, bool) or isinstance(expected, bool):
        return type(predicted) is type(expected) and predicted == expected
    if isinstance(predicted, (int, float)) and isinstance(expected, (int, float)):
        return predicted == expected
    if isinstance(predicted, str) and isinstance(expected, str):
        return predicted.strip() == expected.strip()
    return type(predicted) is type(expected) and predicted == expected


def json_field_accuracy(prediction: str, reference: str | Mapping[str, Any]) -> float | None:
    """Share of reference keys the prediction's JSON matches; None if the reference is no
    JSON object; 0 if the prediction holds none."""
    ref = reference if isinstance(reference, Mapping) else _reference_json(reference)
    if ref is None:
        return None
    pred = parse_json_object(prediction)
    if pred is None:
        return 0.0
    if not ref:
        return 1.0
    hits = sum(1 for k, v in ref.items() if k in pred and json_values_equal(pred[k], v))
    return hits / len(ref)


# exp(>709) overflows a float; a loss that high means a broken model, not a measurement.
MAX_LOG_PERPLEXITY = 700.0


def perplexity(loss: float) -> float:
    """exp(mean NLL per token), clamped so that a diverged loss still gives a finite number.
    The one definition every stage uses (training logs, the pilot, evaluation)."""
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


def score_example(prediction: str, reference: str,
                  answer_regex: str | re.Pattern | None = None) -> dict[str, float | None]:
    """Every metric for one generation against its reference.

    Returns a dict with exactly the keys of METRIC_NAMES; each value is a float in [0, 1], or
    None where the metric does not apply (answer_exact_match without a regex or when the
    reference has no match; json_* when the reference is not a JSON object)."""
    prediction = prediction or ""
    scores: dict[str, float | None] = {
        "exact_match": exact_match(prediction, reference),
        "token_f1": token_f1(prediction, reference),
        "rouge_l": rouge_l(prediction, reference),
        "bleu": sentence_bleu(prediction, reference),
        "answer_exact_match": None,
        "json_field_accuracy": None,
        "json_valid": None,
    }
    if answer_regex is not None:
        ref_answer = extract_answer(reference, answer_regex)
        if ref_answer is not None:
            pred_answer = extract_answer(prediction, answer_regex)
            scores["answer_exact_match"] = float(answers_match(pred_answer, ref_answer))
    ref_json = _reference_json(reference)
    if ref_json is not None:
        scores["json_field_accuracy"] = json_field_accuracy(prediction, ref_json)
        scores["json_valid"] = float(parse_json_object(prediction) is not None)
    return scores


def _metrics_of(row: Mapping[str, Any]) -> Mapping[str, Any]:
    nested = row.get("metrics")
    return {**row, **nested} if isinstance(nested, Mapping) else row


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate one group of rows (see `aggregate`)."""
    rows = [_metrics_of(r) for r in rows]
    out: dict[str, Any] = {"n": len(rows)}
    counts: dict[str, int] = {}
    for name in METRIC_NAMES:
        values = [float(r[name]) for r in rows if r.get(name) is not None]
        if values:
            out[name] = sum(values) / len(values)
            if len(values) != len(rows):
                counts[name] = len(values)
    if rows and all(isinstance(r.get("prediction"), str) and isinstance(r.get("reference"), str)
                    for r in rows):
        out["corpus_bleu"] = corpus_bleu([r["prediction"] for r in rows],
                                         [r["reference"] for r in rows])
    lengths = [r["new_tokens"] for r in rows if r.get("new_tokens") is not None]
    if lengths:
        out["avg_new_tokens"] = sum(lengths) / len(lengths)
    eos = [bool(r["ended_with_eos"]) for r in rows if r.get("ended_with_eos") is not None]
    if eos:
        out["eos_rate"] = sum(eos) / len(eos)
    nll = [(float(r["response_nll"]), int(r["response_tokens"])) for r in rows
           if r.get("response_nll") is not None and r.get("response_tokens")]
    if nll:
        total_tokens = sum(t for _, t in nll)
        loss = sum(x for x, _ in nll) / total_tokens
        out["response_loss"] = loss
        out["perplexity"] = perplexity(loss)
        out["response_tokens"] = total_tokens
    if counts:
        out["scored"] = counts  # how many rows each partial metric applies to
    return out


def aggregate(rows: Iterable[Mapping[str, Any]], by: str | None = "category") -> dict[str, Any]:
    """Overall and per-group summaries of per-example rows.

    Each row is a mapping holding the keys `score_example` returns (at the top level or under
    "metrics"), plus optionally `by` (default "category"; missing -> "uncategorized"),
    `new_tokens`, `ended_with_eos`, `response_nll`, `response_tokens`, `prediction` and
    `reference`. Returns {"overall": summary, "by_<by>": {group: summary}} where a summary holds
    n, the mean of each metric over the rows it applies to, and (when the rows carry the inputs)
    corpus_bleu, avg_new_tokens, eos_rate, response_loss, perplexity and response_tokens;
    `scored` counts the rows for metrics that apply to only some rows. Groups are sorted by name."""
    rows = list(rows)
    result: dict[str, Any] = {"overall": summarize(rows)}
    if by:
        groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for r in rows:
            groups[str(r.get(by) or "uncategorized")].append(r)
        result[f"by_{by}"] = {g: summarize(groups[g]) for g in sorted(groups)}
    return result


DELTA_KEYS = METRIC_NAMES + ("corpus_bleu", "avg_new_tokens", "eos_rate", "response_loss",
                             "perplexity")


def deltas(tuned: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """tuned - base for every metric both aggregates have, overall and per group."""
    def diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, float]:
        return {k: a[k] - b[k] for k in DELTA_KEYS
                if isinstance(a.get(k), (int, float)) and isinstance(b.get(k), (int, float))}

    out: dict[str, Any] = {}
    for key, value in tuned.items():
        if key == "overall":
            out[key] = diff(value, base.get(key, {}))
        elif key.startswith("by_") and isinstance(value, Mapping):
            other = base.get(key, {})
            out[key] = {g: diff(v, other.get(g, {})) for g, v in value.items()}
    return out
