"""Turn tokenized preference pairs into model inputs. Imports only torch.

Two layouts, numerically equivalent in fp32:

* **prefix sharing** (the default): one row per pair, ``[prompt | chosen | rejected | pad]``. The
  prompt runs once; rejected tokens attend to the prompt and to themselves but not to chosen; their
  position ids continue from the end of the prompt, as if chosen were not there. The attention masks
  that say so, per layer type, come from :func:`dpo_ray.families.build_prefix_sharing_masks`. Rows are padded to
  the longest row of the batch only (length-bucketed batches keep that small).
* **separate** (the plain path, as TRL does it): two rows per pair, ``[prompt | chosen]`` and
  ``[prompt | rejected]``, padded to a common length, scored from full logits.

A pair is ``(prompt_ids, chosen_ids, rejected_ids)``, each a list of token ids; responses already end
with EOS.
"""

from __future__ import annotations

from typing import Sequence

import torch

Pair = tuple[Sequence[int], Sequence[int], Sequence[int]]

SEG_PAD, SEG_PROMPT, SEG_CHOSEN, SEG_REJECTED = -1, 0, 1, 2


def round_up_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (>= 1)."""
    return -(-length // multiple) * multiple


def build_prefix_sharing_batch(
    pairs: Sequence[Pair], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Pack each pair into one row ``[prompt | chosen | rejected]``.

    Returns a dict of tensors (B pairs, L = longest row, rounded up to ``pad_to_multiple_of``):
        input_ids      [B, L] int64
        position_ids   [B, L] int64; rejected restarts at len(prompt)
        segment_ids    [B, L] int64; SEG_PROMPT / SEG_CHOSEN / SEG_REJECTED / SEG_PAD
        target_batch   [N] int64 row of each response token (N = all response tokens of the batch)
        target_pos     [N] int64 position whose hidden state predicts the token
        target_ids     [N] int64 the token
        target_seq     [N] int64 2*b for chosen of pair b, 2*b + 1 for rejected
        chosen_lengths, rejected_lengths  [B] int64 response token counts
    """
    if not pairs:
        raise ValueError("cannot build a batch from zero pairs")
    length = round_up_length(max(len(p) + len(c) + len(r) for p, c, r in pairs), pad_to_multiple_of)
    bsz = len(pairs)
    input_ids = torch.full((bsz, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((bsz, length), dtype=torch.long)
    segment_ids = torch.full((bsz, length), SEG_PAD, dtype=torch.long)
    t_batch, t_pos, t_ids, t_seq = [], [], [], []
    for b, (prompt, chosen, rejected) in enumerate(pairs):
        n_p, n_c, n_r = len(prompt), len(chosen), len(rejected)
        if n_p == 0 or n_c == 0 or n_r == 0:
            raise ValueError(f"pair {b} has an empty prompt or response; the data stage must drop it")
        row = torch.tensor(list(prompt) + list(chosen) + list(rejected), dtype=torch.long)
        input_ids[b, : row.numel()] = row
        position_ids[b, : n_p + n_c] = torch.arange(n_p + n_c)
        position_ids[b, n_p + n_c : n_p + n_c + n_r] = torch.arange(n_p, n_p + n_r)
        segment_ids[b, :n_p] = SEG_PROMPT
        segment_ids[b, n_p : n_p + n_c] = SEG_CHOSEN
        segment_ids[b, n_p + n_c : n_p + n_c + n_r] = SEG_REJECTED
        # Chosen token i (at n_p + i) is predicted by position n_p + i - 1: the last prompt token first.
        t_pos.append(torch.arange(n_p - 1, n_p + n_c - 1))
        # Rejected token j (at n_p + n_c + j) is predicted by the last prompt token for j = 0, then by
        # the rejected token before it: never by a chosen position.
        t_pos.append(torch.cat([torch.tensor([n_p - 1]), torch.arange(n_p + n_c, n_p + n_c + n_r - 1)]))
        t_ids.append(torch.as_tensor(list(chosen), dtype=torch.long))
        t_ids.append(torch.as_tensor(list(rejected), dtype=torch.long))
        t_seq.append(torch.full((n_c,), 2 * b, dtype=torch.long))
        t_seq.append(torch.full((n_r,), 2 * b + 1, dtype=torch.long))
        t_batch.append(torch.full((n_c + n_r,), b, dtype=torch.long))
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "target_batch": torch.cat(t_batch),
        "target_pos": torch.cat(t_pos),
        "target_ids": torch.cat(t_ids),
        "target_seq": torch.cat(t_seq),
        "chosen_lengths": torch.tensor([len(c) for _, c, _ in pairs], dtype=torch.long),
        "rejected_lengths": torch.tensor([len(r) for _, _, r in pairs], dtype=torch.long),
    }


def build_separate_batch(
    pairs: Sequence[Pair], pad_id: int, padding_side: str = "right", pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Two rows per pair: rows 0..B-1 are ``[prompt | chosen]``, rows B..2B-1 ``[prompt | rejected]``, padded
    to the longest row rounded up to ``pad_to_multiple_of``.

    Returns:
        input_ids [2B, T], attention_mask [2B, T], loss_mask [2B, T] (1 on response tokens only),
        position_ids [2B, T] (0.. from the first real token, whichever side is padded),
        chosen_lengths, rejected_lengths [B] response token counts.
    """
    seqs = [(list(p), list(c)) for p, c, _ in pairs] + [(list(p), list(r)) for p, _, r in pairs]
    length = round_up_length(max(len(p) + len(y) for p, y in seqs), pad_to_multiple_of)
    n = len(seqs)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    loss_mask = torch.zeros((n, length), dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    for i, (p, y) in enumerate(seqs):
        total = len(p) + len(y)
        start = 0 if padding_side == "right" else length - total
        input_ids[i, start : start + total] = torch.tensor(p + y, dtype=torch.long)
        attention_mask[i, start : start + total] = 1
        loss_mask[i, start + len(p) : start + total] = 1
        position_ids[i, start : start + total] = torch.arange(total)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "chosen_lengths": torch.tensor([len(c) for _, c, _ in pairs], dtype=torch.long),
        "rejected_lengths": torch.tensor([len(r) for _, _, r in pairs], dtype=torch.long),
    }


def order_by_length_buckets(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Length-bucketed batches: shuffle, then sort within windows of 8 batches and cut.

    Pairs of similar length land in one batch, so rows are padded little, while the order of the
    batches stays random. Returns a list of index lists, each of ``batch_size`` (the last may be short).
    """
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 8
    batches: list[list[int]] = []
    for start in range(0, len(perm), window):
        chunk = sorted(perm[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def build_sft_batch(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Right-padded rows ``[prompt | response | pad]`` for B ``(prompt_ids, response_ids)`` examples.

    Uses the separate pair layout (:func:`build_separate_batch`, whose first B rows are
    ``[prompt | chosen]``) and keeps those rows.

    Returns:
        input_ids [B, T], attention_mask [B, T], loss_mask [B, T] (1 on response tokens), position_ids [B, T];
        T = the longest row.
    """
    full = build_separate_batch([(p, r, r) for p, r in examples], pad_id)
    n = len(examples)
    return {k: full[k][:n].to(device) for k in ("input_ids", "attention_mask", "loss_mask", "position_ids")}
