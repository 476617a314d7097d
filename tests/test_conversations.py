"""Multi-turn conversations on each chat-template shape: labels cover exactly every assistant
turn's content and the template's own end-of-turn token, --last-turn-only supervises one span,
truncation drops the earliest exchanges, a template whose prefixes render differently is
refused, and generation stops at every stop token of the model.

Tokenizers of each shape (ChatML, Llama 3.1, Llama 2 chat) are built in the test
(template_tokenizers.py); the embedded SmolLM2 tokenizer is the real ChatML one."""

from __future__ import annotations

import json

import pytest
from template_tokenizers import (
    chatml_tokenizer,
    llama2_tokenizer,
    llama3_stop_ids,
    llama3_tokenizer,
    tiny_llama_for,
)

from llama_sft.data.prompts import generation_prompt, stop_token_ids, turn_end_ids
from llama_sft.data.schemas import normalize_record
from llama_sft.data.tokenize import IGNORE_TOKEN_ID, TokenizeStats, tokenize_examples
from llama_sft.errors import DatasetError

SYSTEM = "You answer in short sentences."
TURNS = [("What is two plus three?", "Five."),
         ("Double it, please.", "That makes ten."),
         ("Say it in French.", "Dix.")]


def chat(turns=TURNS, system: str | None = SYSTEM):
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": assistant}]
    return normalize_record({"messages": messages}, {})


SHAPES = {
    # shape: (tokenizer factory, the text of its end-of-turn token)
    "chatml": (chatml_tokenizer, "<|im_end|>"),
    "llama3": (llama3_tokenizer, "<|eot_id|>"),
    "llama3-eos-end-of-text": (lambda: llama3_tokenizer(eos="<|end_of_text|>"), "<|eot_id|>"),
    "llama2": (llama2_tokenizer, "</s>"),
}


def supervised_spans(row) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, label in enumerate(row["labels"] + [IGNORE_TOKEN_ID]):
        if label != IGNORE_TOKEN_ID and start is None:
            start = i
        elif label == IGNORE_TOKEN_ID and start is not None:
            spans.append((start, i))
            start = None
    return spans


def span_texts(tok, row) -> list[str]:
    return [tok.decode(row["input_ids"][s:e]) for s, e in supervised_spans(row)]


def check_labels_are_the_ids(row) -> None:
    for token, label in zip(row["input_ids"], row["labels"]):
        assert label in (IGNORE_TOKEN_ID, token)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_assistant_turn_and_its_turn_end_is_supervised_and_nothing_else(shape):
    factory, turn_end = SHAPES[shape]
    tok = factory()
    row = tokenize_examples([chat()], tok, max_length=1024)[0]
    check_labels_are_the_ids(row)
    texts = span_texts(tok, row)
    assert len(texts) == 3
    for text, (_, answer) in zip(texts, TURNS):
        # Llama 2 writes " {answer} </s>": the space before </s> belongs to the turn's end.
        assert text.strip().removesuffix(turn_end).strip() == answer
        assert text.endswith(turn_end)
    # The supervised end is the template's turn end (for the Llama 3 tokenizer whose eos is
    # <|end_of_text|> too), and the sequence ends with it: nothing after the last turn.
    end_id = tok.convert_tokens_to_ids(turn_end)
    assert [row["input_ids"][e - 1] for _, e in supervised_spans(row)] == [end_id] * 3
    assert row["input_ids"][-1] == end_id and row["length"] == len(row["input_ids"])
    # Everything else (system turn, user turns, headers) is in the prompt part.
    prompt_text = tok.decode(row["input_ids"][:supervised_spans(row)[0][0]])
    assert SYSTEM in prompt_text and TURNS[0][0] in prompt_text
    assert row["prompt_length"] == supervised_spans(row)[-1][0]


@pytest.mark.parametrize("shape", SHAPES)
def test_last_turn_only_supervises_one_span(shape):
    factory, turn_end = SHAPES[shape]
    tok = factory()
    every = tokenize_examples([chat()], tok, max_length=1024)[0]
    last = tokenize_examples([chat()], tok, max_length=1024, label_mode="last")[0]
    assert last["input_ids"] == every["input_ids"]
    assert supervised_spans(last) == supervised_spans(every)[-1:]
    assert span_texts(tok, last)[0].strip().removesuffix(turn_end).strip() == TURNS[-1][1]


@pytest.mark.parametrize("shape", SHAPES)
def test_the_generation_prompt_is_exactly_the_tokens_before_the_last_turn(shape):
    """Training and generation see the same tokens: the last span starts where the prompt that
    generation renders (history + generation prompt) ends."""
    tok = SHAPES[shape][0]()
    row = tokenize_examples([chat()], tok, max_length=1024)[0]
    fmt = "chat"
    prompt_ids = tok(generation_prompt(tok, fmt, chat()), add_special_tokens=False)["input_ids"]
    assert row["input_ids"][:len(prompt_ids)] == prompt_ids
    assert len(prompt_ids) == row["prompt_length"]


@pytest.mark.parametrize("shape", SHAPES)
def test_truncation_drops_the_earliest_exchanges_and_keeps_the_system_turn(shape):
    factory, turn_end = SHAPES[shape]
    tok = factory()
    last_two = tokenize_examples([chat(TURNS[1:])], tok, max_length=1024)[0]
    stats = TokenizeStats()
    row = tokenize_examples([chat()], tok, max_length=last_two["length"], stats=stats)[0]
    assert row["input_ids"] == last_two["input_ids"]
    assert [t.strip().removesuffix(turn_end).strip() for t in span_texts(tok, row)] == \
        [a for _, a in TURNS[1:]]
    assert SYSTEM in tok.decode(row["input_ids"])
    assert TURNS[0][0] not in tok.decode(row["input_ids"])
    assert (stats.conversations_shortened, stats.exchanges_dropped) == (1, 1)
    # One token less: a second exchange goes too.
    stats = TokenizeStats()
    row = tokenize_examples([chat()], tok, max_length=last_two["length"] - 1, stats=stats)[0]
    assert (stats.conversations_shortened, stats.exchanges_dropped) == (1, 2)
    assert len(supervised_spans(row)) == 1


def test_a_conversation_with_no_room_for_its_last_answer_is_dropped_and_counted():
    tok = chatml_tokenizer()
    stats = TokenizeStats()
    long_question = " ".join(["word"] * 400)
    rows = tokenize_examples([chat([("Hi.", "Hello."), (long_question, "Ok.")])], tok,
                             max_length=64, stats=stats)
    assert rows == [] and stats.dropped_no_supervised_tokens == 1
    assert stats.exchanges_dropped == 1


def test_a_template_that_renders_prefixes_differently_is_refused():
    tok = chatml_tokenizer()
    # Marks the conversation's last message: a prefix ends differently from the whole render.
    tok.chat_template = (
        "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content']}}"
        "{% if loop.last %}{{' (last)'}}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
    with pytest.raises(DatasetError, match="cannot give response-only labels"):
        tokenize_examples([chat()], tok, max_length=1024)


def test_a_template_without_a_special_turn_end_is_refused():
    tok = chatml_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{m['role'] + ': ' + m['content'] + '\n'}}"
                         "{% endfor %}{% if add_generation_prompt %}{{'assistant: '}}{% endif %}")
    with pytest.raises(DatasetError, match="no special token"):
        tokenize_examples([chat()], tok, max_length=1024)


def test_instruction_format_conversation_supervises_each_response_and_eos(tokenizer):
    """The documented multi-turn form of the instruction template (no chat template)."""
    row = tokenize_examples([chat()], tokenizer, max_length=1024,
                            prompt_format="instruction")[0]
    eos = tokenizer.eos_token
    assert span_texts(tokenizer, row) == [a + eos for _, a in TURNS]
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith(f"{tokenizer.bos_token}### System:\n{SYSTEM}\n\n### Instruction:\n")
    assert f"Five.{eos}\n\n### Instruction:\nDouble it, please.\n\n### Response:\n" in text


def test_turn_end_and_stop_ids_of_each_shape():
    tok = llama3_tokenizer(eos="<|end_of_text|>")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert turn_end_ids(tok, "chat") == [eot]
    from transformers import GenerationConfig

    config = GenerationConfig(eos_token_id=llama3_stop_ids(tok))
    ids = stop_token_ids(tok, "chat", config)
    assert ids[0] == eot and set(ids) == {eot, *llama3_stop_ids(tok)}
    assert turn_end_ids(chatml_tokenizer(), "chat") == [chatml_tokenizer().eos_token_id]
    assert turn_end_ids(llama2_tokenizer(), "chat") == [llama2_tokenizer().eos_token_id]
    assert turn_end_ids(tok, "instruction") == [tok.eos_token_id]


def test_llama3_pads_with_its_reserved_pad_token(tmp_path):
    from llama_sft.modeling.load import load_tokenizer

    folder = tiny_llama_for(llama3_tokenizer(), tmp_path / "llama3")
    tok = load_tokenizer(str(folder))
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    assert tok.pad_token_id not in (tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>"))


def _always_emits(model, token_id: int) -> None:
    """Make a tiny model's greedy choice `token_id` at every step (a bias on its LM head)."""
    import torch

    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True,
                             dtype=head.weight.dtype)
    with torch.no_grad():
        biased.weight.zero_()
        biased.bias.zero_()
        biased.bias[token_id] = 10.0
    model.lm_head = biased


def test_generation_stops_at_eot_even_when_the_tokenizer_eos_is_end_of_text(tmp_path):
    from llama_sft.evaluation.generate import generate
    from llama_sft.modeling.load import load_model, load_tokenizer

    tok_src = llama3_tokenizer(eos="<|end_of_text|>")
    folder = tiny_llama_for(tok_src, tmp_path / "llama3", eos_token_ids=llama3_stop_ids(tok_src))
    tok = load_tokenizer(str(folder))
    model = load_model(str(folder))
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    _always_emits(model, eot)
    prompt = generation_prompt(tok, "chat", chat())
    stopped = generate(model, tok, [prompt], max_new_tokens=8)[0]
    assert stopped.ended_with_eos and stopped.new_tokens == 1 and stopped.text == ""
    # With the tokenizer's eos alone (what generation passed before), it runs to the limit.
    runaway = generate(model, tok, [prompt], max_new_tokens=8, stop_ids=[tok.eos_token_id])[0]
    assert not runaway.ended_with_eos and runaway.new_tokens == 8


def test_sharegpt_and_messages_give_the_same_rows(tokenizer):
    sharegpt = [{"from": "system", "value": SYSTEM}]
    for user, assistant in TURNS:
        sharegpt += [{"from": "human", "value": user}, {"from": "gpt", "value": assistant}]
    ex = normalize_record({"conversations": sharegpt, "id": "s1"}, {})
    assert ex.messages == chat().messages and ex.id == "s1"
    assert ex.content_hash == chat().content_hash
    a = tokenize_examples([ex], tokenizer, max_length=1024)[0]
    b = tokenize_examples([chat()], tokenizer, max_length=1024)[0]
    assert (a["input_ids"], a["labels"]) == (b["input_ids"], b["labels"])


def test_a_one_exchange_conversation_keeps_the_single_turn_identity(tokenizer):
    """Splits stay where they were: a one-exchange messages record hashes like its
    instruction/context/response reading, and tokenizes like the same instruction/response."""
    one = normalize_record({"messages": [{"role": "user", "content": "Hi?"},
                                         {"role": "assistant", "content": "Hello."}]}, {})
    flat = normalize_record({"instruction": "Hi?", "response": "Hello."}, {})
    assert one.content_hash == flat.content_hash
    a = tokenize_examples([one], tokenizer, max_length=256)[0]
    b = tokenize_examples([flat], tokenizer, max_length=256)[0]
    assert (a["input_ids"], a["labels"]) == (b["input_ids"], b["labels"])
    assert chat().content_hash != chat(TURNS[:2]).content_hash


def test_dataset_report_counts_turns(tmp_path, tokenizer, capsys):
    import llama_dataset

    data = tmp_path / "chats.jsonl"
    rows = [{"messages": chat(TURNS[:n]).conversation(), "id": str(n)} for n in (1, 2, 3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "report.json"
    assert llama_dataset.main(["--dataset", str(data), "--output", str(out), "--report"]) == 0
    report = json.loads(out.read_text())
    assert report["assistant_turns"] == {"1": 1, "2": 1, "3": 1}
    assert "assistant turns per example: 1: 1, 2: 1, 3: 1" in capsys.readouterr().out
