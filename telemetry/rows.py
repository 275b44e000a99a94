"""Arrow sample tables as the merge sees them (:mod:`telemetry.merge`): series codes from
dictionary-encoded key columns, float columns, and the canonical order of conflicting duplicates.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from telemetry.schema import SERIES_KEYS


def dictionary_codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[str]]:
    """Per row the index of its value in a list of distinct values (null → -1), and that list.

    A dictionary-encoded column keeps its codes: the chunks' dictionaries are unified, and only
    when the result repeats a value (legal in a Parquet dictionary page, so possible in a hostile
    file) are the strings encoded afresh, so equal values always share one code.
    """
    if isinstance(column, pa.Array):
        column = pa.chunked_array([column])
    if pa.types.is_dictionary(column.type):
        unified = column.unify_dictionaries()
        dictionary = (
            unified.chunk(0).dictionary if unified.num_chunks else pa.array([], pa.string())
        )
        if len(pc.unique(dictionary)) != len(dictionary):
            return dictionary_codes(column.cast(column.type.value_type))
        encoded = unified
    else:
        encoded = pc.dictionary_encode(column)
        combined = encoded.combine_chunks() if encoded.num_chunks != 1 else encoded.chunk(0)
        dictionary = combined.dictionary
        encoded = pa.chunked_array([combined])
    indices = [chunk.indices for chunk in encoded.chunks]
    codes = (
        np.concatenate(
            [np.asarray(pc.fill_null(i, -1).to_numpy(zero_copy_only=False), np.int64)
             for i in indices]
        )
        if indices
        else np.zeros(0, np.int64)
    )  # fmt: skip
    return codes, [str(v) for v in dictionary.to_pylist()]


def series_codes(table: pa.Table, name: str) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Integer code per row for the table's series key, and the key tuple of each code.

    Each key column is dictionary-encoded on its own and the codes combined, so no value of a
    key (whatever characters it holds) can make two series collide.
    """
    combined = np.zeros(table.num_rows, dtype=np.int64)
    dictionaries: list[list[str]] = []
    for key in SERIES_KEYS[name]:
        codes, dictionary = dictionary_codes(table.column(key))
        dictionaries.append(dictionary)
        combined = combined * max(1, len(dictionary)) + codes
    space = 1
    for dictionary in dictionaries:
        space *= max(1, len(dictionary))
    if space <= max(1 << 16, 4 * table.num_rows):
        # Few possible keys (a node's GPUs, a cluster's jobs): rank them by a presence table, the
        # same sorted codes np.unique gives, without sorting every row.
        present = np.zeros(space, dtype=bool)
        present[combined] = True
        unique = np.nonzero(present)[0]
        rank = np.cumsum(present) - 1
        inverse = rank[combined]
    else:
        unique, inverse = np.unique(combined, return_inverse=True)
    labels = []
    for code in unique.tolist():
        parts, rest = [], code
        for dictionary in reversed(dictionaries):
            rest, index = divmod(rest, len(dictionary))
            parts.append(dictionary[index])
        labels.append(tuple(reversed(parts)))
    return inverse.astype(np.int64), labels


def float_column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 with nulls as NaN."""
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)


def canonical_duplicates(table: pa.Table, order: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``order`` with each run of duplicates (same series and time) led by a canonical row.

    Rows that share a series and a time but differ elsewhere would otherwise be chosen by read
    order, and the bill would depend on how rows were split into files. The run's rows are
    sorted by every column and the first is kept, whatever order they arrived in.
    """
    n = keep.size
    in_run = ~keep.copy()
    in_run[:-1] |= ~keep[1:]  # the first row of a run is followed by a dropped one
    positions = np.nonzero(in_run)[0]
    run_id = np.cumsum(keep)[positions]
    subset = table.take(pa.array(order[positions]))
    for i, field in enumerate(subset.schema):  # Arrow sorts strings, not dictionary codes
        if pa.types.is_dictionary(field.type):
            subset = subset.set_column(i, field.name, subset.column(i).cast(field.type.value_type))
    subset = subset.append_column("__run", pa.array(run_id))
    keys = [("__run", "ascending")] + [(name, "ascending") for name in table.column_names]
    ranked = pc.sort_indices(subset, sort_keys=keys).to_numpy()  # nulls sort last
    first_of_run = np.ones(ranked.size, dtype=bool)
    first_of_run[1:] = run_id[ranked][1:] != run_id[ranked][:-1]
    leaders = ranked[first_of_run]
    result = order.copy()
    lead_positions = positions[np.nonzero(keep[positions])[0]]
    result[lead_positions] = order[positions[leaders]]
    assert lead_positions.size == leaders.size <= n
    return result


class ArrowRows:
    """A validated Arrow table of sample table ``name`` as :func:`telemetry.merge.merge_rows`
    reads it."""

    def __init__(self, table: pa.Table, name: str) -> None:
        self.table = table
        self.name = name
        self.num_rows = table.num_rows

    def has(self, column: str) -> bool:
        return column in self.table.column_names

    def times(self) -> np.ndarray:
        times: np.ndarray = self.table.column("time").cast(pa.int64()).to_numpy()
        return times

    def floats(self, column: str) -> np.ndarray:
        return float_column(self.table, column)

    def series_codes(self) -> tuple[np.ndarray, list[tuple[str, ...]]]:
        return series_codes(self.table, self.name)

    def take(self, rows: np.ndarray) -> pa.Table:
        return self.table.take(pa.array(rows))

    def canonical_order(self, order: np.ndarray, keep: np.ndarray) -> np.ndarray:
        return canonical_duplicates(self.table, order, keep)


def concat_arrow(earlier: pa.Table, new: pa.Table) -> pa.Table:
    """``earlier`` rows then ``new`` ones (string columns plain in one and codes in the other are
    cast to ``new``'s types); ``merge.concat`` does not call it for an empty ``earlier``."""
    if earlier.schema != new.schema:
        earlier = earlier.cast(new.schema)
    return pa.concat_tables([earlier, new])
