"""Text folding shared by the gateway and the adapters: one definition of "matches".

String search compares values lower-cased with accents removed, on both sides: the gateway
folds the search value, the SQL adapter folds the column (a registered function on SQLite,
an equivalent expression on other databases).
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache


def fold(text: str) -> str:
    """Lower case without accents."""
    if text.isascii():  # the common case for legacy PAS data, and 10x cheaper
        return text.lower()
    return _fold_unicode(text)


@lru_cache(maxsize=4096)
def _fold_unicode(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()
