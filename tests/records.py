"""Hypothesis strategies for any msgspec record, from msgspec's own description of its type
(msgspec.inspect), so that a field added to a record is generated without a change here."""

from typing import Any

import msgspec
import msgspec.inspect
from hypothesis import strategies as st


def json_values() -> st.SearchStrategy[Any]:
    """Any value JSON carries exactly (no NaN, no integer past 64 bits)."""
    scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | finite | st.text()
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=8,
    )


finite = st.floats(allow_nan=False, allow_infinity=False)


def strategy_for(info: msgspec.inspect.Type) -> st.SearchStrategy[Any]:
    """Any value of the type msgspec describes as `info`, that JSON carries exactly."""
    inspect = msgspec.inspect
    if isinstance(info, inspect.StructType):
        return st.builds(info.cls, **{f.name: strategy_for(f.type) for f in info.fields})
    if isinstance(info, inspect.UnionType):
        return st.one_of([strategy_for(t) for t in info.types])
    if isinstance(info, inspect.ListType):
        return st.lists(strategy_for(info.item_type), max_size=3)
    if isinstance(info, inspect.DictType):
        return st.dictionaries(st.text(), strategy_for(info.value_type), max_size=3)
    if isinstance(info, inspect.LiteralType):
        return st.sampled_from(info.values)
    simple: dict[type, st.SearchStrategy[Any]] = {
        inspect.StrType: st.text(),
        inspect.IntType: st.integers(-(2**63), 2**63 - 1),
        inspect.FloatType: finite,
        inspect.BoolType: st.booleans(),
        inspect.NoneType: st.none(),
        inspect.AnyType: json_values(),
    }
    return simple[type(info)]


def records_of(kind: Any) -> st.SearchStrategy[Any]:
    """Any value of `kind` (a record, a union of records, a list of them...)."""
    return strategy_for(msgspec.inspect.type_info(kind))
