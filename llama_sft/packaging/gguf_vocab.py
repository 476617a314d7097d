"""The tokenizer half of a GGUF export: a transformers tokenizer (what the adapter was trained
with) described with llama.cpp's `tokenizer.*` keys, so that llama.cpp tokenizes text to the same
ids and stops where the chat template ends a turn.

    python3 llama_package.py --adapter-path ./training_output/final_model --gguf q8_0

Two tokenizer kinds, read from the fast tokenizer's own description (tokenizer.json), never from
the model's name:

    byte-level BPE (SmolLM2, Llama 3)   tokenizer.ggml.model "gpt2", the merges, and the
                                        pre-tokenizer name llama.cpp knows for the split rule
    SentencePiece-style BPE (Llama 2)   tokenizer.ggml.model "llama": "▁" pieces, byte tokens
                                        <0x00>.., a score per piece (from the merge order)

gguf.py calls `vocab_for(tokenizer, n_vocab, ...)` and `write_vocab(writer, vocab)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llama_sft.errors import PackageError

# llama.cpp's names for the byte-level split rules it implements (llama-vocab.cpp), keyed by
# the pre-tokenizer steps of tokenizer.json that make the same split.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Token types (gguf.TokenType's values, spelled out so this module imports without gguf).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GgufVocab:
    """What `write_vocab` writes: one entry per embedding row."""

    model: str                      # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None                 # llama.cpp's pre-tokenizer name (byte-level only)
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None      # SentencePiece only
    merges: list[str]               # byte-level only, "a b"
    special_ids: dict[str, int]     # bos, eos, unk, pad, eot
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None   # SentencePiece only
    chat_template: Any = None
    padded_rows: int = 0            # embedding rows past the tokenizer, written as [PAD<i>]
    notes: list[str] = field(default_factory=list)


def _steps(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for child in node.get("pretokenizers") or node.get("normalizers") or []
                for s in _steps(child)]
    return [node]


def _regex(step: dict[str, Any]) -> str | None:
    pattern = step.get("pattern") or {}
    return pattern.get("Regex") if isinstance(pattern, dict) else None


def byte_level_pre(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's name for this byte-level split, or a PackageError: an unknown split would make
    llama.cpp cut words differently and silently feed the model other ids."""
    steps = _steps(pre_tokenizer)
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)):
        return "smollm"  # SmolLM2: digits one by one, then GPT-2's split
    if (kinds == ["Split", "ByteLevel"] and _regex(steps[0]) == LLAMA3_SPLIT
            and not steps[1].get("use_regex", True)):
        return "llama-bpe"  # Llama 3
    raise PackageError(f"--gguf: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) "
                       "is not one llama.cpp has a name for here (GPT-2, SmolLM2 or Llama 3 "
                       "splits); the GGUF would tokenize differently, so none was written")


def _spm_prefix(tok_json: dict[str, Any]) -> bool | None:
    """Whether this is a SentencePiece-style vocabulary, and if so whether text gets a "▁"
    prefix; None when it is not SentencePiece-style."""
    steps = _steps(tok_json.get("pre_tokenizer")) + _steps(tok_json.get("normalizer"))
    for step in steps:
        if step.get("type") == "Metaspace":
            # llama.cpp prefixes the text and every stretch after a special token ("always",
            # the Prepend normalizer of Llama 2's own tokenizer.json); "first" (transformers'
            # LlamaTokenizer with legacy=False) prefixes only text at offset 0, so never text
            # that starts with <s>, as every prompt this toolkit trains on does.
            return step.get("prepend_scheme", "always") == "always" and step.get(
                "add_prefix_space", True) is not False
    kinds = {s.get("type") for s in steps}
    replaces = any(s.get("type") == "Replace" and s.get("content") == "▁" for s in steps)
    if replaces:
        return "Prepend" in kinds
    return None


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))
            for m in model.get("merges") or []]


def _token_table(tokenizer, tok_json: dict[str, Any], n_vocab: int):
    """(tokens, types) by id for every embedding row, and the number of padding rows."""
    model = tok_json["model"]
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok_json.get("added_tokens") or []}
    for i, a in added.items():
        by_id[i] = a["content"]
    if max(by_id) >= n_vocab:
        raise PackageError(f"--gguf: the tokenizer has ids up to {max(by_id)} but the model's "
                           f"embedding has {n_vocab} rows; nothing was written")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    return tokens, types, n_vocab - len(by_id)


def _spm_scores(tokens: list[str], types: list[int], merges: list[tuple[str, str]]) -> list[float]:
    """A score per piece from the merge order: llama.cpp's SentencePiece tokenizer merges the
    neighbouring pair whose joined piece scores highest, so -rank replays BPE's merge order.
    Control, byte and unused pieces score 0 as in SentencePiece; other pieces no merge makes
    (single characters) score below every merge."""
    rank: dict[str, int] = {}
    for i, (a, b) in enumerate(merges):
        rank.setdefault(a + b, i)
    floor = -float(len(merges) + 1)
    return [-float(rank[t]) if t in rank else (0.0 if ty != NORMAL else floor)
            for t, ty in zip(tokens, types)]


def _spm_types(tokens: list[str], types: list[int], unk_id: int | None) -> list[int]:
    """SentencePiece marks its unknown piece and its byte pieces (<0x0A>) with their own types;
    llama.cpp falls back to the byte pieces for characters outside the vocabulary."""
    is_byte = [len(t) == 6 and t.startswith("<0x") and t.endswith(">") for t in tokens]
    out = [BYTE if b and ty == NORMAL else ty for b, ty in zip(is_byte, types)]
    if unk_id is not None:
        out[unk_id] = UNKNOWN
    return out


def _add_flags(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, as this tokenizer actually does it."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    add_bos = len(full) > len(plain) and full[0] == tokenizer.bos_token_id
    add_eos = len(full) > len(plain) and full[-1] == tokenizer.eos_token_id
    return bool(add_bos), bool(add_eos)


def _special_ids(tokenizer, eot_id: int | None) -> dict[str, int]:
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
           "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id, "eot": eot_id}
    return {k: v for k, v in ids.items() if isinstance(v, int)}


def vocab_for(tokenizer, n_vocab: int, *, eot_id: int | None) -> GgufVocab:
    """The GGUF description of `tokenizer` for a model with `n_vocab` embedding rows. `eot_id`
    is the chat template's end-of-turn token (tokenizer.ggml.eot_token_id), so llama.cpp ends a
    reply there even when it differs from EOS (Llama 3's <|eot_id|>)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PackageError("--gguf needs a fast tokenizer (tokenizer.json); this one is "
                           f"{type(tokenizer).__name__}")
    tok_json = json.loads(backend.to_str())
    if tok_json["model"].get("type") != "BPE":
        raise PackageError(f"--gguf: a {tok_json['model'].get('type')} tokenizer is not "
                           "supported (BPE only: byte-level or SentencePiece-style)")
    tokens, types, padded = _token_table(tokenizer, tok_json, n_vocab)
    merges = _merge_pairs(tok_json["model"])
    prefix = _spm_prefix(tok_json)
    add_bos, add_eos = _add_flags(tokenizer)
    common = dict(tokens=tokens, special_ids=_special_ids(tokenizer, eot_id), add_bos=add_bos,
                  add_eos=add_eos, chat_template=getattr(tokenizer, "chat_template", None),
                  padded_rows=padded)
    if prefix is not None and tok_json["model"].get("byte_fallback"):
        types = _spm_types(tokens, types, tokenizer.unk_token_id)
        return GgufVocab(model="llama", pre=None, token_types=types,
                         scores=_spm_scores(tokens, types, merges), merges=[],
                         add_space_prefix=prefix, **common)
    if tok_json.get("normalizer"):
        raise PackageError("--gguf: a byte-level tokenizer with a normalizer "
                           f"({tok_json['normalizer'].get('type')}) is not supported")
    pre = byte_level_pre(tok_json.get("pre_tokenizer"))
    return GgufVocab(model="gpt2", pre=pre, token_types=types, scores=None,
                     merges=[f"{a} {b}" for a, b in merges], add_space_prefix=None, **common)


def write_vocab(writer, vocab: GgufVocab) -> None:
    """Every tokenizer key llama.cpp reads, onto a gguf.GGUFWriter."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        template = vocab.chat_template
        if isinstance(template, dict):  # named templates: llama.cpp's list form
            template = [{"name": k, "template": v} for k, v in template.items()]
        writer.add_chat_template(template)
