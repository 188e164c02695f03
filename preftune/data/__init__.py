"""Preference data: load and normalize rows (formats), tokenize pairs (tokenize), batch them
(batching), and the bundled demo tasks (demo). Nothing heavy is imported here."""

from preftune.data.formats import (
    DataError,
    NormalizedData,
    PreferencePair,
    load_rows,
    normalize,
    skipped_summary,
    write_skipped,
)
from preftune.data.tokenize import Dropped, TokenizedPairs, tokenize_dataset, tokenize_pair

__all__ = [
    "DataError",
    "Dropped",
    "NormalizedData",
    "PreferencePair",
    "TokenizedPairs",
    "load_rows",
    "normalize",
    "skipped_summary",
    "tokenize_dataset",
    "tokenize_pair",
    "write_skipped",
]
