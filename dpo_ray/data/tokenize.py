"""Tokenizing preference pairs: prompt and responses separately, BOS and EOS, and TRL's truncation.

The prompt and each response are tokenized on their own and concatenated, so the response tokens are
exactly the tokens that are scored. BOS starts the prompt when the tokenizer has one (and the text does
not already start with it); EOS ends each response (unless the chat template already put it there).

Truncation with P prompt tokens, M = max(len(chosen), len(rejected)), L = max_length and
Pmax = max_prompt_length:

* P >= L: the row is dropped (``prompt_too_long``).
* P + M > L: the prompt keeps its end, ``P' = max(min(P, L - M), min(P, Pmax))`` tokens (a leading BOS
  stays in front), then each response keeps its start, ``L - P'`` tokens. Every [prompt | response]
  fits in L tokens.

Every row whose prompt could be read also carries ``prompt_digest``, the digest of its canonical prompt
(:func:`~dpo_ray.data.formats.canonical_prompt`, the prompt text before any chat template and before
truncation), which the held-out split hashes and the data report counts distinct prompts by.
"""

from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple, Sequence

import pyarrow as pa

from dpo_ray.data.formats import DropReason, InvalidRow, TextPair, digest_prompt, parse_pair

TOKEN_LIST = pa.list_(pa.int32())
TOKENIZED_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("role", pa.string()),
        ("file", pa.string()),
        ("file_index", pa.int64()),
        ("position", pa.int64()),
        ("prompt_ids", TOKEN_LIST),
        ("chosen_ids", TOKEN_LIST),
        ("rejected_ids", TOKEN_LIST),
        ("num_tokens", pa.int64()),
        ("truncated", pa.bool_()),
        ("drop_reason", pa.string()),
        ("drop_field", pa.string()),
        ("prompt_digest", pa.string()),  # null when the row was dropped before its prompt was read
        ("prompt_rule", pa.string()),  # the PromptRule that found the prompt; null when dropped before that
    ]
)


class TokenizedPair(NamedTuple):
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False

    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def prepend_bos(ids: list[int], bos_id: int | None) -> list[int]:
    """``ids`` with BOS in front, unless there is no BOS or it is already there."""
    return ids if bos_id is None or ids[:1] == [bos_id] else [bos_id, *ids]


def append_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """``ids`` with EOS at the end, unless there is no EOS or the text already ends with it."""
    return ids if eos_id is None or ids[-1:] == [eos_id] else [*ids, eos_id]


def encode_pairs(tokenizer, pairs: Sequence[TextPair]) -> list[TokenizedPair]:
    """Tokenize the prompts and responses of ``pairs`` (batched, no special tokens) and add BOS/EOS."""
    if not pairs:
        return []
    encoded = [tokenizer([getattr(p, f) for p in pairs], add_special_tokens=False)["input_ids"]
               for f in TextPair._fields]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [
        TokenizedPair(prepend_bos(p, bos), append_eos(c, eos), append_eos(r, eos))
        for p, c, r in zip(*encoded)
    ]


def keep_prompt_end(prompt_ids: list[int], length: int, bos_id: int | None) -> list[int]:
    """The last ``length`` tokens of the prompt; a leading BOS is kept in front (it counts in ``length``)."""
    if length >= len(prompt_ids):
        return prompt_ids
    if bos_id is not None and prompt_ids[:1] == [bos_id] and length > 1:
        return [bos_id, *prompt_ids[len(prompt_ids) - length + 1 :]]
    return prompt_ids[len(prompt_ids) - length :]


def truncate_pair(pair: TokenizedPair, max_length: int, max_prompt_length: int,
                  bos_id: int | None = None) -> TokenizedPair:
    """Apply the truncation rules of this module's docstring.

    Raises:
        InvalidRow: ``prompt_too_long`` when the prompt alone reaches ``max_length``.
    """
    p = len(pair.prompt_ids)
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
    if p >= max_length:
        raise InvalidRow(DropReason.PROMPT_TOO_LONG, "prompt")
    if p + longest <= max_length:
        return pair
    kept = max(min(p, max_length - longest), min(p, max_prompt_length))
    room = max_length - kept
    return TokenizedPair(
        keep_prompt_end(pair.prompt_ids, kept, bos_id), pair.chosen_ids[:room], pair.rejected_ids[:room], True
    )


class PairTokenizer:
    """Parsed rows -> tokenized rows (:data:`TOKENIZED_SCHEMA`); called by :func:`tokenize_pair_batch`.

    The tokenizer is loaded once per instance. ``formats`` maps each row's ``role`` (train / eval source) to
    its data format. Rows already marked unusable pass through with their reason; rows that fail
    validation or truncation get theirs here. Rows whose texts were read get their ``prompt_digest``
    (kept also when truncation then drops the row) and their ``prompt_rule`` (the data report counts it
    per source).
    """

    def __init__(self, tokenizer_path: str, formats: dict[str, str], max_length: int, max_prompt_length: int,
                 trust_remote_code: bool = False):
        from dpo_ray.modeling import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
        self.formats = formats
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        reasons = batch.column("drop_reason").to_pylist()
        fields = batch.column("drop_field").to_pylist()
        texts: dict[int, TextPair] = {}
        digests: list[str | None] = [None] * batch.num_rows
        rules: list[str | None] = [None] * batch.num_rows
        roles = batch.column("role").to_pylist()
        for i, record in enumerate(batch.column("record").to_pylist()):
            if reasons[i] is not None:
                continue
            try:
                parsed = parse_pair(json.loads(record), self.formats[roles[i]], self.tokenizer)
            except InvalidRow as err:
                reasons[i], fields[i] = err.reason.value, err.field
                continue
            texts[i], digests[i], rules[i] = parsed.texts, digest_prompt(parsed.prompt), parsed.rule.value
        tokenized: list[TokenizedPair | None] = [None] * batch.num_rows
        for i, pair in zip(texts, encode_pairs(self.tokenizer, list(texts.values()))):
            try:
                tokenized[i] = truncate_pair(pair, self.max_length, self.max_prompt_length, self.tokenizer.bos_token_id)
            except InvalidRow as err:
                reasons[i], fields[i] = err.reason.value, err.field
        return self.build_table(batch, tokenized, reasons, fields, digests, rules)

    @staticmethod
    def build_table(batch: pa.Table, tokenized: list[TokenizedPair | None], reasons: list, fields: list,
                    digests: list, rules: list) -> pa.Table:
        """Assemble the output rows; token columns are null for unusable rows."""
        def column(get):
            return [None if t is None else get(t) for t in tokenized]

        data = {name: batch.column(name) for name in ("row_id", "role", "file", "file_index", "position")}
        data.update(
            prompt_ids=column(lambda t: t.prompt_ids),
            chosen_ids=column(lambda t: t.chosen_ids),
            rejected_ids=column(lambda t: t.rejected_ids),
            num_tokens=column(TokenizedPair.num_tokens),
            truncated=column(lambda t: t.truncated),
            drop_reason=reasons,
            drop_field=fields,
            prompt_digest=digests,
            prompt_rule=rules,
        )
        return pa.table(data, schema=TOKENIZED_SCHEMA)


def stamp_tokenizer_files(tokenizer_path: str) -> tuple:
    """(name, mtime) of each file of a local tokenizer directory; () for a hub id. Part of the cache key, so
    a directory rewritten in place is loaded again."""
    if not os.path.isdir(tokenizer_path):
        return ()
    return tuple(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(tokenizer_path) if e.is_file()))


@functools.lru_cache(maxsize=4)
def load_pair_tokenizer(tokenizer_path: str, formats: tuple, max_length: int, max_prompt_length: int,
                        trust_remote_code: bool, files_stamp: tuple) -> PairTokenizer:
    """One :class:`PairTokenizer` per settings and worker process (``formats`` as sorted (role, format) items)."""
    del files_stamp  # only part of the cache key
    return PairTokenizer(tokenizer_path, dict(formats), max_length, max_prompt_length, trust_remote_code)


def tokenize_pair_batch(batch: pa.Table, tokenizer_path: str, formats: dict[str, str], max_length: int,
                        max_prompt_length: int, trust_remote_code: bool = False) -> pa.Table:
    """Ray Data task UDF: :class:`PairTokenizer` on ``batch``.

    A task, not an actor pool: Ray keeps its worker processes between tasks, so a warm worker reuses the
    imported libraries and the cached tokenizer across stages, datasets and runs of the same job (an actor
    pool would start new processes and load both again every time).
    """
    tokenizer = load_pair_tokenizer(tokenizer_path, tuple(sorted(formats.items())), max_length, max_prompt_length,
                                    trust_remote_code, stamp_tokenizer_files(tokenizer_path))
    return tokenizer(batch)
