"""tests/template_tokenizers.py: the local ChatML, Llama 3 and Llama 2 tokenizers render their
chat templates exactly as the real ones do, keep special tokens whole, round-trip text, and save
to a folder (with a tiny LLaMA) that transformers' Auto classes load back unchanged."""

from __future__ import annotations

import json

import pytest
from template_tokenizers import (
    CHATML_SPECIAL_TOKENS,
    LLAMA2_SPECIAL_TOKENS,
    LLAMA3_SPECIAL_TOKENS,
    chatml_tokenizer,
    llama2_tokenizer,
    llama3_stop_ids,
    llama3_tokenizer,
    tiny_llama_for,
)

FAMILIES = {
    "chatml": chatml_tokenizer,
    "llama3": llama3_tokenizer,
    "llama3_eos_end_of_text": lambda: llama3_tokenizer(eos="<|end_of_text|>"),
    "llama2": llama2_tokenizer,
}
SPECIALS = {"chatml": CHATML_SPECIAL_TOKENS, "llama3": LLAMA3_SPECIAL_TOKENS,
            "llama3_eos_end_of_text": LLAMA3_SPECIAL_TOKENS, "llama2": LLAMA2_SPECIAL_TOKENS}

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Now double it."},
    {"role": "assistant", "content": "10"},
    {"role": "user", "content": "Say that in one word."},
    {"role": "assistant", "content": "Ten"},
]

LLAMA3_RENDERED = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "You are a terse assistant.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nNow double it.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n10<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nSay that in one word.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nTen<|eot_id|>"
)
EXPECTED = {
    "chatml": (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n"
        "<|im_start|>user\nNow double it.<|im_end|>\n"
        "<|im_start|>assistant\n10<|im_end|>\n"
        "<|im_start|>user\nSay that in one word.<|im_end|>\n"
        "<|im_start|>assistant\nTen<|im_end|>\n"
    ),
    "llama3": LLAMA3_RENDERED,
    "llama3_eos_end_of_text": LLAMA3_RENDERED,  # the template ends turns with <|eot_id|> anyway
    "llama2": (
        "<s>[INST] <<SYS>>\nYou are a terse assistant.\n<</SYS>>\n\nWhat is 2 + 3? [/INST] 5 </s>"
        "<s>[INST] Now double it. [/INST] 10 </s>"
        "<s>[INST] Say that in one word. [/INST] Ten </s>"
    ),
}
# One user turn, no system message, add_generation_prompt=True.
EXPECTED_PROMPT = {
    "chatml": ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
               "Hugging Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
               "<|im_start|>assistant\n"),
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
               "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "llama2": "<s>[INST] Hi there [/INST]",
}
EXPECTED_PROMPT["llama3_eos_end_of_text"] = EXPECTED_PROMPT["llama3"]

TEXTS = [
    "Hello, world!",
    "Maria Lopez lives in Lisbon and works as a nurse.",
    "What is 17 + 25? Now double it: 84.",
    '{"name": "Zoë Müller", "age": 34, "city": "São Paulo"}',
    "Le chat dort sur le canapé. ¿Dónde está la biblioteca? 猫はソファで寝ています。",
    "Two  spaces, a tab\there,\nand two lines.",
    "Unseen characters: 🦙 ǂ ∮ ☃",
]


def render(tok, messages, **kwargs):
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def test_vocabulary_is_small_and_ordinary_words_are_few_tokens(family):
    tok = FAMILIES[family]()
    assert 300 <= len(tok) <= 2100
    sentence = "Maria lives in Lisbon and works as a teacher. Please summarize the report."
    ids = tok.encode(sentence, add_special_tokens=False)
    assert len(ids) <= 2 * len(sentence.split()), tok.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(family, text):
    tok = FAMILIES[family]()
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids or tok.unk_token_id is None
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(family):
    tok = FAMILIES[family]()
    ids = []
    for token in SPECIALS[family]:
        (token_id,) = tok.encode(token, add_special_tokens=False)
        assert tok.convert_ids_to_tokens(token_id) == token
        assert tok.added_tokens_decoder[token_id].special
        ids.append(token_id)
    assert len(set(ids)) == len(ids)
    # Inside text too, and skipped on decode.
    text = "Hi" + "".join(SPECIALS[family]) + "there"
    assert set(ids) <= set(tok.encode(text, add_special_tokens=False))
    assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True) == "Hithere"


def test_named_special_tokens():
    chatml, llama3, llama3_end, llama2 = (chatml_tokenizer(), llama3_tokenizer(),
                                          llama3_tokenizer(eos="<|end_of_text|>"), llama2_tokenizer())
    # ChatML like the embedded SmolLM2: pad == eos, <|endoftext|> is unk, ids 0-2.
    assert (chatml.bos_token, chatml.eos_token, chatml.pad_token, chatml.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert [chatml.unk_token_id, chatml.bos_token_id, chatml.eos_token_id] == [0, 1, 2]
    assert chatml.pad_token_id == chatml.eos_token_id
    # Llama 3: no pad, no unk; <|finetune_right_pad_id|> exists but is not the pad token.
    for tok in (llama3, llama3_end):
        assert tok.pad_token is None and tok.pad_token_id is None
        assert tok.unk_token is None and tok.unk_token_id is None
        assert tok.bos_token == "<|begin_of_text|>"
        first = tok.convert_tokens_to_ids("<|begin_of_text|>")
        assert [tok.convert_tokens_to_ids(t) for t in LLAMA3_SPECIAL_TOKENS] == list(
            range(first, first + len(LLAMA3_SPECIAL_TOKENS)))
        assert first + len(LLAMA3_SPECIAL_TOKENS) == len(tok)  # specials after the BPE vocabulary
    assert llama3.eos_token == "<|eot_id|>" and llama3_end.eos_token == "<|end_of_text|>"
    assert llama3.eos_token_id != llama3_end.eos_token_id
    assert llama3_stop_ids(llama3) == [llama3.convert_tokens_to_ids(t)
                                       for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    # Llama 2: <unk> <s> </s> at 0 1 2, byte tokens after them, no pad.
    assert [llama2.unk_token_id, llama2.bos_token_id, llama2.eos_token_id] == [0, 1, 2]
    assert llama2.pad_token is None and llama2.pad_token_id is None
    assert llama2.convert_tokens_to_ids("<0x0A>") == 3 + 0x0A
    with pytest.raises(ValueError, match="eos"):
        llama3_tokenizer(eos="</s>")


def test_encoding_adds_bos_like_the_real_tokenizers():
    """Llama 2 and 3 add their bos when encoding (so a rendered chat, which starts with bos, must be
    encoded with add_special_tokens=False); ChatML adds nothing. No family adds an eos."""
    for make, bos in ((llama3_tokenizer, "<|begin_of_text|>"), (llama2_tokenizer, "<s>")):
        tok = make()
        bos_id = tok.convert_tokens_to_ids(bos)
        assert tok.encode("Hi there")[0] == bos_id
        assert tok.encode("Hi there")[1:] == tok.encode("Hi there", add_special_tokens=False)
        rendered = render(tok, CONVERSATION[:3])
        assert tok.encode(rendered, add_special_tokens=False).count(bos_id) == rendered.count(bos)
        assert tok.encode(rendered)[:2] == [bos_id, bos_id]  # the double-bos trap
    chatml = chatml_tokenizer()
    assert chatml.encode("Hi there") == chatml.encode("Hi there", add_special_tokens=False)


def test_chat_template_renders_exactly(family):
    tok = FAMILIES[family]()
    assert render(tok, CONVERSATION) == EXPECTED[family]


def test_generation_prompt(family):
    tok = FAMILIES[family]()
    user = [{"role": "user", "content": "Hi there"}]
    prompt = render(tok, user, add_generation_prompt=True)
    assert prompt == EXPECTED_PROMPT[family]
    if family == "llama2":  # no generation prompt of its own: a prompt ends with [/INST]
        assert prompt.endswith(" [/INST]") and render(tok, user) == prompt
    else:
        assert render(tok, user) + {"chatml": "<|im_start|>assistant\n"}.get(
            family, "<|start_header_id|>assistant<|end_header_id|>\n\n") == prompt
    # A prompt is the rendered conversation up to the answer.
    full = render(tok, CONVERSATION)
    prefix = render(tok, CONVERSATION[:-1], add_generation_prompt=True)
    assert full.startswith(prefix)
    assert full[len(prefix):] == {"chatml": "Ten<|im_end|>\n", "llama2": " Ten </s>"}.get(
        family, "Ten<|eot_id|>")


def test_template_details():
    llama3, llama2 = llama3_tokenizer(), llama2_tokenizer()
    user = [{"role": "user", "content": "  Hi there \n"}]
    # Llama 3 trims every message and takes the date as a template variable.
    assert render(llama3, user).endswith("user<|end_header_id|>\n\nHi there<|eot_id|>")
    assert "Today Date: 01 Jan 2025\n\n" in render(llama3, user, date_string="01 Jan 2025")
    # Llama 2 strips too, and refuses roles that do not alternate.
    assert render(llama2, user) == "<s>[INST] Hi there [/INST]"
    with pytest.raises(Exception, match="alternate"):
        render(llama2, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_each_call_returns_a_fresh_tokenizer():
    a, b = chatml_tokenizer(), chatml_tokenizer()
    assert a is not b and a.backend_tokenizer is not b.backend_tokenizer
    a.add_special_tokens({"pad_token": "<pad>"})
    a.chat_template = "changed"
    c = chatml_tokenizer()
    assert c.pad_token == "<|im_end|>" and len(c) == len(b) and c.chat_template == b.chat_template


@pytest.mark.parametrize("name", ["chatml", "llama3", "llama3_eos_end_of_text", "llama2"])
def test_saved_folder_reloads_with_auto_classes(tmp_path, name):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = FAMILIES[name]()
    eos_ids = llama3_stop_ids(tok) if name.startswith("llama3") else None
    folder = tiny_llama_for(tok, tmp_path / name, eos_token_ids=eos_ids)
    assert folder == tmp_path / name

    loaded = AutoTokenizer.from_pretrained(folder)
    assert loaded.chat_template == tok.chat_template
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token"):
        assert getattr(loaded, attr) == getattr(tok, attr), attr
    assert len(loaded) == len(tok)
    assert render(loaded, CONVERSATION) == EXPECTED[name]
    for text in TEXTS + [EXPECTED[name]]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)

    want_eos = eos_ids if eos_ids is not None else tok.eos_token_id
    generation = GenerationConfig.from_pretrained(folder)
    assert generation.eos_token_id == want_eos
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == want_eos
    assert generation.pad_token_id == tok.pad_token_id

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == len(tok)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.eos_token_id == want_eos
    assert model.generation_config.eos_token_id == want_eos
    ids = torch.tensor([loaded.encode(EXPECTED[name], add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))


def test_tiny_llama_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    import torch
    from safetensors.torch import load_file

    tok = llama2_tokenizer()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = tiny_llama_for(tok, tmp_path / "a")
    assert torch.equal(torch.rand(1), before)
    b = tiny_llama_for(tok, tmp_path / "b")
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
