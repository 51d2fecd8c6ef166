"""The preference-data contract: row formats, their detection, and per-row validation.

Pure Python (no Ray, no pyarrow). A *record* is one parsed row as a dict, after the column mapping.
Three formats turn a record into a :class:`TextPair` (prompt text, chosen response, rejected response):

* **explicit**: ``prompt``, ``chosen`` and ``rejected`` are strings.
* **implicit**: ``chosen`` and ``rejected`` are whole texts that share the prompt. Rows holding an
  ``"\\n\\nAssistant:"`` turn (Anthropic HH-RLHF) are split after the last one of their common part
  (rule ``hh_assistant_turn``); any other row is split as TRL's ``extract_prompt`` splits it: the prompt
  is the common prefix, less the space right before the first difference (rule ``common_prefix``).
* **conversational**: ``chosen`` and ``rejected`` (and an optional ``prompt``) are lists of
  ``{role, content}`` messages, rendered with the tokenizer's chat template.

A row that cannot be used raises :class:`InvalidRow` with a :class:`DropReason` and the field at fault;
the pipeline counts it in the data report instead of training on it. Every usable row also names the
:class:`PromptRule` that found its prompt, which the data report counts per source.

:func:`parse_pair` also returns the row's *canonical prompt* (:func:`canonical_prompt`), the text the
held-out split hashes so that every pair of one prompt lands on the same side. SFT reads the same three
formats with :func:`extract_sft_example`: only the prompt and the ``chosen`` response are needed there
(``rejected`` is ignored and may be absent, except for an implicit row without an HH turn: its prompt is
the common prefix with ``rejected``).
"""

from __future__ import annotations

import enum
import hashlib
import json
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
    NO_SHARED_PROMPT = "no_shared_prompt"  # implicit, common-prefix rule: the two texts share no prompt
    RESPONSE_IS_PREFIX = "response_is_prefix"  # implicit, common-prefix rule: nothing left of one response
    PROMPT_TOO_LONG = "prompt_too_long"
    INVALID_UTF8 = "invalid_utf8"
    UNREADABLE_FILE = "unreadable_file"  # a whole file (one row in the report, named by the file)


class PromptRule(str, enum.Enum):
    """How a usable row's prompt was found; the values are the names the data report counts them by."""

    GIVEN = "given"  # a ``prompt`` field (explicit rows, conversational rows with a prompt)
    HH_ASSISTANT_TURN = "hh_assistant_turn"  # implicit: up to the last "\n\nAssistant:" of the common part
    COMMON_PREFIX = "common_prefix"  # implicit: TRL's rule, the common prefix (less the space before the cut)
    SHARED_MESSAGES = "shared_messages"  # conversational without a prompt: the messages both start with


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


class ParsedPair(NamedTuple):
    """A validated preference row: its texts, its canonical prompt (see :func:`canonical_prompt`) and the
    rule that found the prompt."""

    texts: TextPair
    prompt: str
    rule: PromptRule


class TextExample(NamedTuple):
    """An SFT row: prompt text and the target (chosen) response text, ready to tokenize."""

    prompt: str
    response: str


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


def split_common_prefix(chosen: str, rejected: str) -> TextPair:
    """TRL's implicit-prompt split (``trl.extract_prompt``): the prompt is the longest common prefix, and when
    the character right before the first difference is a space, that space starts the responses instead.

    ``"Q\\nAnswer: Paris"`` / ``"Q\\nAnswer: Rome"`` -> ``"Q\\nAnswer:"``, ``" Paris"``, ``" Rome"``. Only a
    single space moves (a newline stays in the prompt), and a difference inside a word splits the word, as
    in TRL. Where TRL would silently train on a broken split, the row is dropped with a reason instead:
    identical texts (``chosen_equals_rejected``), one text the start of the other (``response_is_prefix``,
    naming the shorter one), or no non-blank common prefix (``no_shared_prompt``).
    """
    if chosen == rejected:
        raise InvalidRow(DropReason.CHOSEN_EQUALS_REJECTED)
    cut = len(os.path.commonprefix([chosen, rejected]))
    if cut == min(len(chosen), len(rejected)):
        raise InvalidRow(DropReason.RESPONSE_IS_PREFIX, "chosen" if len(chosen) < len(rejected) else "rejected")
    if cut > 0 and chosen[cut - 1] == " ":
        cut -= 1
    if not chosen[:cut].strip():
        raise InvalidRow(DropReason.NO_SHARED_PROMPT)
    return TextPair(chosen[:cut], chosen[cut:], rejected[cut:])


def has_hh_turn(*texts: str) -> bool:
    """Whether any of ``texts`` holds an ``"\\n\\nAssistant:"`` turn (so the HH rule splits the row)."""
    return any(ASSISTANT_TURN in text for text in texts)


def split_implicit_pair(chosen: str, rejected: str) -> tuple[TextPair, PromptRule]:
    """The split of an implicit row and the rule that made it.

    HH's rule (:func:`split_implicit_prompt`) wherever either text holds an ``"\\n\\nAssistant:"`` turn, so
    HH rows split, and fail (``prompt_mismatch``), exactly as before; TRL's common prefix
    (:func:`split_common_prefix`) for every other row. The HH rule comes first because it keeps responses
    that start alike (" I think so" / " I do not") whole, where the common prefix would move the "I" into the
    prompt.
    """
    if has_hh_turn(chosen, rejected):
        return split_implicit_prompt(chosen, rejected), PromptRule.HH_ASSISTANT_TURN
    return split_common_prefix(chosen, rejected), PromptRule.COMMON_PREFIX


def normalize_implicit(record: Mapping[str, Any]) -> tuple[TextPair, PromptRule]:
    """Implicit-prompt rows: two whole texts sharing the prompt (:func:`split_implicit_pair`), and the rule."""
    chosen, rejected = require_string(record, "chosen"), require_string(record, "rejected")
    pair, rule = split_implicit_pair(chosen, rejected)
    require_nonblank_response(pair.chosen, "chosen")
    require_nonblank_response(pair.rejected, "rejected")
    return pair, rule


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


def read_prompt_messages(record: Mapping[str, Any]) -> list[dict]:
    """The ``prompt`` of a conversational row as messages; a string prompt becomes one user message."""
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": require_string(record, "prompt")}]
    return require_messages(record.get("prompt"), "prompt")


def strip_prompt_messages(prompt: list[dict], messages: list[dict]) -> list[dict]:
    """``messages`` without the prompt messages when they repeat them first (full conversations)."""
    n = len(prompt)
    return messages[n:] if messages[:n] == prompt else messages


def require_response_messages(messages: list[dict], field: str) -> list[dict]:
    """``messages`` unless there are none or all of them are blank."""
    if not messages or not any(m["content"].strip() for m in messages):
        raise InvalidRow(DropReason.EMPTY_FIELD, field)
    return messages


def normalize_conversation(record: Mapping[str, Any]) -> MessagePair:
    """Conversational rows: prompt messages (given, or the shared prefix) and the response messages.

    A string prompt becomes one user message. Responses that repeat the prompt messages first (the
    UltraFeedback-binarized shape, full conversations) have them stripped.
    """
    chosen = require_messages(record.get("chosen"), "chosen")
    rejected = require_messages(record.get("rejected"), "rejected")
    if record.get("prompt") is None:
        pair = strip_common_messages(chosen, rejected)
    else:
        prompt = read_prompt_messages(record)
        pair = MessagePair(prompt, strip_prompt_messages(prompt, chosen), strip_prompt_messages(prompt, rejected))
    require_response_messages(pair.chosen, "chosen")
    require_response_messages(pair.rejected, "rejected")
    return pair


def render_prompt(tokenizer: Any, prompt: list[dict]) -> str:
    """The prompt messages through the chat template, with the generation prompt."""
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def render_response(tokenizer: Any, prompt: list[dict], prompt_text: str, messages: list[dict], field: str) -> str:
    """template(prompt + response) with ``prompt_text`` (:func:`render_prompt`) taken off its start."""
    full = tokenizer.apply_chat_template(prompt + messages, tokenize=False)
    if not full.startswith(prompt_text):
        raise InvalidRow(DropReason.PROMPT_MISMATCH, field)
    return full[len(prompt_text) :]


def render_conversation(tokenizer: Any, conversation: MessagePair) -> TextPair:
    """Render with the chat template, as TRL does: the prompt with the generation prompt, and each
    response as template(prompt + response) with the prompt text taken off its start."""
    prompt_text = render_prompt(tokenizer, conversation.prompt)
    return TextPair(
        prompt_text,
        render_response(tokenizer, conversation.prompt, prompt_text, conversation.chosen, "chosen"),
        render_response(tokenizer, conversation.prompt, prompt_text, conversation.rejected, "rejected"),
    )


# ---------------------------------------------------------------------------- dispatch


def canonical_prompt(prompt: str | list[dict]) -> str:
    """The prompt as the held-out split sees it, before any chat template (so the split does not change
    with the tokenizer): the prompt string of an explicit or implicit row as it is (no whitespace
    folding), or the JSON (keys sorted) of a conversational row's parsed prompt messages."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def digest_prompt(prompt: str) -> str:
    """A 128-bit hex digest of a canonical prompt (:func:`canonical_prompt`): equal prompts, equal digests."""
    return hashlib.blake2b(prompt.encode("utf-8"), digest_size=16).hexdigest()


def require_format(fmt: str) -> str:
    """``fmt`` when it is one of :data:`FORMATS` (ValueError otherwise)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def parse_pair(record: Mapping[str, Any], fmt: str, tokenizer: Any = None) -> ParsedPair:
    """Validate ``record`` as format ``fmt``: its texts (the tokenizer renders chat rows) and canonical prompt."""
    if require_format(fmt) == "explicit":
        pair, rule = normalize_explicit(record), PromptRule.GIVEN
        prompt = pair.prompt
    elif fmt == "implicit":
        pair, rule = normalize_implicit(record)
        prompt = pair.prompt
    else:
        conversation = normalize_conversation(record)
        pair = render_conversation(tokenizer, conversation)
        prompt = canonical_prompt(conversation.prompt)
        rule = PromptRule.SHARED_MESSAGES if record.get("prompt") is None else PromptRule.GIVEN
    return ParsedPair(require_distinct(pair), prompt, rule)


def extract_text_pair(record: Mapping[str, Any], fmt: str, tokenizer: Any = None) -> TextPair:
    """Validate ``record`` as format ``fmt`` and return its texts (the tokenizer renders chat rows)."""
    return parse_pair(record, fmt, tokenizer).texts


# ---------------------------------------------------------------------------- SFT rows (no rejected needed)


def split_final_assistant_turn(dialogue: str) -> TextExample:
    """An implicit-format ``chosen`` dialogue -> the prompt up to and including its last
    ``"\\n\\nAssistant:"`` and that final answer.

    For a row the DPO pipeline accepts this is the same prompt as :func:`split_implicit_prompt` gives;
    ``rejected`` is not needed. No assistant turn, or a human turn after the last one: ``prompt_mismatch``.
    """
    cut = dialogue.rfind(ASSISTANT_TURN)
    if cut < 0:
        raise InvalidRow(DropReason.PROMPT_MISMATCH, "chosen")
    end = cut + len(ASSISTANT_TURN)
    if HUMAN_TURN in dialogue[end:]:
        raise InvalidRow(DropReason.PROMPT_MISMATCH, "chosen")
    return TextExample(dialogue[:end], require_nonblank_response(dialogue[end:], "chosen"))


def split_sft_implicit(record: Mapping[str, Any]) -> TextExample:
    """An implicit SFT row -> prompt and ``chosen`` response, by the rule DPO uses for the row
    (:func:`split_implicit_pair`): a ``chosen`` with an HH turn needs nothing else
    (:func:`split_final_assistant_turn`); without one the prompt is the common prefix with ``rejected``,
    so ``rejected`` must be there (``missing_field``).
    """
    chosen = require_string(record, "chosen")
    if has_hh_turn(chosen):
        return split_final_assistant_turn(chosen)
    pair = split_common_prefix(chosen, require_string(record, "rejected"))
    return TextExample(pair.prompt, require_nonblank_response(pair.chosen, "chosen"))


def split_final_response(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """A whole conversation -> (the messages up to and including the last user turn, the answer after it).

    For a pair the DPO pipeline accepts this is its shared prefix. No user turn at all: ``missing_field``
    (``prompt``).
    """
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise InvalidRow(DropReason.MISSING_FIELD, "prompt")
    return messages[: users[-1] + 1], messages[users[-1] + 1 :]


def normalize_sft_conversation(record: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    """Conversational SFT rows: (prompt messages, response messages); the prompt is given or, without one,
    :func:`split_final_response` of ``chosen``. Responses repeating the prompt first have it stripped."""
    chosen = require_messages(record.get("chosen"), "chosen")
    if record.get("prompt") is None:
        prompt, response = split_final_response(chosen)
    else:
        prompt = read_prompt_messages(record)
        response = strip_prompt_messages(prompt, chosen)
    return prompt, require_response_messages(response, "chosen")


def extract_sft_example(record: Mapping[str, Any], fmt: str, tokenizer: Any = None) -> TextExample:
    """Validate ``record`` as an SFT row of format ``fmt``: the prompt text and the ``chosen`` response.

    explicit: ``prompt`` and ``chosen`` strings; implicit: :func:`split_sft_implicit`;
    conversational: :func:`normalize_sft_conversation`, rendered with the chat template as DPO renders it.
    ``rejected`` is read only to find the prompt of an implicit row without an HH turn.

    Raises:
        InvalidRow: with the reason and field, as for preference rows.
    """
    if require_format(fmt) == "explicit":
        return TextExample(require_string(record, "prompt"), require_string(record, "chosen"))
    if fmt == "implicit":
        return split_sft_implicit(record)
    prompt, response = normalize_sft_conversation(record)
    prompt_text = render_prompt(tokenizer, prompt)
    return TextExample(prompt_text, render_response(tokenizer, prompt, prompt_text, response, "chosen"))
