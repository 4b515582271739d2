"""What one search may ask of a backend: its size, checked before it is planned, and its
estimated cost, checked once it is planned — both before any backend is asked.

A FHIR query string is cheap to send and can be expensive to answer: 2,000 ``name=a`` make
a statement of 8,000 nodes, and ``address=a0,...,a49`` asks for 250 unindexed substring
tests per patient. The estimate is deliberately simple (it is a guard, not a planner):

    cost = OR width * unindexed string predicates * tables touched

* OR width: how many alternatives the criteria expand to (an OR adds its alternatives, an
  AND takes its widest part);
* string predicates: text matches (every string search folds case and accents, so no
  index serves it); at least 1;
* tables touched: 1 + each other table (join or child) the criteria read, a chained
  parameter's or ``_has``'s subquery included (its table and those its criteria read: its
  text predicates and alternatives count as the search's own).

``family=smith&gender=female`` costs 1, ``name=bronte`` 9 (three columns), ``address=x`` 50
(five columns of a child table), ``_id`` with 100 ids 100; ``address=a0,...,a49`` 125,000.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from adapters.base import And, Chain, Criterion, Not, Or, Text
from gateway.errors import SearchTooCostly, TooManyParameters, TooManyValues
from gateway.search import split_values

FORMAT_ONLY = frozenset({"_format", "_pretty"})


def check_size(pairs: Sequence[tuple[str, str]], max_parameters: int, max_values: int) -> None:
    """400 for more parameters, or more values in one parameter, than allowed (0: no cap)."""
    counted = [(k, v) for k, v in pairs if k not in FORMAT_ONLY]
    if max_parameters and len(counted) > max_parameters:
        raise TooManyParameters(
            f"the search has {len(counted)} parameters; at most {max_parameters} are accepted")
    if not max_values:
        return
    for key, raw in counted:
        # a cheap bound first: n values need n - 1 commas
        if raw.count(",") >= max_values and len(split_values(raw)) > max_values:
            name = key.partition(":")[0]
            raise TooManyValues(
                f"search parameter '{name[:64]}' has more than {max_values} values",
                expression=name[:64])


def estimate(criteria: Criterion | None, main_alias: str) -> int:
    if criteria is None:
        return 1
    width, texts, aliases = _walk(criteria)
    others = {a for a in aliases if a != main_alias}
    return max(1, width) * max(1, texts) * (1 + len(others))


def _walk(c: Criterion) -> tuple[int, int, set[Hashable]]:
    """(OR width, text predicates, table aliases) of a criteria tree."""
    if isinstance(c, And | Or):
        parts = [_walk(i) for i in c.items]
        widths = [w for w, _, _ in parts]
        aliases: set[Hashable] = set().union(*(a for _, _, a in parts))
        return (sum(widths) if isinstance(c, Or) else max(widths),
                sum(t for _, t, _ in parts), aliases)
    if isinstance(c, Not):
        return _walk(c.item)
    if isinstance(c, Chain):
        # A subquery over the other mapping: its aliases are its own (the same name as the
        # outer query's is another read of a table), so each is kept apart by this node.
        width, texts, inner = (1, 0, set()) if c.criteria is None else _walk(c.criteria)
        tables: set[Hashable] = {(id(c), a) for a in inner | _alias(c.target_ref)}
        return width, texts, _alias(c.ref) | tables
    return 1, int(isinstance(c, Text)), _alias(getattr(c, "ref", None))


def _alias(ref: object) -> set[Hashable]:
    return {ref.split(".", 1)[0]} if isinstance(ref, str) and "." in ref else set()


def check_cost(criteria: Criterion | None, key_ref: str, budget: int) -> None:
    """400 ``SEARCH_TOO_COSTLY`` when the estimate is over ``budget`` (0: no budget)."""
    if not budget:
        return
    cost = estimate(criteria, key_ref.split(".", 1)[0])
    if cost > budget:
        raise SearchTooCostly(
            f"the search is too costly to run (estimated {cost}, budget {budget}): use fewer "
            "alternatives (comma-separated values) or fewer text parameters")
