"""The accepted record schemas (instruction/context/response, Alpaca, prompt/completion, chat
messages, --field-map) normalised to one Example."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from llama_sft.errors import DatasetError

CANONICAL_FIELDS = ("instruction", "context", "response")


OPTIONAL_FIELDS = ("category", "id")


@dataclass
class Example:
    instruction: str
    context: str
    response: str
    category: str = "uncategorized"
    id: str | None = None
    line: int = 0

    @property
    def content_hash(self) -> str:
        """Stable identity of the example's content (not its id or position)."""
        h = hashlib.sha256()
        for part in (self.instruction, self.context, self.response):
            h.update(part.strip().encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        d = {"instruction": self.instruction, "context": self.context, "response": self.response,
             "category": self.category}
        if self.id is not None:
            d["id"] = self.id
        return d


def parse_field_map(spec: str | None) -> dict[str, str | None]:
    """'question=instruction,answer=response,notes=' -> {question: instruction, ..., notes: None}"""
    if not spec:
        return {}
    out: dict[str, str | None] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise DatasetError(f"--field-map {spec!r}: {part!r} is not SOURCE=TARGET "
                               f"(e.g. question=instruction,answer=response)")
        src, dst = (s.strip() for s in part.split("=", 1))
        if dst and dst not in CANONICAL_FIELDS + OPTIONAL_FIELDS:
            raise DatasetError(f"--field-map {spec!r}: target {dst!r} must be one of "
                               f"{', '.join(CANONICAL_FIELDS + OPTIONAL_FIELDS)} (or empty to ignore)")
        out[src] = dst or None
    return out


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _messages_to_fields(messages: Any) -> dict[str, Any]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty array of {role, content} objects")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            raise ValueError(f"'messages'[{i}] must be an object with string 'role' and 'content'")
        if m["role"] == "system":
            system.append(m["content"])
        elif m["role"] in ("user", "assistant"):
            turns.append(m)
        else:
            # The role's value is not echoed: error messages never quote record values.
            raise ValueError(f"'messages'[{i}] has role other than system, user or assistant")
    if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
        raise ValueError("'messages' must end with a user turn followed by an assistant turn")
    if len(turns) > 2:
        raise ValueError("multi-turn 'messages' are not supported; keep one user and one "
                         "assistant turn per line")
    return {"instruction": turns[-2]["content"], "context": "\n".join(system),
            "response": turns[-1]["content"]}


def normalize_record(obj: Any, field_map: dict[str, str | None]) -> Example:
    """Map one parsed JSON value to an Example, or raise ValueError with a reason that never
    includes field values (records may hold secrets)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_type_name(obj)}")
    rec = _canonical_fields(_apply_field_map(obj, field_map))
    _check_fields(rec, obj)
    return Example(instruction=rec["instruction"], context=rec.get("context") or "",
                   response=rec["response"], category=rec.get("category") or "uncategorized",
                   id=None if rec.get("id") is None else str(rec["id"]))


def _apply_field_map(obj: dict[str, Any], field_map: dict[str, str | None]) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    for k, v in obj.items():
        if k in field_map:
            if field_map[k] is not None:
                rec[field_map[k]] = v
        else:
            rec[k] = v
    return rec


def _canonical_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """The other schemas (chat messages, prompt/completion, Alpaca) renamed to the native one."""
    keys = set(rec)
    if "messages" in keys:
        extra = keys - {"messages", "category", "id"}
        if extra:
            raise ValueError(f"unknown field(s) {sorted(extra)} beside 'messages'")
        mapped = _messages_to_fields(rec["messages"])
        mapped.update({k: rec[k] for k in ("category", "id") if k in rec})
        return mapped
    rec = dict(rec)
    if "prompt" in keys or "completion" in keys:
        if "prompt" in rec:
            rec["instruction"] = rec.pop("prompt")
        if "completion" in rec:
            rec["response"] = rec.pop("completion")
    elif "output" in keys and "response" not in keys:  # Alpaca
        rec["response"] = rec.pop("output")
        if "input" in rec:
            rec["context"] = rec.pop("input")
    return rec


def _check_fields(rec: dict[str, Any], obj: dict[str, Any]) -> None:
    """Unknown, missing and mistyped fields; nulls of optional fields are dropped from rec."""
    unknown = sorted(set(rec) - set(CANONICAL_FIELDS + OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; map them with --field-map "
                         f"'{unknown[0]}=context' or ignore them with --field-map '{unknown[0]}='")
    for name in ("instruction", "response"):
        if name not in rec:
            raise ValueError(f"missing field {name!r} (fields present: {sorted(obj)})")
    for name in ("context", "category", "id"):
        if name in rec and rec[name] is None:  # common in public datasets: null = absent
            del rec[name]
    for name in ("instruction", "context", "response", "category"):
        if name in rec and not isinstance(rec[name], str):
            raise ValueError(f"field {name!r} must be a string, got {_type_name(rec[name])}")
    if "id" in rec and not isinstance(rec["id"], (str, int)) or isinstance(rec.get("id"), bool):
        raise ValueError(f"field 'id' must be a string or an integer, got {_type_name(rec['id'])}")
    _check_text(rec)


def _check_text(rec: dict[str, Any]) -> None:
    """Valid Unicode everywhere, and a non-empty instruction and response."""
    for name in ("instruction", "context", "response", "category", "id"):
        if isinstance(rec.get(name), str):
            try:
                rec[name].encode("utf-8")
            except UnicodeEncodeError:
                # A lone surrogate escape (e.g. "\ud800") is valid JSON but not text: hashing,
                # tokenizing or writing it would crash later, far from this line.
                raise ValueError(f"field {name!r} is not valid Unicode (lone surrogate "
                                 "escape)") from None
    if not rec["instruction"].strip():
        raise ValueError("field 'instruction' is empty")
    if not rec["response"].strip():
        raise ValueError("field 'response' is empty: there is nothing to learn from this line")
