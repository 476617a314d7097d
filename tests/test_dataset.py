"""llama_dataset: schemas, response-only labels with a supervised EOS, truncation, stable splits,
malformed-input errors (RELIABILITY items 8, 9, 10), a fuzz test and the report."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llama_dataset
import llama_sft.data.loader
from llama_sft.data.loader import (
    MAX_LINE_BYTES,
    LoadStats,
    load_and_validate,
    load_examples,
)
from llama_sft.data.prompts import (
    INSTRUCTION_TEMPLATE,
    INSTRUCTION_TEMPLATE_WITH_CONTEXT,
    render_prompt,
    resolve_prompt_format,
)
from llama_sft.data.report import build_report, format_report
from llama_sft.data.schemas import Example, normalize_record
from llama_sft.data.splits import split_examples
from llama_sft.data.tokenize import IGNORE_TOKEN_ID, TokenizeStats, tokenize_examples
from llama_sft.errors import DatasetError
from llama_sft.training.train import run_train

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = ROOT / "sft_output" / "sft_dataset.jsonl"
SAMPLE_GOLDEN = ROOT / "sft_output" / "golden_set.jsonl"
SECRET = "sk-live-CANARY-4f9a1c7e"  # must never appear in an error message



def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


GOOD = {"instruction": "Name a colour.", "response": "Blue."}


# --------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------


def load_one(tmp_path, row, **kw) -> Example:
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [row]), **kw)
    assert len(examples) == 1
    return examples[0]


def test_native_schema_with_context(tmp_path):
    ex = load_one(tmp_path, {"id": "a-1", "category": "closed_qa", "instruction": "Where?",
                             "context": "In Paris.", "response": "Paris"})
    assert (ex.instruction, ex.context, ex.response) == ("Where?", "In Paris.", "Paris")
    assert (ex.category, ex.id, ex.line) == ("closed_qa", "a-1", 1)


def test_native_schema_without_context(tmp_path):
    ex = load_one(tmp_path, {"instruction": "Say hi.", "response": "Hi."})
    assert (ex.instruction, ex.context, ex.response) == ("Say hi.", "", "Hi.")
    assert ex.category == "uncategorized" and ex.id is None


def test_integer_id_becomes_a_string(tmp_path):
    assert load_one(tmp_path, {**GOOD, "id": 17}).id == "17"


def test_null_optional_fields_mean_absent(tmp_path):
    # Public datasets often write null for an empty input/context; that is not an error.
    ex = load_one(tmp_path, {"instruction": "Say hi", "input": None, "output": "hi"})
    assert (ex.context, ex.response) == ("", "hi")
    ex = load_one(tmp_path, {"instruction": "Say hi", "context": None, "response": "hi",
                             "category": None, "id": None})
    assert (ex.context, ex.category, ex.id) == ("", "uncategorized", None)


def test_alpaca_schema(tmp_path):
    ex = load_one(tmp_path, {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"})
    assert (ex.instruction, ex.context, ex.response) == ("Translate.", "Bonjour", "Hello")
    ex = load_one(tmp_path, {"instruction": "Say hi.", "input": "", "output": "Hi."})
    assert (ex.context, ex.response) == ("", "Hi.")


def test_prompt_completion_schema(tmp_path):
    ex = load_one(tmp_path, {"prompt": "2+2=", "completion": "4"})
    assert (ex.instruction, ex.context, ex.response) == ("2+2=", "", "4")


def test_chat_messages_schema_with_system(tmp_path):
    ex = load_one(tmp_path, {"id": "c1", "category": "chat", "messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome"}]})
    assert (ex.instruction, ex.context, ex.response) == ("Capital of Italy?", "Be terse.", "Rome")
    assert (ex.id, ex.category) == ("c1", "chat")
    ex = load_one(tmp_path, {"messages": [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Hello"}]})
    assert (ex.instruction, ex.context, ex.response) == ("Hi", "", "Hello")


def test_field_map_renames_and_ignores(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "Q1?", "answer": "A1", "notes": "internal", "source": "x"}])
    examples = load_examples(path, field_map="question=instruction, answer=response,notes=,"
                                             "source=category")
    assert [(e.instruction, e.response, e.context, e.category) for e in examples] == [
        ("Q1?", "A1", "", "x")]
    # without 'notes=' the unknown field is an error that says how to ignore it
    with pytest.raises(DatasetError) as e:
        load_examples(path, field_map="question=instruction,answer=response,source=category")
    assert "unknown field(s) ['notes']" in str(e.value)
    assert "--field-map 'notes='" in str(e.value)


@pytest.mark.parametrize("spec, needle", [("question", "is not SOURCE=TARGET"),
                                          ("question=prompt", "target 'prompt' must be one of")])
def test_bad_field_map(tmp_path, spec, needle):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(DatasetError, match=re.escape(needle)):
        load_examples(path, field_map=spec)


def test_gsm8k_shape_through_field_map(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": "Tom has 3 apples and eats 1. How many are left?",
         "answer": "3 - 1 = 2\n#### 2"}])
    (ex,) = load_examples(path, field_map="question=instruction,answer=response")
    assert ex.response.endswith("#### 2")


# --------------------------------------------------------------------------------------
# Labels: response-only, EOS supervised although pad == eos (RELIABILITY item 9)
# --------------------------------------------------------------------------------------


EXAMPLES = [Example("What is 2+2?", "", "Four."),
            Example("Summarize the text.", "The cat sat on the mat all day.", "A cat sat."),
            Example("Classify the sentiment.", "I loved it!", "positive", category="cls")]


@pytest.mark.parametrize("fmt", ["chat", "instruction"])
def test_guarantee_09_labels_mask_the_prompt_and_supervise_response_and_eos(tokenizer, fmt):
    """RELIABILITY item 9, EOS is learned: labels are built explicitly; every target ends with
    EOS and that EOS is supervised although this tokenizer pads with EOS (a masking of labels by
    token id would turn it into -100 and fail here). Padding masked by the attention mask in
    the batch: tests/test_train.py::test_collator_masks_padding_by_attention_not_token_id."""
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos, "precondition: SmolLM2 pads with its EOS token"
    stats = TokenizeStats()
    rows = tokenize_examples(EXAMPLES, tokenizer, max_length=512, prompt_format=fmt, stats=stats)
    assert len(rows) == len(EXAMPLES)
    for ex, row in zip(EXAMPLES, rows):
        ids, labels, n_prompt = row["input_ids"], row["labels"], row["prompt_length"]
        assert len(ids) == len(labels) == row["length"]
        assert labels[:n_prompt] == [IGNORE_TOKEN_ID] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert IGNORE_TOKEN_ID not in labels[n_prompt:]
        assert ids[-1] == eos and labels[-1] == eos  # EOS is learned, pad == eos or not
        # the prompt the model trains on is exactly the one generation will use
        prompt = render_prompt(tokenizer, fmt, ex.instruction, ex.context)
        assert ids[:n_prompt] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids[n_prompt:-1]) == ex.response
        assert row["content_hash"] == ex.content_hash and row["category"] == ex.category
    assert stats.examples_in == stats.examples_out == len(EXAMPLES)
    assert stats.supervised_tokens == sum(sum(l != IGNORE_TOKEN_ID for l in r["labels"])
                                          for r in rows)
    assert stats.total_tokens == sum(r["length"] for r in rows)


def test_chat_prompt_uses_the_template_with_instruction_then_context(tokenizer):
    prompt = render_prompt(tokenizer, "chat", "Summarize.", "Some text.")
    assert "Summarize.\n\nSome text." in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert prompt == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Summarize.\n\nSome text."}], tokenize=False,
        add_generation_prompt=True)


def test_instruction_template_text(tokenizer):
    assert INSTRUCTION_TEMPLATE == "### Instruction:\n{instruction}\n\n### Response:\n"
    assert INSTRUCTION_TEMPLATE_WITH_CONTEXT == (
        "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n")
    bos = tokenizer.bos_token
    assert render_prompt(tokenizer, "instruction", " Add. ", "  1 and 2 ") == (
        bos + "### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:\n")
    assert render_prompt(tokenizer, "instruction", "Say hi.", "  ") == (
        bos + "### Instruction:\nSay hi.\n\n### Response:\n")


def test_auto_format_follows_the_chat_template(tokenizer):
    assert resolve_prompt_format(tokenizer, "auto") == "chat"
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert resolve_prompt_format(plain, "auto") == "instruction"
    with pytest.raises(DatasetError, match="no chat template"):
        resolve_prompt_format(plain, "chat")


# --------------------------------------------------------------------------------------
# Truncation (RELIABILITY item 10)
# --------------------------------------------------------------------------------------


def test_guarantee_10_truncation_cuts_context_first_drops_and_counts_visibly(
        tokenizer, tiny_llama_dir, tmp_path, monkeypatch, caplog):
    """RELIABILITY item 10, truncation is visible and safe: the context is cut before the
    response (which keeps its EOS); an example with no room for a supervised token is dropped
    and counted; the same counts appear in the dataset report and in the training log and
    run_config.json."""
    import llama_sft.training.train
    import llama_train

    long_context = Example("Summarize the passage.", "word " * 600, "A short summary.")
    no_room = Example("word " * 200, "", "response")
    kept = Example("Say hi.", "", "Hi.")
    stats = TokenizeStats()
    rows = tokenize_examples([long_context, no_room, kept], tokenizer, max_length=128,
                             stats=stats)
    assert len(rows) == 2  # no_room is dropped, not trained on with zero supervised tokens
    row = rows[0]
    assert row["length"] <= 128
    n = row["prompt_length"]
    assert tokenizer.decode(row["input_ids"][n:]) == "A short summary." + tokenizer.eos_token
    assert row["labels"][-1] == tokenizer.eos_token_id
    prompt_text = tokenizer.decode(row["input_ids"][:n])
    assert "Summarize the passage." in prompt_text and "word word" in prompt_text
    assert prompt_text.endswith("<|im_start|>assistant\n")  # the template is not cut
    assert (stats.context_truncated, stats.response_truncated,
            stats.dropped_no_supervised_tokens) == (1, 0, 1)
    assert (stats.examples_in, stats.examples_out) == (3, 2)

    # the dataset report shows the same counts
    path = write_jsonl(tmp_path / "d.jsonl", [ex.to_dict() for ex in (long_context, no_room, kept)])
    report = build_report(load_examples(path), tokenizer, path=str(path), max_length=128,
                          prompt_format="auto", val_ratio=0.0, test_ratio=0.0)
    assert (report["would_truncate"], report["would_drop_no_supervised_tokens"]) == (2, 1)
    assert "2 would be truncated, 1 would be dropped" in format_report(report)

    # ... and so do the training log and run_config.json (stopped before any model is loaded)
    class Stop(Exception):
        pass

    seen = {}

    def stop_before_training(cfg, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(llama_sft.training.train, "run_sft", stop_before_training)
    cfg = llama_train.resolve_train_config([
        "--model-size", "135m", "--base-model", str(tiny_llama_dir), "--dataset", str(path),
        "--output-dir", str(tmp_path / "run"), "--max-length", "128", "--val-ratio", "0",
        "--test-ratio", "0"])
    logger = logging.getLogger("llama_sft")
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.INFO, logger="llama_sft"), pytest.raises(Stop):
        run_train(cfg)
    assert "truncated: 1 context, 0 response; dropped (no supervised token): 1" in caplog.text
    tokenization = seen["run_config"].dataset["tokenization"]
    assert (tokenization["context_truncated"], tokenization["dropped_no_supervised_tokens"]) == (1, 1)
    assert len(seen["train_rows"]) == 2


def test_response_is_cut_when_the_instruction_alone_is_long(tokenizer):
    ex = Example("word " * 60, "", "response " * 100)
    stats = TokenizeStats()
    (row,) = tokenize_examples([ex], tokenizer, max_length=128, stats=stats)
    n = row["prompt_length"]
    assert row["length"] == 128 and 0 < n < 128
    assert row["labels"][:n] == [IGNORE_TOKEN_ID] * n
    assert row["labels"][n:] == row["input_ids"][n:]
    assert row["labels"][-1] != tokenizer.eos_token_id  # the cut answer did not end
    assert (stats.context_truncated, stats.response_truncated,
            stats.dropped_no_supervised_tokens) == (0, 1, 0)


@pytest.mark.parametrize("context", ["", "ctx " * 50])
def test_example_is_dropped_and_counted_when_the_prompt_fills_max_length(tokenizer, context):
    kept = Example("Say hi.", "", "Hi.")
    too_long = Example("word " * 200, context, "response")
    stats = TokenizeStats()
    rows = tokenize_examples([kept, too_long, kept], tokenizer, max_length=128, stats=stats)
    assert len(rows) == 2
    assert stats.dropped_no_supervised_tokens == 1
    assert (stats.examples_in, stats.examples_out) == (3, 2)
    assert all(sum(l != IGNORE_TOKEN_ID for l in r["labels"]) > 0 for r in rows)


def test_empty_split_tokenizes_to_nothing(tokenizer):
    # --val-ratio 0 gives an empty val split; the fast tokenizer raises IndexError on [].
    stats = TokenizeStats()
    assert tokenize_examples([], tokenizer, max_length=128, stats=stats) == []
    assert stats.examples_in == stats.examples_out == 0


def test_tokenizer_without_eos_is_refused(tokenizer):
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    with pytest.raises(DatasetError, match="no EOS token"):
        tokenize_examples(EXAMPLES, no_eos, max_length=128)


# --------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------


def make_examples(n: int, start: int = 0) -> list[Example]:
    return [Example(f"Question number {i}?", f"Context {i % 7}", f"Answer {i}.", id=str(i))
            for i in range(start, start + n)]


def split_of(splits) -> dict[str, str]:
    return {ex.content_hash: name for name, rows in splits.items() for ex in rows}


def test_appending_rows_never_moves_an_existing_row():
    first = make_examples(1500)
    before, _ = split_examples(first, val_ratio=0.05, test_ratio=0.05)
    after, _ = split_examples(first + make_examples(500, start=1500), val_ratio=0.05,
                              test_ratio=0.05)
    before_map, after_map = split_of(before), split_of(after)
    assert all(after_map[h] == s for h, s in before_map.items())
    # ... and neither does shuffling the file
    shuffled = first[:]
    random.Random(0).shuffle(shuffled)
    assert split_of(split_examples(shuffled, val_ratio=0.05, test_ratio=0.05)[0]) == before_map


@pytest.mark.parametrize("val_ratio, test_ratio", [(0.05, 0.05), (0.1, 0.2), (0.0, 0.1)])
def test_splits_are_disjoint_cover_everything_and_respect_ratios(val_ratio, test_ratio):
    examples = make_examples(2000)
    dupes = [Example(e.instruction, e.context, e.response, id="dupe") for e in examples[:30]]
    splits, removed = split_examples(examples + dupes, val_ratio=val_ratio, test_ratio=test_ratio)
    assert removed == {"duplicates": 30}
    hashes = {name: {e.content_hash for e in rows} for name, rows in splits.items()}
    assert sum(len(rows) for rows in splits.values()) == 2000
    assert not (hashes["train"] & hashes["val"] or hashes["train"] & hashes["test"]
                or hashes["val"] & hashes["test"])
    assert set().union(*hashes.values()) == {e.content_hash for e in examples}
    assert len(splits["val"]) / 2000 == pytest.approx(val_ratio, abs=0.02)
    assert len(splits["test"]) / 2000 == pytest.approx(test_ratio, abs=0.02)


def test_duplicates_are_content_based_ignoring_id_category_and_outer_whitespace():
    a = Example("Q?", "ctx", "A.", category="x", id="1")
    b = Example(" Q? ", "ctx\n", "A.", category="y", id="2")
    c = Example("Q?", "ctx", "A!", id="3")
    splits, removed = split_examples([a, b, c], val_ratio=0.0, test_ratio=0.0)
    assert removed == {"duplicates": 1}
    assert [e.id for e in splits["train"]] == ["1", "3"]


def test_golden_overlap_is_removed_from_every_split_and_counted():
    examples = make_examples(400)
    golden = [Example(e.instruction, e.context, e.response, id=f"golden-{i}")
              for i, e in enumerate(examples[::40])]  # 10 golden rows also in the dataset
    golden.append(Example("Only in golden?", "", "Yes."))
    splits, removed = split_examples(examples, val_ratio=0.1, test_ratio=0.1, golden=golden)
    assert removed == {"golden_overlap": 10}
    golden_hashes = {g.content_hash for g in golden}
    assert not any(e.content_hash in golden_hashes for rows in splits.values() for e in rows)
    assert sum(len(rows) for rows in splits.values()) == 390


# --------------------------------------------------------------------------------------
# Malformed input (RELIABILITY item 8): file:line, a reason, and no record values
# --------------------------------------------------------------------------------------

S = SECRET
MALFORMED = [
    # id, line content (bytes), reason in the message
    ("truncated-json", b'{"instruction": "' + S.encode() + b'", "response": "x"', "truncated JSON"),
    ("truncated-string", b'{"instruction": "' + S.encode(), "truncated JSON"),
    ("not-json", S.encode() + b" is not json", "invalid JSON"),
    ("array", json.dumps([S, "x"]).encode(), "expected a JSON object, got array"),
    ("number", b"42", "expected a JSON object, got number"),
    ("string", json.dumps(S).encode(), "expected a JSON object, got string"),
    ("null", b"null", "expected a JSON object, got null"),
    ("boolean", b"true", "expected a JSON object, got boolean"),
    ("instruction-not-string", json.dumps({"instruction": [S], "response": "x"}).encode(),
     "field 'instruction' must be a string, got array"),
    ("response-number", json.dumps({"instruction": S, "response": 5}).encode(),
     "field 'response' must be a string, got number"),
    ("context-object", json.dumps({"instruction": "x", "context": {"k": S}, "response": "y"})
     .encode(), "field 'context' must be a string, got object"),
    ("id-float", json.dumps({"instruction": S, "response": "y", "id": 1.5}).encode(),
     "field 'id' must be a string or an integer"),
    ("missing-response", json.dumps({"instruction": S}).encode(), "missing field 'response'"),
    ("missing-instruction", json.dumps({"context": S, "response": "y"}).encode(),
     "missing field 'instruction'"),
    ("unknown-field", json.dumps({"instruction": "x", "response": "y", "api_key": S}).encode(),
     "unknown field(s) ['api_key']"),
    ("empty-response", json.dumps({"instruction": S, "response": "  \n"}).encode(),
     "field 'response' is empty"),
    ("empty-instruction", json.dumps({"instruction": "", "response": S}).encode(),
     "field 'instruction' is empty"),
    ("invalid-utf8", b'{"instruction": "' + S.encode() + b'\xff\xfe", "response": "x"}',
     "not valid UTF-8"),
    ("messages-bad-role", json.dumps({"messages": [{"role": S, "content": "a"},
                                                   {"role": "assistant", "content": "b"}]})
     .encode(), "'messages'[0] has an unknown role"),
    ("messages-no-assistant", json.dumps({"messages": [{"role": "user", "content": S}]})
     .encode(), "'messages' has no assistant turn"),
    ("messages-ends-with-user", json.dumps({"messages": [
        {"role": "user", "content": S}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": "b"}]}).encode(),
     "'messages' must end with an assistant turn ('messages'[2] is a user turn)"),
    ("messages-two-users", json.dumps({"messages": [
        {"role": "user", "content": S}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "c"}]}).encode(),
     "'messages'[1] is a user turn where a user turn must be followed by an assistant turn"),
    ("messages-assistant-first", json.dumps({"messages": [
        {"role": "system", "content": S}, {"role": "assistant", "content": "a"}]}).encode(),
     "'messages'[1] is an assistant turn where the first turn (after an optional system "
     "turn) must be a user turn"),
    ("messages-late-system", json.dumps({"messages": [
        {"role": "user", "content": S}, {"role": "assistant", "content": "a"},
        {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}]}).encode(),
     "'messages'[2] is a system turn"),
    ("messages-empty-turn", json.dumps({"messages": [
        {"role": "user", "content": S}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": " \n"}, {"role": "assistant", "content": "c"}]}).encode(),
     "'messages'[2] (user turn) is empty"),
    ("sharegpt-bad-from", json.dumps({"conversations": [{"from": S, "value": "a"},
                                                        {"from": "gpt", "value": "b"}]})
     .encode(), "'conversations'[0] has an unknown from"),
    ("sharegpt-no-gpt", json.dumps({"conversations": [{"from": "human", "value": S}]})
     .encode(), "'conversations' has no assistant turn"),
    ("sharegpt-not-objects", json.dumps({"conversations": [S]}).encode(),
     "'conversations'[0] must be an object with string 'from' and 'value'"),
    ("messages-not-list", json.dumps({"messages": S}).encode(), "'messages' must be a non-empty"),
    ("messages-extra", json.dumps({"messages": [{"role": "user", "content": "a"},
                                                {"role": "assistant", "content": "b"}],
                                   "response": S}).encode(), "unknown field(s) ['response']"),
    # A number longer than Python's int-to-str limit (4300 digits): json raises a plain
    # ValueError that is not a JSONDecodeError.
    ("huge-integer", b'{"instruction": "' + S.encode() + b'", "response": "x", "id": '
     + b"7" * 5000 + b"}", "invalid JSON"),
    # A lone surrogate escape decodes to a str that cannot be encoded as UTF-8: hashing,
    # tokenizing or writing it would crash later, far from the line.
    ("lone-surrogate", b'{"instruction": "' + S.encode() + b'", "response": "x\\ud800"}',
     "field 'response' is not valid Unicode"),
    ("deeply-nested", b"[" * 100_000, "JSON"),
]


# (id, file content, line named, reason, with --skip-invalid: examples kept, lines skipped):
# the cases that are not "line 2 between two good lines"
MALFORMED_FILES = [
    ("bom", b"\xef\xbb\xbf" + json.dumps({**GOOD, "context": S}).encode() + b"\n", 1,
     "byte-order mark (BOM)", 1, 0),  # --skip-invalid strips the BOM and keeps the line
    ("huge-line", json.dumps(GOOD).encode() + b"\n" + json.dumps(
        {"instruction": S * (MAX_LINE_BYTES // len(S) + 1), "response": "x"}).encode()
     + b"\n", 2, f"line longer than {1 << 20} bytes", 1, 1),
]


@pytest.mark.parametrize("data, lineno, reason, kept, skipped", [
    *[pytest.param(json.dumps(GOOD).encode() + b"\n" + l + b"\n" + json.dumps(GOOD).encode()
                   + b"\n", 2, r, 2, 1, id=i) for i, l, r in MALFORMED],
    *[pytest.param(d, n, r, k, sk, id=i) for i, d, n, r, k, sk in MALFORMED_FILES]])
def test_guarantee_08_malformed_line_names_file_line_and_reason_without_values(
        tmp_path, data, lineno, reason, kept, skipped):
    """RELIABILITY item 8: truncated JSON, a non-object line, wrong types, missing or unknown
    fields, an empty response, a BOM, invalid UTF-8 and a huge line are each rejected with
    file:line and the reason, never the record's content; --skip-invalid would skip them (the
    fuzz tests below hold the loader to this contract on any bytes and any JSON)."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    with pytest.raises(DatasetError) as e:
        load_examples(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{lineno}: ")
    assert reason in msg
    assert SECRET not in msg
    assert len(msg) < 400  # a reason, not a record
    assert "--skip-invalid" in msg or "re-save it" in msg
    stats = LoadStats()
    assert len(load_examples(path, skip_invalid=True, stats=stats)) == kept
    assert stats.skipped_invalid == skipped


def test_bom_is_rejected_on_line_1(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({**GOOD, "context": SECRET}).encode() + b"\n")
    with pytest.raises(DatasetError) as e:
        load_examples(path)
    assert str(e.value).startswith(f"{path}:1: ")
    assert "byte-order mark" in str(e.value) and SECRET not in str(e.value)


def test_huge_line_is_rejected_without_reading_it_whole(tmp_path):
    path = tmp_path / "huge.jsonl"
    huge = json.dumps({"instruction": SECRET * 20, "response": "x"})
    write_jsonl(path, [GOOD, GOOD, huge, GOOD])
    with pytest.raises(DatasetError) as e:
        load_examples(path, max_line_bytes=100)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and "line longer than 100 bytes" in msg
    assert SECRET not in msg
    # the limit is on bytes, not characters, and a line at the limit is accepted
    ok = json.dumps({"instruction": "é" * 10, "response": "x"}, ensure_ascii=False)
    write_jsonl(path, [ok])
    size = len(ok.encode())
    assert len(load_examples(path, max_line_bytes=size)) == 1
    with pytest.raises(DatasetError, match=f"line longer than {size - 1} bytes"):
        load_examples(path, max_line_bytes=size - 1)
    assert MAX_LINE_BYTES == 1 << 20


def test_missing_file_folder_and_empty_file(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="is a folder"):
        load_examples(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert load_examples(empty) == []
    with pytest.raises(DatasetError, match="no valid examples"):
        load_and_validate(str(empty))
    empty.write_bytes(b"\n  \n\t\n")
    with pytest.raises(DatasetError, match="no valid examples"):
        load_and_validate(str(empty))


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\r\n")
    assert [e.line for e in load_examples(path)] == [2, 4]


def test_skip_invalid_skips_and_counts_per_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({**GOOD, "id": "ok-1"}).encode(),
             b'{"instruction": "' + SECRET.encode(),
             b"[1, 2]",
             json.dumps({"instruction": "x", "response": ""}).encode(),
             json.dumps({**GOOD, "id": "ok-2"}).encode(),
             b'{"instruction": "\xff"}',
             json.dumps({"instruction": "x" * 300, "response": SECRET}).encode(),
             b'{"response": "',
             json.dumps({**GOOD, "api_key": SECRET}).encode(),
             json.dumps({**GOOD, "id": "ok-3"}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    stats = LoadStats()
    examples = load_examples(path, skip_invalid=True, max_line_bytes=200, stats=stats)
    assert [(e.id, e.line) for e in examples] == [("ok-1", 1), ("ok-2", 5), ("ok-3", 10)]
    assert stats.rows == 3 and stats.skipped_invalid == 7
    reasons = dict(stats.skipped_reasons)
    assert reasons.pop("truncated JSON") == 2
    assert reasons.pop("expected a JSON object, got array") == 1
    assert reasons.pop("field 'response' is empty") == 1
    assert reasons.pop("not valid UTF-8") == 1
    assert reasons.pop("line longer than 200 bytes") == 1
    (unknown,) = reasons  # the last reason names the field, never its value
    assert reasons[unknown] == 1 and "api_key" in unknown
    assert SECRET not in json.dumps(dict(stats.skipped_reasons))


def test_skip_invalid_with_nothing_valid_still_fails(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["[1]", "{"])
    with pytest.raises(DatasetError, match="no valid examples"):
        load_and_validate(str(path), skip_invalid=True)


def test_skip_invalid_strips_a_bom(tmp_path):
    # With --skip-invalid a BOM is dropped and the line itself is kept (it is valid JSON).
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    stats = LoadStats()
    assert len(load_examples(path, skip_invalid=True, stats=stats)) == 1


# --------------------------------------------------------------------------------------
# Fuzz: any bytes, any JSON -> valid Examples or a DatasetError naming file:line
# --------------------------------------------------------------------------------------

texts = st.text(max_size=20) | st.builds(str.__add__, st.text(max_size=5),
                                         st.sampled_from(["\ud800", "\udfff", "\ufeff"]))
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | texts
                | st.sampled_from(["", " ", SECRET]))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)
SCHEMA_KEYS = ["instruction", "context", "response", "category", "id", "input", "output",
               "prompt", "completion", "messages", "role", "content"]
records = st.dictionaries(st.sampled_from(SCHEMA_KEYS),
                          json_values | st.text(min_size=1, max_size=30), max_size=5)
nearly_valid = st.fixed_dictionaries(  # mostly right, so the checks after parsing run too
    {"instruction": texts, "response": texts},
    optional={"context": texts | json_values, "category": texts, "id": st.integers() | texts,
              "extra": json_values})
messages = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": json_values}),
    max_size=4)})


def encode_line(value, ensure_ascii: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


# objects with arbitrary keys (any text, or the schema's own names) and values of any type
any_objects = st.dictionaries(st.text(max_size=12) | st.sampled_from(SCHEMA_KEYS), json_values,
                              max_size=6)

fuzz_lines = st.one_of(
    st.builds(encode_line, json_values | any_objects | records | nearly_valid | messages,
              st.booleans()),
    st.binary(max_size=80),
    # valid JSON cut short
    st.builds(lambda b, k: b[: max(0, len(b) - k)],
              st.builds(encode_line, records, st.just(True)), st.integers(1, 10)),
)

FUZZ_MAX_LINE = 200
HANG_SECONDS = 10  # loading a few short lines takes milliseconds; this long is a hang


class Hang(AssertionError):
    pass


def _hang(signum, frame):
    raise Hang(f"the loader did not return within {HANG_SECONDS} s")


def counted_lines(data: bytes, max_line_bytes: int = FUZZ_MAX_LINE) -> int:
    """Lines the loader must either return or count as skipped: every line but blank ones
    (a BOM on line 1 is stripped first; an over-long line counts even when blank)."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the text after the last newline, when there is none
    n = 0
    for i, line in enumerate(lines, 1):
        if len(line) > max_line_bytes:
            n += 1
            continue
        if i == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        n += bool(line.strip())
    return n


def check_loader_contract(path: Path, n_lines: int, skip_invalid: bool = False) -> None:
    """Valid Examples, or DatasetError naming `file:line` (and no record value); never another
    exception, never a hang. With --skip-invalid nothing is raised and every non-blank line is
    either an example or counted as skipped."""
    stats = LoadStats()
    signal.signal(signal.SIGALRM, _hang)
    signal.alarm(HANG_SECONDS)
    try:
        examples = load_examples(path, max_line_bytes=FUZZ_MAX_LINE, skip_invalid=skip_invalid,
                                 stats=stats)
    except DatasetError as e:
        assert not skip_invalid, f"--skip-invalid raised: {e}"
        m = re.match(rf"{re.escape(str(path))}:(\d+): \S", str(e))
        assert m, str(e)
        assert 1 <= int(m.group(1)) <= n_lines
        assert SECRET not in str(e)
        return
    finally:
        signal.alarm(0)
    if skip_invalid:
        assert stats.rows + stats.skipped_invalid == counted_lines(path.read_bytes())
        assert SECRET not in json.dumps(dict(stats.skipped_reasons))
    for ex in examples:
        assert isinstance(ex, Example)
        for text in (ex.instruction, ex.context, ex.response, ex.category):
            assert isinstance(text, str)
        assert ex.instruction.strip() and ex.response.strip()
        assert ex.id is None or isinstance(ex.id, str)
        assert 1 <= ex.line <= n_lines
        ex.content_hash  # noqa: B018 - must not raise (later stages hash every example)
        json.dumps(ex.to_dict(), ensure_ascii=False).encode("utf-8")


@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(fuzz_lines, min_size=1, max_size=6), skip=st.booleans())
def test_fuzz_loader_never_raises_anything_but_dataset_error(tmp_path_factory, lines, skip):
    path = tmp_path_factory.getbasetemp() / "fuzz.jsonl"
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(data)
    check_loader_contract(path, data.count(b"\n") + 1, skip_invalid=skip)


@settings(max_examples=200, deadline=1000)
@given(data=st.binary(max_size=400) | st.binary(min_size=150, max_size=600), skip=st.booleans())
def test_fuzz_loader_on_raw_bytes(tmp_path_factory, data, skip):
    path = tmp_path_factory.getbasetemp() / "fuzz_raw.jsonl"
    path.write_bytes(data)
    check_loader_contract(path, data.count(b"\n") + 1, skip_invalid=skip)


def test_fuzz_contract_catches_a_raw_exception_and_a_hang(tmp_path, monkeypatch):
    """The contract is not vacuous: a loader that leaks a raw exception, raises without
    file:line, skips without counting, or hangs, fails it."""
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"instruction": "a", "response": "b"}\n[1]\n')
    check_loader_contract(path, 3)
    check_loader_contract(path, 3, skip_invalid=True)
    real = normalize_record
    monkeypatch.setattr(llama_sft.data.loader, "normalize_record",
                        lambda obj, fmap: obj["instruction"] and real(obj, fmap))
    with pytest.raises(TypeError):  # [1]["instruction"]: a raw exception, not DatasetError
        check_loader_contract(path, 3)
    monkeypatch.setattr(llama_sft.data.loader, "normalize_record", real)
    this = sys.modules[__name__]

    def fake(error=None, sleep=0.0):
        def load(*args, stats=None, **kwargs):
            time.sleep(sleep)
            if error is not None:
                raise error
            return []
        return load

    monkeypatch.setattr(this, "load_examples", fake(error=DatasetError("bad line")))
    with pytest.raises(AssertionError):  # no file:line
        check_loader_contract(path, 3)
    monkeypatch.setattr(this, "load_examples", fake())
    with pytest.raises(AssertionError):  # --skip-invalid: nothing returned, nothing counted
        check_loader_contract(path, 3, skip_invalid=True)
    monkeypatch.setattr(this, "HANG_SECONDS", 1)
    monkeypatch.setattr(this, "load_examples", fake(sleep=30))
    with pytest.raises(Hang):
        check_loader_contract(path, 3)


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------

REPORT_KEYS = {"dataset", "file_sha256", "dataset_hash", "examples", "skipped_invalid",
               "skipped_reasons", "categories", "prompt_format", "tokenizer", "max_length",
               "prompt_tokens", "response_tokens", "total_tokens", "would_truncate",
               "would_drop_no_supervised_tokens", "duplicate_examples", "golden_overlap",
               "splits", "split_ratios", "would_shorten_conversations", "would_drop_exchanges",
               "assistant_turns", "label_mode"}


def check_report_consistency(report: dict, path: Path) -> None:
    assert set(report) == REPORT_KEYS
    assert report["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sum(report["categories"].values()) == report["examples"]
    assert sum(report["splits"].values()) == (report["examples"] - report["duplicate_examples"]
                                              - report["golden_overlap"])
    for key in ("prompt_tokens", "response_tokens", "total_tokens"):
        p = report[key]
        assert set(p) == {"p50", "p90", "p95", "p99", "max", "mean"}
        assert 0 < p["p50"] <= p["p90"] <= p["p95"] <= p["p99"] <= p["max"]
        assert p["mean"] <= p["max"]
    assert report["response_tokens"]["p50"] >= 2  # at least one token plus EOS
    assert report["total_tokens"]["max"] <= (report["prompt_tokens"]["max"]
                                             + report["response_tokens"]["max"])
    assert report["would_drop_no_supervised_tokens"] <= report["would_truncate"]


def make_sample_file(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for sft_output/ when the shipped sample data is missing."""
    rows = [{"id": f"r-{i}", "category": ["qa", "math", "cls"][i % 3],
             "instruction": f"Question {i}: what is {i} + {i}?", "context": f"Numbers {i}",
             "response": f"{2 * i}"} for i in range(300)]
    golden = [{"id": f"g-{i}", "category": "qa", "instruction": f"Golden {i}?", "context": "",
               "response": "yes"} for i in range(20)]
    return write_jsonl(tmp_path / "sft.jsonl", rows), write_jsonl(tmp_path / "golden.jsonl",
                                                                  golden)


@pytest.fixture
def sample_files(tmp_path) -> tuple[Path, Path]:
    if SAMPLE_DATA.is_file() and SAMPLE_GOLDEN.is_file():
        return SAMPLE_DATA, SAMPLE_GOLDEN
    return make_sample_file(tmp_path)


def test_report_cli_on_the_sample_data(sample_files, tmp_path, capsys):
    data, golden = sample_files
    out_file = tmp_path / "reports" / "report.json"
    assert llama_dataset.main(["--dataset", str(data), "--golden-set", str(golden),
                               "--model-size", "135m", "--max-length", "512", "--report",
                               "--output", str(out_file)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out_file.read_text())
    check_report_consistency(report, data)
    n_lines = sum(1 for line in data.read_bytes().splitlines() if line.strip())
    assert report["examples"] == n_lines and report["skipped_invalid"] == 0
    assert report["prompt_format"] == "chat" and report["max_length"] == 512
    assert report["split_ratios"] == {"val": 0.05, "test": 0.05}
    assert f"examples: {report['examples']}" in printed
    assert "splits: train {train}, val {val}, test {test}".format(**report["splits"]) in printed
    assert f"report written to {out_file}" in printed


def test_report_counts_truncation_duplicates_and_golden_overlap(tokenizer, tmp_path):
    rows = [{"instruction": f"Q{i}?", "context": "", "response": f"A{i}."} for i in range(200)]
    rows += rows[:5]                                          # 5 duplicates
    rows += [{"instruction": "Long?", "context": "word " * 300, "response": "Short."}]
    rows += [{"instruction": "word " * 300, "response": "Short."}]
    golden_rows = [rows[10], rows[11], {"instruction": "G?", "response": "g"}]
    rows += [rows[10]]                                        # a golden row, twice
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples = load_examples(path)
    golden = load_examples(write_jsonl(tmp_path / "g.jsonl", golden_rows))
    report = build_report(examples, tokenizer, path=str(path), max_length=128,
                          prompt_format="auto", val_ratio=0.1, test_ratio=0.1, golden=golden)
    check_report_consistency(report, path)
    assert report["examples"] == len(rows) == 208
    assert report["golden_overlap"] == 3
    assert report["would_truncate"] == 2
    assert report["would_drop_no_supervised_tokens"] == 1
    assert report["categories"] == {"uncategorized": 208}


def test_report_cli_missing_file_exits_2(tmp_path):
    missing = tmp_path / "no_such.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "llama_dataset.py"), "--dataset",
                           str(missing), "--report"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert any(line.startswith("error:") for line in proc.stderr.splitlines()), proc.stderr
    assert f"{missing}: file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_report_cli_malformed_file_exits_2_naming_the_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "[1]"])
    assert llama_dataset.main(["--dataset", str(path), "--report"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and f"{path}:2:" in err
