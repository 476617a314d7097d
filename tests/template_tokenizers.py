"""Small local tokenizers of each chat-template shape the toolkit meets, and a tiny LLaMA for each.

Nothing is downloaded: every tokenizer is trained here, with the `tokenizers` library, on a small
built-in corpus (a few hundred short English and multilingual sentences), and wrapped in
`transformers.PreTrainedTokenizerFast`. They copy the parts of the real tokenizers that code
handling chat templates depends on (special tokens and their ids' order, bos/eos/pad/unk, whether
encoding adds a bos, the pre-tokenizer family, the chat template), not the real vocabularies:

    chatml_tokenizer()     SmolLM2 / Qwen: byte-level BPE, <|im_start|> ... <|im_end|>, pad == eos,
                           a default system message when none is given; encoding adds nothing.
    llama3_tokenizer()     Llama 3.1 Instruct: byte-level BPE with Llama 3's split regex, header
                           tokens, <|eot_id|> ends every turn, a dated system block before every
                           prompt, no pad and no unk token; encoding adds <|begin_of_text|>.
    llama2_tokenizer()     Llama-2-chat: SentencePiece-like BPE (Metaspace "▁", byte fallback),
                           <s>/</s>/<unk> at ids 0-2 and byte tokens <0x00>.. after them, no pad
                           token, the system prompt folded into the first [INST]; the template
                           writes <s> and </s> into the text, and encoding adds <s> too (as the
                           real one does: tokenize a rendered chat with add_special_tokens=False).

Each call returns a new tokenizer object (the trained backend is cached per process as JSON, the
wrapper is built fresh, in milliseconds), so a test may add tokens or set a pad token freely.

`tiny_llama_for(tokenizer, folder)` saves a 2-layer random LlamaForCausalLM sized to the tokenizer,
the tokenizer and a generation_config.json into a folder usable as --base-model.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

# ---------------------------------------------------------------------------------------- templates
# SmolLM2-135M-Instruct's template, character for character (the embedded model's
# chat_template.jinja): a default system turn when the first message is not a system message.
CHATML_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + CHATML_DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3.1 Instruct's template without its tool-calling branches: bos, then a system block that is
# always there (knowledge cut-off and "today" dates, then the system message if any), then one
# header + trimmed content + <|eot_id|> per message. `date_string` may be passed to
# apply_chat_template, as with the real one.
LLAMA3_TEMPLATE = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""

# Llama-2-chat's template as meta-llama/Llama-2-7b-chat-hf ships it: roles must alternate, the
# system prompt goes inside the first [INST], and bos_token / eos_token are written as text.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# ----------------------------------------------------------------------------------- special tokens
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 (SmolLM2)
# Llama 3.1's first eleven special tokens in their real order (after the BPE vocabulary), the
# reserved ones included so the gaps between ids are the same.
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                         "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
# Llama 3.1 Instruct's generation_config.json stops on any of these (in this order).
LLAMA3_STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
LLAMA2_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, then <0x00>..<0xFF> at 3..258

# Llama 3's pre-tokenizer regex (tiktoken cl100k-like).
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

BYTE_LEVEL_VOCAB = 1024     # trained vocabulary (256 byte symbols + merges, specials included)
LLAMA2_VOCAB = 1000         # 3 specials + 256 byte tokens + trained pieces

# ------------------------------------------------------------------------------------------- corpus
_NAMES = ["Maria", "James", "Aisha", "Kenji", "Sofia", "Liam", "Priya", "Mateo", "Chloe", "Omar",
          "Inês", "Zoë", "Tomás", "Hannah", "Lucas", "Mei", "Fatima", "Oliver", "Nadia", "Arjun"]
_SURNAMES = ["Lopez", "Nguyen", "Okafor", "Sato", "Rossi", "Müller", "Patel", "Kowalski", "García",
             "Chen", "Silva", "Dubois", "Kim", "O'Brien"]
_CITIES = ["Lisbon", "Toronto", "Nairobi", "Osaka", "Kraków", "São Paulo", "Bogotá", "Zurich",
           "Seoul", "Dublin", "Austin", "Lyon", "Accra", "Milan", "Boston", "Vienna"]
_JOBS = ["teacher", "nurse", "software engineer", "designer", "baker", "pilot", "accountant",
         "data analyst", "architect", "electrician"]
_ITEMS = ["apples", "notebooks", "coffees", "tickets", "books", "pens", "sandwiches", "muffins"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_LABELS = ["positive", "negative", "neutral", "billing", "technical", "account", "shipping"]
_TEMPLATES = [
    "{name} {surname} lives in {city} and works as a {job}.",
    "{name} buys {n} {item} for ${p} each and pays with a ${bill} bill.",
    "The meeting with {name} is on {month} {day}, {year} in {city}.",
    "What is {a} plus {b}? The answer is {c}.",
    "Now double it. That gives {c2}.",
    "Please summarize the report from {city} in one sentence.",
    "Classify the review as positive, negative or neutral. The label is {label}.",
    "The weather in {city} was sunny on {weekday}, and {name} went for a walk.",
    "You are a helpful assistant. Answer the question about {name} {surname}.",
    "{name} said: \"I will travel to {city} next {weekday}.\"",
    "{{\"name\": \"{name} {surname}\", \"city\": \"{city}\", \"age\": {age}}}",
    "Rewrite the date {month} {day}, {year} as {year}-{mm:02d}-{day:02d}.",
    "Say that in one word: {label}.",
    "The invoice total came to USD {a},{b:03d}.{mm:02d}.",
    "{surname_upper}, {name}; the user asked the assistant a short question.",
]
_FIXED = [
    CHATML_DEFAULT_SYSTEM, "Cutting Knowledge Date: December 2023", "Today Date: 26 Jul 2024",
    "system user assistant", "[INST] <<SYS>>", "<</SYS>> [/INST]", "Hello, world!",
    "The quick brown fox jumps over the lazy dog.", "Say that in one word.", "Now double it.",
    "Answer with the label only.", "Reply with just the number.", "Thank you! You're welcome.",
    "#### 42", "0 1 2 3 4 5 6 7 8 9 10 100 1000 2023 2024 2025", "(a) [b] {c} <d> e-f g_h i/j k:l",
]
_MULTILINGUAL = [
    "Le chat dort sur le canapé.", "Où est la gare, s'il vous plaît ?",
    "El tren sale a las ocho de la mañana.", "¿Dónde está la biblioteca?",
    "Der Hund spielt im Garten.", "Grüße aus München!", "O livro está na mesa.",
    "Il caffè è molto caldo.", "Кошка спит на диване.", "Привет, как дела?",
    "猫はソファで寝ています。", "東京は大きな都市です。", "我喜欢喝茶。", "今天天气很好。",
    "Η γάτα κοιμάται.", "مرحبا بالعالم", "नमस्ते दुनिया", "Zażółć gęślą jaźń.",
    "Smörgåsbord och kaffe.", "İstanbul'da hava güzel.",
]


@functools.lru_cache(maxsize=1)
def training_corpus() -> tuple[str, ...]:
    """About 450 short sentences, the same on every call (fixed seed)."""
    rng = random.Random(1234)
    lines = []
    for i in range(400):
        a, b = rng.randint(2, 99), rng.randint(2, 999)
        name, surname = rng.choice(_NAMES), rng.choice(_SURNAMES)
        n, p = rng.randint(2, 9), rng.randint(2, 15)
        slots = dict(name=name, surname=surname, surname_upper=surname.upper(),
                     city=rng.choice(_CITIES), job=rng.choice(_JOBS), item=rng.choice(_ITEMS),
                     n=n, p=p, bill=20 if n * p < 20 else 100, month=rng.choice(_MONTHS),
                     mm=rng.randint(1, 12), day=rng.randint(1, 28), year=rng.randint(2019, 2026),
                     a=a, b=b, c=a + b, c2=2 * (a + b), label=rng.choice(_LABELS),
                     weekday=rng.choice(_DAYS), age=rng.randint(20, 70))
        lines.append(_TEMPLATES[i % len(_TEMPLATES)].format(**slots))
    lines += (_FIXED + _MULTILINGUAL) * 3
    return tuple(lines)


# ---------------------------------------------------------------------------------- trained backends
def _merges(model_json: dict) -> list[tuple[str, str]]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]


def _special(tokens):
    from tokenizers import AddedToken

    return [AddedToken(t, special=True, normalized=False) for t in tokens]


@functools.lru_cache(maxsize=None)
def _byte_level_json(family: str) -> str:
    """A trained byte-level BPE tokenizer, serialized (tokenizer.json text)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if family == "chatml":  # SmolLM2: digits one by one, then GPT-2's byte-level regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        specials_first = list(CHATML_SPECIAL_TOKENS)
    else:  # Llama 3: its split regex, then byte-level without the GPT-2 regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        specials_first = []
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BYTE_LEVEL_VOCAB, special_tokens=specials_first,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_corpus(), trainer)
    # Llama 3's special tokens come after the whole BPE vocabulary, as in the real one.
    tok.add_special_tokens(_special(specials_first or LLAMA3_SPECIAL_TOKENS))
    return tok.to_str()


@functools.lru_cache(maxsize=1)
def _llama2_json() -> str:
    """A SentencePiece-like BPE: <unk> <s> </s>, 256 byte-fallback tokens, then trained pieces;
    "▁" marks a space, the decoder is Llama-2's (replace ▁, byte fallback, fuse, strip one space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = metaspace
    trained.train_from_iterator(training_corpus(), trainers.BpeTrainer(
        vocab_size=LLAMA2_VOCAB - 3 - 256, show_progress=False))
    model_json = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate(LLAMA2_SPECIAL_TOKENS)}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece, _ in sorted(model_json["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(model_json), unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(_special(LLAMA2_SPECIAL_TOKENS))
    return tok.to_str()


def _wrap(tokenizer_json: str, template: str, *, prepend_bos: bool = False, **special):
    """Wrap a fresh backend. prepend_bos: encoding adds bos through the backend's post-processor
    (as the real Llama 2/3 tokenizer.json files do), so the tokenizer behaves the same before
    and after save_pretrained/from_pretrained (`add_bos_token` reads False in both)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer_json)
    if prepend_bos:
        bos = special["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
            special_tokens=[(bos, backend.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                  **special)
    tok.chat_template = template
    return tok


# ------------------------------------------------------------------------------------------ public
def chatml_tokenizer():
    """SmolLM2-shaped: byte-level BPE (~1,000 tokens); <|endoftext|>=0 (unk), <|im_start|>=1 (bos),
    <|im_end|>=2 (eos and pad); encoding adds no special token; ChatML template with SmolLM2's
    default system message and `<|im_start|>assistant\\n` as generation prompt."""
    return _wrap(_byte_level_json("chatml"), CHATML_TEMPLATE, bos_token="<|im_start|>",
                 eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|im_end|>",
                 model_max_length=8192)


def llama3_tokenizer(eos: str = "<|eot_id|>"):
    """Llama-3.1-Instruct-shaped: byte-level BPE (~1,000 tokens) then LLAMA3_SPECIAL_TOKENS;
    bos <|begin_of_text|> (added when encoding), eos `eos` (<|eot_id|>, or <|end_of_text|> as some
    released Llama 3 tokenizers have while the template still ends turns with <|eot_id|>);
    pad_token and unk_token are None."""
    if eos not in ("<|eot_id|>", "<|end_of_text|>"):
        raise ValueError(f"eos must be <|eot_id|> or <|end_of_text|>, not {eos!r}")
    return _wrap(_byte_level_json("llama3"), LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>",
                 eos_token=eos, prepend_bos=True, model_max_length=131072)


def llama2_tokenizer():
    """Llama-2-chat-shaped: SentencePiece-like BPE (1,000 tokens, byte fallback); <unk>=0, <s>=1
    (bos, added when encoding), </s>=2 (eos); pad_token is None; Llama-2-chat's [INST] template."""
    return _wrap(_llama2_json(), LLAMA2_TEMPLATE, bos_token="<s>", eos_token="</s>",
                 unk_token="<unk>", prepend_bos=True, model_max_length=4096)


def llama3_stop_ids(tokenizer) -> list[int]:
    """Ids of <|end_of_text|>, <|eom_id|>, <|eot_id|>: Llama 3.1 Instruct's generation eos list."""
    return [tokenizer.convert_tokens_to_ids(t) for t in LLAMA3_STOP_TOKENS]


def tiny_llama_for(tokenizer, folder, *, eos_token_ids=None, seed: int = 0) -> Path:
    """Save a tiny random LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab =
    len(tokenizer); built like conftest's tiny_llama_dir, seeded without touching the global RNG),
    the tokenizer (with its chat template) and generation_config.json into `folder`; return it.

    eos_token_ids: a list for generation_config.json's and config.json's eos_token_id (Llama 3.1
    Instruct: llama3_stop_ids(tokenizer)); by default the tokenizer's eos id."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    eos = list(eos_token_ids) if eos_token_ids is not None else tokenizer.eos_token_id
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                      pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id)
    model.generation_config = generation
    model.save_pretrained(folder, safe_serialization=True)
    generation.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
