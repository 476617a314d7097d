"""The accepted record schemas normalised to one Example: instruction/context/response, Alpaca,
prompt/completion, chat `messages` (any number of turns), ShareGPT `conversations`, and
--field-map renames.

A conversation is an optional system turn, then user and assistant turns alternating, ending
with an assistant turn. Validation errors name the turn by index and role, never its content."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from llama_sft.errors import DatasetError

CANONICAL_FIELDS = ("instruction", "context", "response")


OPTIONAL_FIELDS = ("category", "id")


# Conversation roles as written in each schema -> the chat-template role.
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user",
                  "assistant": "assistant"}


@dataclass
class Example:
    """One training example. Conversation records also keep their `messages` as (role,
    content) pairs; `instruction` / `response` are then the last user and assistant turns and
    `context` the system turn, so single-turn consumers read every example alike."""

    instruction: str
    context: str
    response: str
    category: str = "uncategorized"
    id: str | None = None
    line: int = 0
    messages: tuple[tuple[str, str], ...] | None = None

    @property
    def content_hash(self) -> str:
        """Stable identity of the example's content (not its id or position). A one-exchange
        conversation hashes as the instruction/context/response record it reads as."""
        h = hashlib.sha256()
        for part in (self.instruction, self.context, self.response):
            h.update(part.strip().encode("utf-8"))
            h.update(b"\x00")
        if self.assistant_turns > 1:
            for role, content in self.messages or ():
                h.update(f"{role}\x01{content.strip()}\x00".encode("utf-8"))
        return h.hexdigest()

    @property
    def assistant_turns(self) -> int:
        if self.messages is None:
            return 1
        return sum(1 for role, _ in self.messages if role == "assistant")

    def conversation(self) -> list[dict[str, str]]:
        """The example as chat messages: its own turns, or one user turn (instruction, then
        context) and the response."""
        if self.messages is not None:
            return [{"role": role, "content": content} for role, content in self.messages]
        return [{"role": "user", "content": user_message(self.instruction, self.context)},
                {"role": "assistant", "content": self.response}]

    def to_dict(self) -> dict[str, Any]:
        if self.messages is not None:
            d: dict[str, Any] = {"messages": self.conversation(), "category": self.category}
        else:
            d = {"instruction": self.instruction, "context": self.context,
                 "response": self.response, "category": self.category}
        if self.id is not None:
            d["id"] = self.id
        return d


def user_message(instruction: str, context: str) -> str:
    """A single-turn record's user turn: the instruction, then the context after a blank line."""
    return f"{instruction.strip()}\n\n{context.strip()}" if context.strip() else instruction.strip()


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


def parse_turns(turns: Any, key: str, roles: dict[str, str], role_key: str = "role",
                content_key: str = "content") -> tuple[tuple[str, str], ...]:
    """A conversation array -> (role, content) pairs, checked: known roles, no empty turn, an
    optional system turn first, then user/assistant alternating, ending with an assistant
    turn. Errors name the turn's index and role, never its content or an unknown role's value."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{key}' must be a non-empty array of {{{role_key}, {content_key}}} "
                         "objects")
    out: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) or \
                not isinstance(turn.get(content_key), str):
            raise ValueError(f"'{key}'[{i}] must be an object with string '{role_key}' and "
                             f"'{content_key}'")
        role = roles.get(turn[role_key])
        if role is None:
            raise ValueError(f"'{key}'[{i}] has an unknown {role_key}; use "
                             f"{', '.join(sorted(roles))}")
        if not turn[content_key].strip():
            raise ValueError(f"'{key}'[{i}] ({role} turn) is empty")
        out.append((role, turn[content_key]))
    _check_turn_order(out, key)
    return tuple(out)


def _a(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


def _check_turn_order(turns: list[tuple[str, str]], key: str) -> None:
    first = 1 if turns[0][0] == "system" else 0
    for i, (role, _) in enumerate(turns[first:], start=first):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if role != expected:
            where = "the first turn (after an optional system turn) must be a user turn" \
                if i == first else f"{_a(turns[i - 1][0])} turn must be followed by " \
                f"{_a(expected)} turn"
            raise ValueError(f"'{key}'[{i}] is {_a(role)} turn where {where}; a conversation "
                             "is an optional system turn, then user and assistant turns "
                             "alternating")
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError(f"'{key}' has no assistant turn: there is nothing to learn from this "
                         "line")
    if turns[-1][0] != "assistant":
        raise ValueError(f"'{key}' must end with an assistant turn ('{key}'[{len(turns) - 1}] "
                         f"is {_a(turns[-1][0])} turn)")


def _conversation_fields(turns: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    system = [content for role, content in turns if role == "system"]
    return {"instruction": turns[-2][1], "context": "\n".join(system), "response": turns[-1][1],
            "messages": turns}


def normalize_record(obj: Any, field_map: dict[str, str | None]) -> Example:
    """Map one parsed JSON value to an Example, or raise ValueError with a reason that never
    includes field values (records may hold secrets)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_type_name(obj)}")
    rec = _canonical_fields(_apply_field_map(obj, field_map))
    messages = rec.pop("messages", None)
    _check_fields(rec, obj)
    return Example(instruction=rec["instruction"], context=rec.get("context") or "",
                   response=rec["response"], category=rec.get("category") or "uncategorized",
                   id=None if rec.get("id") is None else str(rec["id"]), messages=messages)


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
    for key, roles, role_key, content_key in (("messages", MESSAGE_ROLES, "role", "content"),
                                              ("conversations", SHAREGPT_ROLES, "from", "value")):
        if key in keys:
            extra = keys - {key, "category", "id"}
            if extra:
                raise ValueError(f"unknown field(s) {sorted(extra)} beside '{key}'")
            mapped = _conversation_fields(parse_turns(rec[key], key, roles, role_key,
                                                      content_key))
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
