"""Dataset record schemas and their validation — the one place that says what a valid record is.

Kinds:
- ``preference``: PKU-SafeRLHF — ``prompt, response_0, response_1, is_response_0_safe,
  is_response_1_safe, better_response_id, safer_response_id`` (+ optional
  ``response_{0,1}_harm_category``, ``response_{0,1}_severity_level``). An id may be ``null``: a tie
  (an arena vote of "tie" or "both bad"), kept as such and left out by the trainer of that
  preference (reward for ``better_response_id``, cost and DPO likewise), which has no tie.
- ``prompt``: ``{"prompt": str}`` (+ optional ``red_team: bool``, ``category: str``).

In every kind, ``prompt`` may also be a conversation — a list of ``{"role", "content"}`` (system,
user, assistant) ending with a user turn — rendered by the model's chat template like a chat request.
- ``sft``: ``{"prompt": str, "response": str}`` or ``{"messages": [{"role", "content"}, ...]}``.
- ``samples``: a policy's answers, ``{"prompt": str, "response": str}`` where the response may be
  empty (a policy can stop at once); written by ``generate`` jobs, read by the arena and the demo.

The API validates uploads with ``validate_records`` (every bad line reported, nothing stored),
and the trainers validate again, so a dataset built in a notebook gets the same errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("preference", "prompt", "sft", "samples")

PREFERENCE_REQUIRED = {
    "response_0": str,
    "response_1": str,
    "is_response_0_safe": bool,
    "is_response_1_safe": bool,
    "better_response_id": (int, type(None)),
    "safer_response_id": (int, type(None)),
}
PREFERENCE_OPTIONAL = {
    "response_0_harm_category": (dict, list, str, type(None)),
    "response_1_harm_category": (dict, list, str, type(None)),
    "response_0_severity_level": (int, type(None)),
    "response_1_severity_level": (int, type(None)),
}
ROLES = ("system", "user", "assistant")
# Fields where null means something (a tie, no category): kept when a Parquet or Arrow upload has them
# null, where any other null column value is an absent field.
NULLABLE_FIELDS = frozenset(name for name, t in {**PREFERENCE_REQUIRED, **PREFERENCE_OPTIONAL}.items()
                            if isinstance(t, tuple) and type(None) in t)


def jsonl_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of a JSONL text. Lines end at ``\n`` (``\r\n`` too) and nowhere
    else: U+2028, U+2029, U+0085, ``\x0b`` and ``\x0c`` are characters a JSON string may hold, which
    ``str.splitlines`` would break a record at. A leading UTF-8 byte order mark is dropped."""
    text = text.removeprefix("\ufeff")
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the newline ending the last line starts no line of its own
        lines.pop()
    return [(number, line.removesuffix("\r")) for number, line in enumerate(lines, start=1)]


@dataclass
class RecordError:
    line: int  # 1-based line (JSONL) or index + 1 (JSON list)
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field {self.field!r}" if self.field else "")
        return f"{where}: {self.message}"


class InvalidRecords(ValueError):
    def __init__(self, errors: list[RecordError]):
        self.errors = errors
        shown = "; ".join(str(e) for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(f"{len(errors)} invalid record(s): {shown}{more}")


def harm_categories(value) -> list[str]:
    """Category names flagged in a ``response_*_harm_category`` field: PKU-SafeRLHF stores a
    ``{category: bool}`` dict; a list of names or a single name is accepted too."""
    if isinstance(value, dict):
        return [str(k) for k, flagged in value.items() if flagged]
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str) and value:
        return [value]
    return []


def _type_name(t) -> str:
    names = {str: "a string", bool: "true or false", int: "an integer (0 or 1)",
             (int, type(None)): "0, 1 or null (a tie)"}
    return names.get(t, getattr(t, "__name__", str(t)))


def record_errors(kind: str, record: Any, line: int) -> list[RecordError]:
    """All problems of one record; empty when it is valid."""
    if not isinstance(record, dict):
        return [RecordError(line, None, "a record must be a JSON object")]
    if kind == "preference":
        return _preference_errors(record, line)
    if kind == "prompt":
        errors = _prompt_errors(record, line)
        if "red_team" in record and not isinstance(record["red_team"], bool):
            errors.append(RecordError(line, "red_team", "must be true or false"))
        return errors
    if kind == "sft":
        return _sft_errors(record, line)
    if kind == "samples":
        errors = _prompt_errors(record, line)
        if not isinstance(record.get("response"), str):
            errors.append(RecordError(line, "response", "must be a string"))
        return errors
    return [RecordError(line, None, f"unknown dataset kind {kind!r}; one of {', '.join(KINDS)}")]


def _require_text(record: dict, name: str, line: int) -> list[RecordError]:
    if name not in record:
        return [RecordError(line, name, "missing")]
    if not isinstance(record[name], str) or not record[name].strip():
        return [RecordError(line, name, "must be a non-empty string")]
    return []


def _prompt_errors(record: dict, line: int) -> list[RecordError]:
    """``prompt``: a non-empty string, or messages that end with the user's turn."""
    if isinstance(record.get("prompt"), list):
        messages = record["prompt"]
        if not messages:
            return [RecordError(line, "prompt", "must be a non-empty string or a non-empty list of {role, content}")]
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return [RecordError(line, f"prompt[{i}]", f"must be {{role: one of {list(ROLES)}, content: string}}")]
        if messages[-1]["role"] != "user":
            return [RecordError(line, "prompt", "a conversation prompt must end with the user's message")]
        return []
    return _require_text(record, "prompt", line)


def _preference_errors(record: dict, line: int) -> list[RecordError]:
    errors = _prompt_errors(record, line)
    for name, typ in PREFERENCE_REQUIRED.items():
        if name not in record:
            errors.append(RecordError(line, name, "missing"))
            continue
        value = record[name]
        # bool is an int in Python; an id given as true/false is a mistake worth naming.
        ok = isinstance(value, typ) and not isinstance(value, bool) if typ != bool else isinstance(value, bool)
        if typ is str and ok and not value.strip():
            errors.append(RecordError(line, name, "must be a non-empty string"))
        elif not ok:
            errors.append(RecordError(line, name, f"must be {_type_name(typ)}, got {value!r}"[:200]))
    for name, types in PREFERENCE_OPTIONAL.items():
        if name in record and not isinstance(record[name], types):
            errors.append(RecordError(line, name, "has the wrong type"))
    for name in ("better_response_id", "safer_response_id"):
        value = record.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value not in (0, 1):
            errors.append(RecordError(line, name, f"must be 0 or 1, got {value}"))
    if errors:
        return errors
    safer = record["safer_response_id"]
    if safer is None:  # a tie: no order to contradict
        return errors
    safer_safe = record[f"is_response_{safer}_safe"]
    other_safe = record[f"is_response_{1 - safer}_safe"]
    if not safer_safe and other_safe:
        errors.append(RecordError(
            line, "safer_response_id",
            f"contradictory: response_{safer} is marked safer but labelled unsafe while response_{1 - safer} is labelled safe"))
    return errors


def _sft_errors(record: dict, line: int) -> list[RecordError]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return [RecordError(line, "messages", "must be a non-empty list of {role, content}")]
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return [RecordError(line, f"messages[{i}]", f"must be {{role: one of {list(ROLES)}, content: string}}")]
        if messages[-1]["role"] != "assistant":
            return [RecordError(line, "messages", "the last message must be the assistant's answer")]
        return []
    return _require_text(record, "prompt", line) + _require_text(record, "response", line)


def validate_records(kind: str, records: list, first_line: int = 1) -> list[RecordError]:
    """Errors of every record (not just the first bad one), numbered from ``first_line``."""
    if kind not in KINDS:
        return [RecordError(0, "kind", f"unknown dataset kind {kind!r}; one of {', '.join(KINDS)}")]
    errors = []
    for i, record in enumerate(records):
        errors.extend(record_errors(kind, record, first_line + i))
    return errors


def check_records(kind: str, records: list) -> None:
    """Raise ``InvalidRecords`` listing every bad record."""
    errors = validate_records(kind, records)
    if errors:
        raise InvalidRecords(errors)
