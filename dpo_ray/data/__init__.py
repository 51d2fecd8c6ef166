"""Preference data on Ray Data: reading, validation, tokenization, the data report and reference log-probs.

The trainer calls :func:`prepare_data`; :func:`read_preference_texts` feeds the tiny model's tokenizer.
"""

from dpo_ray.data.formats import DataValidationError
from dpo_ray.data.pipeline import PreparedData, prepare_data
from dpo_ray.data.reading import read_preference_texts

__all__ = ["DataValidationError", "PreparedData", "prepare_data", "read_preference_texts"]
