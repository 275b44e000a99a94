"""Metric families held as columns, and the Prometheus text format rendered from them.

A scrape of a large node (or of the cluster aggregator) renders tens of thousands of samples.
prometheus-client builds one Python object per sample and formats each line on its own; here a
family is a few string columns and a float64 array, label values are escaped once per column
(a column shared by several families is escaped once per scrape), and every line of a large
block is built by one Arrow kernel. Small blocks (a node's own scrape) are formatted in Python,
and so are large ones where the caller says so: the node daemon never loads Arrow. The text
is byte for byte what ``generate_latest`` writes for the same families (labels sorted by name,
Go-style floats); ``to_client_metric`` gives the same family to prometheus-client for
OpenMetrics and for tests that hold the two equal.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa
    from prometheus_client.core import Metric

# A label's values: an Arrow string array, Python strings, or one string for every sample.
LabelColumn: TypeAlias = "pa.Array | list[str] | str"


@dataclass
class Block:
    """Samples sharing one layout: a column (or a constant) per label, and the values.

    NaN values are not exported (no reading); columns are label values as strings.
    """

    columns: Sequence[LabelColumn]
    values: np.ndarray


@dataclass
class ColumnFamily:
    """One metric family (``name`` without ``_total``) as blocks of columns."""

    name: str
    kind: str  # "counter" or "gauge"
    documentation: str
    labels: tuple[str, ...]
    blocks: list[Block] = field(default_factory=list)
    # False: a counter exposed under its bare name, as dcgm-exporter does (text format only;
    # OpenMetrics has no counter without ``_total``, so there it is ``unknown``).
    total_suffix: bool = True

    def add(self, columns: Sequence[LabelColumn], values: np.ndarray) -> None:
        """Append a block; NaN values are samples not to export (no reading)."""
        array = np.asarray(values, dtype=np.float64)
        if array.size:
            self.blocks.append(Block(list(columns), array))


def strings(values: Sequence[str]) -> list[str]:
    """A label column from Python strings."""
    return list(values)


def label_values(column: pa.Array | list[str]) -> list[str]:
    """A label column's values as Python strings."""
    return column if isinstance(column, list) else [str(v) for v in column.to_pylist()]


@functools.cache
def _arrow() -> Any:
    """pyarrow, pyarrow.compute and the scalars the large-block path joins with, imported on
    the first large block. Literals go in as Arrow scalars: a Python str argument makes pyarrow
    try to import dateutil on every call (to parse it as a date), which costs more than the join
    itself."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def text(value: str) -> pa.Scalar:
        return pa.scalar(value, pa.string())

    return SimpleNamespace(
        pa=pa,
        pc=pc,
        empty=text(""),
        dot=text("."),
        nothing=text(""),
        dot_zero_line=text(".0\n"),
        line=text("\n"),
    )


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_column(column: pa.Array) -> pa.Array:
    arrow = _arrow()
    pa, pc = arrow.pa, arrow.pc
    if column.type in (pa.string(), pa.large_string()):
        # Label values seldom hold a backslash, newline or quote: one search of the values'
        # bytes (the whole buffer; a slice's neighbours can only cause a needless escape) is
        # 50 times cheaper than the three replacements.
        data = column.buffers()[2]
        raw = b"" if data is None else data.to_pybytes()
        if b"\\" not in raw and b"\n" not in raw and b'"' not in raw:
            return column
    escaped = pc.replace_substring(column, "\\", "\\\\")
    escaped = pc.replace_substring(escaped, "\n", "\\n")
    return pc.replace_substring(escaped, '"', '\\"')


def go_float(value: float) -> str:
    """A float as Prometheus' text format writes it (Go's shortest form, ``+Inf``, ``NaN``)."""
    if -math.inf < value < 1e6:  # most values: repr's form is the client's (NaN is not here)
        return repr(value)
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    # prometheus-client switches to an exponent from 7 integer digits on, as Go does.
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


# Arrow's float → string cast writes the shortest round-trip digits, as repr() does, 6× faster;
# it differs from the client's format only where these masks say, and those are mended below.
_REPR_FROM = 1e-4  # below this, repr() switches to an exponent and Arrow does not
_GO_EXPONENT_FROM, _GO_EXPONENT_TO = 1e6, 1e16


def _value_strings(values: np.ndarray) -> tuple[pa.Array, pa.Array | str]:
    """``go_float`` of every value, as the texts and what follows each: ``.0\n`` after an integral
    value under 1e6 (Arrow writes "69", repr "69.0"), else a newline. Positives in [1e6, 1e16)
    take the client's exponent form; the few values whose form Arrow does not share (tiny,
    large negative, non-finite) are written by ``go_float`` itself."""
    arrow = _arrow()
    pa, pc = arrow.pa, arrow.pc
    out = pc.cast(pa.array(values, pa.float64()), pa.string())
    magnitude = np.abs(values)
    finite = np.isfinite(values)
    python = ~finite | ((magnitude < _REPR_FROM) & (values != 0)) | (values <= -_GO_EXPONENT_FROM)
    big = finite & (values >= _GO_EXPONENT_FROM) & (values < _GO_EXPONENT_TO)
    if big.any():
        # Arrow writes the larger of these with an exponent already (the client's form, as the
        # tests check); the plain decimals among them _exponent_form rewrites.
        mask = pa.array(big)
        chosen = pc.filter(out, mask)
        plain = pc.invert(pc.match_substring(chosen, "e"))
        if pc.any(plain).as_py():
            chosen = pc.replace_with_mask(chosen, plain, _exponent_form(pc.filter(chosen, plain)))
        out = pc.replace_with_mask(out, mask, chosen)
    if python.any():
        mask = pa.array(python)
        texts = [go_float(v) for v in values[python].tolist()]
        out = pc.replace_with_mask(out, mask, pa.array(texts, pa.string()))
    integral = finite & (magnitude < _GO_EXPONENT_FROM) & (values == np.trunc(values)) & ~python
    if not integral.any():
        return out, "\n"
    if integral.all():
        return out, ".0\n"
    return out, pc.if_else(pa.array(integral), arrow.dot_zero_line, arrow.line)


def _exponent_form(texts: pa.Array) -> pa.Array:
    """``go_float`` of positives in [1e6, 1e16) written as plain decimals, with or without a
    fraction ("1234567.5" → "1.2345675e+06", "100000000" → "1e+08"), by Arrow kernels, one pass
    per integer-part length (there are ten): bytes, joules and counters are most of a large
    scrape's values, and one Python call each cost the most."""
    arrow = _arrow()
    pa, pc = arrow.pa, arrow.pc
    dots = pc.find_substring(texts, ".").to_numpy()
    whole = dots < 0
    if whole.any():
        dots = np.where(whole, pc.utf8_length(texts).to_numpy(), dots)
    order = np.argsort(dots, kind="stable")
    parts: list[Any] = []
    for dot in np.unique(dots).tolist():
        group = texts.take(pa.array(order[dots[order] == dot]))
        digits = pc.replace_substring(group, ".", "", max_replacements=1)
        mantissa = pc.binary_join_element_wise(
            pc.utf8_slice_codeunits(digits, 0, 1),
            arrow.dot,
            pc.utf8_slice_codeunits(digits, 1),
            arrow.nothing,
        )
        exponent = pa.scalar(f"e+{dot - 1:02d}", pa.string())
        parts.append(
            pc.binary_join_element_wise(
                pc.utf8_rtrim(mantissa, characters="0."), exponent, arrow.nothing
            )
        )
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    return pa.concat_arrays(parts).take(pa.array(inverse))


# Below this many samples a block is formatted in Python: each Arrow call costs microseconds of
# overhead, which only pays off over many rows (a node's own exposition is mostly small blocks).
_ARROW_FROM_ROWS = 256


class PrefixCache:
    """``name{labels} `` of each small-block series, by family (name and label names) and raw
    label values, kept across scrapes: a node's series keep their labels from one scrape to the
    next, so escaping and joining them is done once per series, not per scrape. Emptied when it
    holds more than 65,536 series (series that went away: ended jobs)."""

    def __init__(self) -> None:
        self._families: dict[tuple[str, ...], dict[tuple[str, ...], str]] = {}

    def __len__(self) -> int:
        return sum(map(len, self._families.values()))

    def family(self, key: tuple[str, ...]) -> dict[tuple[str, ...], str]:
        """The prefixes of family ``key`` (name, then label names), by label values."""
        found = self._families.get(key)
        if found is None:
            found = self._families[key] = {}
        return found

    def clear(self) -> None:
        self._families.clear()


@functools.lru_cache(maxsize=256)
def _label_order(labels: tuple[str, ...]) -> tuple[int, ...]:
    """The indices of ``labels`` in the order the text format writes them (by name)."""
    return tuple(sorted(range(len(labels)), key=lambda i: labels[i]))


def _block_text_small(
    name: str, labels: tuple[str, ...], block: Block, prefixes: PrefixCache | None = None
) -> bytes:
    order = _label_order(labels)
    n = block.values.size
    columns: list[list[str]] = []
    for i in order:
        column = block.columns[i]
        columns.append([column] * n if isinstance(column, str) else label_values(column))
    names = [labels[i] for i in order]
    cache = (PrefixCache() if prefixes is None else prefixes).family((name, *names))
    keys = list(zip(*columns, strict=True)) if names else [()] * n
    if len(keys) != n:
        raise ValueError(f"{name}: {len(keys)} label values for {n} samples")
    values = block.values.tolist()
    if not values:
        return b""
    heads = list(map(cache.get, keys))
    if None in heads:  # series new to this scrape: their labels escaped and joined once
        for i, (key, head) in enumerate(zip(keys, heads, strict=True)):
            if head is None:
                pairs = ",".join(
                    f'{k}="{_escape_label(v)}"' for k, v in zip(names, key, strict=True)
                )
                heads[i] = cache[key] = f"{name}{{{pairs}}} " if names else f"{name} "
    total = sum(values)
    if -math.inf < total < math.inf:  # every value finite (a NaN or an infinity would show)
        # repr is go_float below 1e6, and of every negative value
        texts = map(repr, values) if max(values) < 1e6 else map(go_float, values)
        filled = cast("list[str]", heads)
        return "".join(chain.from_iterable(zip(filled, texts, repeat("\n")))).encode()
    isnan = math.isnan
    lines = []
    for head, value in zip(heads, values, strict=True):
        if isnan(value):  # no reading
            continue
        lines.append(f"{head}{go_float(value)}\n")
    return "".join(lines).encode()


def _join_rows(parts: list[Any]) -> pa.Array:
    """``parts`` (string arrays of one length, and literals) joined row by row."""
    arrow = _arrow()
    pa = arrow.pa
    return arrow.pc.binary_join_element_wise(
        *[pa.scalar(p, pa.string()) if isinstance(p, str) else p for p in parts], arrow.empty
    )


def _joined_span(span: list[Any], cache: dict[Any, tuple[Any, Any]]) -> pa.Array:
    """The label columns of ``span`` and the literals between them joined row by row, once a
    scrape: the families of one entity (a GPU's dozen) share their label columns, and one join
    of a series' labels and its value is 2-3 times cheaper than a join of every part. Keyed by
    the columns' identities; the cache holds them, so no id can be reused meanwhile."""
    key = ("span", *(p if isinstance(p, str) else id(p) for p in span))
    held = cache.get(key)
    arrays = tuple(p for p in span if not isinstance(p, str))
    if held is None or any(a is not b for a, b in zip(held[0], arrays, strict=True)):
        held = cache[key] = (arrays, _join_rows(span))
    return held[1]


def _block_text(
    name: str,
    labels: tuple[str, ...],
    block: Block,
    cache: dict[Any, tuple[Any, Any]],
    prefixes: PrefixCache | None = None,
    use_arrow: bool = True,
) -> bytes:
    if not use_arrow or block.values.size < _ARROW_FROM_ROWS:
        return _block_text_small(name, labels, block, prefixes)
    keep = ~np.isnan(block.values)
    if not keep.any():
        return b""
    arrow = _arrow()
    pa, pc = arrow.pa, arrow.pc
    everything = bool(keep.all())
    heads: list[Any] = []  # the series' names and labels: literals and escaped label columns
    literal = name
    order = sorted(range(len(labels)), key=lambda i: labels[i])
    for n, i in enumerate(order):
        literal += ("{" if n == 0 else ",") + f'{labels[i]}="'
        column = block.columns[i]
        if isinstance(column, str):
            literal += _escape_label(column) + '"'
            continue
        # Keyed by identity, holding the column so that its id cannot be reused meanwhile.
        held = cache.get(id(column))
        if held is None or held[0] is not column:
            values = pa.array(column, pa.string()) if isinstance(column, list) else column
            held = cache[id(column)] = (column, _escape_column(values))
        heads.extend([literal, held[1]])
        literal = '"'
    heads.append(literal + ("} " if labels else " "))
    if len(heads) > 3:  # two label columns or more: [literal, column, ..., column, literal]
        heads = [heads[0], _joined_span(heads[1:-1], cache), heads[-1]]
    if not everything:
        mask = pa.array(keep)
        heads = [h if isinstance(h, str) else pc.filter(h, mask) for h in heads]
    values = block.values if everything else block.values[keep]
    texts, line_ends = _value_strings(values)
    lines = _join_rows([*heads, texts, line_ends])
    # The lines lie back to back in the array's data buffer: that buffer is the block's text.
    _, offsets, data = lines.buffers()
    bounds = np.frombuffer(offsets, dtype=np.int32)[lines.offset : lines.offset + len(lines) + 1]
    return bytes(memoryview(data)[int(bounds[0]) : int(bounds[-1])])


def render_text(
    families: Iterable[ColumnFamily],
    prefixes: PrefixCache | None = None,
    openmetrics: bool = False,
    arrow: bool = True,
) -> bytes:
    """The Prometheus text format (0.0.4) of ``families``, as ``generate_latest`` writes it; with
    ``openmetrics``, OpenMetrics 1.0.0 as prometheus-client's OpenMetrics ``generate_latest``
    writes the same families (:func:`to_client_metric`): HELP and TYPE name the family without
    ``_total``, a counter without the suffix is ``unknown``, and ``# EOF`` ends it.

    ``prefixes`` (one per exporter) keeps small-block series prefixes from scrape to scrape;
    ``arrow`` False formats large blocks in Python too (the node daemon, which never loads Arrow).
    """
    out: list[bytes] = []
    cache: dict[Any, tuple[Any, Any]] = {}
    for family in families:
        counter = family.kind == "counter"
        name = family.name + "_total" if counter and family.total_suffix else family.name
        doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        if openmetrics:
            kind = "unknown" if counter and not family.total_suffix else family.kind
            doc = doc.replace('"', r"\"")
            out.append(f"# HELP {family.name} {doc}\n# TYPE {family.name} {kind}\n".encode())
        else:
            out.append(f"# HELP {name} {doc}\n# TYPE {name} {family.kind}\n".encode())
        for block in family.blocks:
            out.append(_block_text(name, family.labels, block, cache, prefixes, arrow))
    if prefixes is not None and len(prefixes) > 65536:
        prefixes.clear()  # series come and go (jobs); a node's own scrape holds a few thousand
    if openmetrics:
        out.append(b"# EOF\n")
    return b"".join(out)


def to_client_metric(family: ColumnFamily) -> Metric:
    """The same family as a prometheus-client metric (one object per sample: the slow path;
    prometheus-client is imported here, not by a daemon that renders its own text)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, UnknownMetricFamily

    cls: type[CounterMetricFamily | GaugeMetricFamily | UnknownMetricFamily] = GaugeMetricFamily
    if family.kind == "counter":
        cls = CounterMetricFamily if family.total_suffix else UnknownMetricFamily
    metric = cls(family.name, family.documentation, labels=list(family.labels))
    for block in family.blocks:
        n = block.values.size
        columns = [[c] * n if isinstance(c, str) else label_values(c) for c in block.columns]
        for i, value in enumerate(block.values.tolist()):
            if not math.isnan(value):
                metric.add_metric([column[i] for column in columns], value)
    return metric
