"""The preference-data contract: row formats, their detection, and per-row validation.

Pure Python (no Ray, no pyarrow). A *record* is one parsed row as a dict, after the column mapping.
Three formats turn a record into a :class:`TextPair` (prompt text, chosen response, rejected response):

* **explicit**: ``prompt``, ``chosen`` and ``rejected`` are strings.
* **implicit** (Anthropic HH-RLHF): ``chosen`` and ``rejected`` are whole dialogues; the prompt is their
  common part up to and including the last ``"\\n\\nAssistant:"`` in it.
* **conversational**: ``chosen`` and ``rejected`` (and an optional ``prompt``) are lists of
  ``{role, content}`` messages, rendered with the tokenizer's chat template.

A row that cannot be used raises :class:`InvalidRow` with a :class:`DropReason` and the field at fault;
the pipeline counts it in the data report instead of training on it.
"""

from __future__ import annotations

import enum
import os
from collections import Counter
from typing import Any, Iterable, Mapping, NamedTuple

PAIR_FIELDS = ("prompt", "chosen", "rejected")
FORMATS = ("explicit", "implicit", "conversational")

HUMAN_TURN = "\n\nHuman:"
ASSISTANT_TURN = "\n\nAssistant:"


class DataValidationError(ValueError):
    """The data cannot be trained on (missing source, empty split, too many unusable rows)."""


class DropReason(str, enum.Enum):
    """Why a row was left out; the values are the names used in ``data_report.json``."""

    UNPARSEABLE_LINE = "unparseable_line"
    MISSING_FIELD = "missing_field"
    EMPTY_FIELD = "empty_field"
    NON_STRING_FIELD = "non_string_field"
    CHOSEN_EQUALS_REJECTED = "chosen_equals_rejected"
    PROMPT_MISMATCH = "prompt_mismatch"
    PROMPT_TOO_LONG = "prompt_too_long"
    INVALID_UTF8 = "invalid_utf8"


class InvalidRow(Exception):
    """A row that cannot be used, with the reason and (where one is at fault) the field."""

    def __init__(self, reason: DropReason, field: str | None = None):
        super().__init__(f"{reason.value}" + (f" (field '{field}')" if field else ""))
        self.reason = reason
        self.field = field


class TextPair(NamedTuple):
    """Prompt text and the two response texts, ready to tokenize."""

    prompt: str
    chosen: str
    rejected: str


class MessagePair(NamedTuple):
    """Prompt messages and the two response message lists of a conversational row."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]


# ---------------------------------------------------------------------------- column mapping


def apply_column_map(record: Mapping[str, Any], column_map: Mapping[str, str]) -> dict[str, Any]:
    """Rename source columns to target names; a mapped column wins over one already named like its target."""
    targets = set(column_map.values())
    renamed = {k: v for k, v in record.items() if k not in column_map and k not in targets}
    renamed.update({column_map[k]: v for k, v in record.items() if k in column_map})
    return renamed


def list_source_columns(column_map: Mapping[str, str]) -> list[str]:
    """Source column names that feed the pair fields (mapped names and unmapped pair fields)."""
    mapped = [src for src, dst in column_map.items() if dst in PAIR_FIELDS]
    unmapped = [f for f in PAIR_FIELDS if f not in column_map.values()]
    return mapped + unmapped


# ---------------------------------------------------------------------------- format detection


def detect_row_format(record: Mapping[str, Any]) -> str | None:
    """The format a single record looks like, or None when it shows no usable shape."""
    chosen = record.get("chosen")
    if isinstance(chosen, list):
        return "conversational"
    if isinstance(chosen, str):
        return "explicit" if record.get("prompt") is not None else "implicit"
    return None


def choose_format(records: Iterable[Mapping[str, Any]]) -> str:
    """The format most records look like (ties: explicit, then conversational, then implicit)."""
    votes = Counter(f for f in map(detect_row_format, records) if f is not None)
    if not votes:
        return "explicit"
    priority = {"explicit": 0, "conversational": 1, "implicit": 2}
    return min(votes, key=lambda f: (-votes[f], priority[f]))


# ---------------------------------------------------------------------------- field checks


def require_string(record: Mapping[str, Any], field: str) -> str:
    """The non-empty string value of ``field`` (missing / None, non-string and blank raise)."""
    value = record.get(field)
    if value is None:
        raise InvalidRow(DropReason.MISSING_FIELD, field)
    if not isinstance(value, str):
        raise InvalidRow(DropReason.NON_STRING_FIELD, field)
    if not value.strip():
        raise InvalidRow(DropReason.EMPTY_FIELD, field)
    return value


def require_messages(value: Any, field: str) -> list[dict]:
    """A non-empty list of ``{role, content}`` string messages; keys holding None are dropped.

    Arrow fills keys that only some messages have with None, so ``{"role", "content", "name": None}``
    and ``{"role", "content"}`` are the same message.
    """
    if value is None:
        raise InvalidRow(DropReason.MISSING_FIELD, field)
    if not isinstance(value, list):
        raise InvalidRow(DropReason.NON_STRING_FIELD, field)
    if not value:
        raise InvalidRow(DropReason.EMPTY_FIELD, field)
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise InvalidRow(DropReason.NON_STRING_FIELD, f"{field}[{i}]")
        for key in ("role", "content"):
            if message.get(key) is None:
                raise InvalidRow(DropReason.MISSING_FIELD, f"{field}[{i}].{key}")
            if not isinstance(message[key], str):
                raise InvalidRow(DropReason.NON_STRING_FIELD, f"{field}[{i}].{key}")
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def require_nonblank_response(text: str, field: str) -> str:
    """``text`` unless it is empty or whitespace only."""
    if not text.strip():
        raise InvalidRow(DropReason.EMPTY_FIELD, field)
    return text


def require_distinct(pair: TextPair) -> TextPair:
    """``pair`` unless its two responses are identical (no preference to learn)."""
    if pair.chosen == pair.rejected:
        raise InvalidRow(DropReason.CHOSEN_EQUALS_REJECTED)
    return pair


# ---------------------------------------------------------------------------- explicit and implicit


def normalize_explicit(record: Mapping[str, Any]) -> TextPair:
    """Explicit rows: three strings, each present and non-blank."""
    return TextPair(*(require_string(record, f) for f in PAIR_FIELDS))


def split_implicit_prompt(chosen: str, rejected: str) -> TextPair:
    """Split two whole dialogues into the shared prompt and the two final assistant responses.

    The prompt ends with the last ``"\\n\\nAssistant:"`` of the common prefix. When a remainder still holds
    a turn marker, the dialogues differ before the final assistant turn: ``prompt_mismatch``. Responses
    may hold "Human:" inline (without the blank line); HH-RLHF has such rows and they are valid.
    """
    common = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(ASSISTANT_TURN, 0, common)  # the marker must lie wholly inside the common part
    if cut < 0:
        raise InvalidRow(DropReason.PROMPT_MISMATCH, "chosen")
    end = cut + len(ASSISTANT_TURN)
    pair = TextPair(chosen[:end], chosen[end:], rejected[end:])
    for field, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if HUMAN_TURN in text or ASSISTANT_TURN in text:
            raise InvalidRow(DropReason.PROMPT_MISMATCH, field)
    return pair


def normalize_implicit(record: Mapping[str, Any]) -> TextPair:
    """Implicit-prompt rows (HH-RLHF): two whole dialogues sharing everything but the last answer."""
    chosen, rejected = require_string(record, "chosen"), require_string(record, "rejected")
    pair = split_implicit_prompt(chosen, rejected)
    require_nonblank_response(pair.chosen, "chosen")
    require_nonblank_response(pair.rejected, "rejected")
    return pair


# ---------------------------------------------------------------------------- conversational


def strip_common_messages(chosen: list[dict], rejected: list[dict]) -> MessagePair:
    """Prompt messages = the shared leading messages; the rest must hold no user turn."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    pair = MessagePair(chosen[:shared], chosen[shared:], rejected[shared:])
    if not pair.prompt:
        raise InvalidRow(DropReason.PROMPT_MISMATCH, "prompt")
    for field, messages in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if any(m["role"] == "user" for m in messages):
            raise InvalidRow(DropReason.PROMPT_MISMATCH, field)
    return pair


def normalize_conversation(record: Mapping[str, Any]) -> MessagePair:
    """Conversational rows: prompt messages (given, or the shared prefix) and the response messages.

    A string prompt becomes one user message. Responses that repeat the prompt messages first (the
    UltraFeedback-binarized shape, full conversations) have them stripped.
    """
    chosen = require_messages(record.get("chosen"), "chosen")
    rejected = require_messages(record.get("rejected"), "rejected")
    raw_prompt = record.get("prompt")
    if raw_prompt is None:
        pair = strip_common_messages(chosen, rejected)
    else:
        if isinstance(raw_prompt, str):
            prompt = [{"role": "user", "content": require_string(record, "prompt")}]
        else:
            prompt = require_messages(raw_prompt, "prompt")
        n = len(prompt)
        pair = MessagePair(
            prompt,
            chosen[n:] if chosen[:n] == prompt else chosen,
            rejected[n:] if rejected[:n] == prompt else rejected,
        )
    for field, messages in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if not messages or not any(m["content"].strip() for m in messages):
            raise InvalidRow(DropReason.EMPTY_FIELD, field)
    return pair


def render_conversation(tokenizer: Any, conversation: MessagePair) -> TextPair:
    """Render with the chat template, as TRL does: the prompt with the generation prompt, and each
    response as template(prompt + response) with the prompt text taken off its start."""
    prompt_text = tokenizer.apply_chat_template(conversation.prompt, tokenize=False, add_generation_prompt=True)
    responses = []
    for field, messages in (("chosen", conversation.chosen), ("rejected", conversation.rejected)):
        full = tokenizer.apply_chat_template(conversation.prompt + messages, tokenize=False)
        if not full.startswith(prompt_text):
            raise InvalidRow(DropReason.PROMPT_MISMATCH, field)
        responses.append(full[len(prompt_text) :])
    return TextPair(prompt_text, *responses)


# ---------------------------------------------------------------------------- dispatch


def extract_text_pair(record: Mapping[str, Any], fmt: str, tokenizer: Any = None) -> TextPair:
    """Validate ``record`` as format ``fmt`` and return its texts (the tokenizer renders chat rows)."""
    if fmt == "explicit":
        pair = normalize_explicit(record)
    elif fmt == "implicit":
        pair = normalize_implicit(record)
    elif fmt == "conversational":
        pair = render_conversation(tokenizer, normalize_conversation(record))
    else:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return require_distinct(pair)
