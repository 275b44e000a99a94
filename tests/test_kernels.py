"""The array kernels against hand-computed cases and the plain-Python reference of SPEC §3."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from tests.support import reference as ref
from tests.support.units import NS

T0 = 1_788_220_800 * NS  # 2026-09-01T00:00:00Z
GAP = 60 * NS
NAN = float("nan")


def _pipeline(codes: list[int], times: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Original indices of the kept rows in (series, time) order, and their codes and times."""
    c = np.asarray(codes, dtype=np.int64)
    t = np.asarray(times, dtype=np.int64)
    order = kernels.series_order(c, t)
    keep = kernels.dedup_mask(c[order], t[order])
    idx = order[keep]
    return idx, c[idx], t[idx]


# --- hand-computed cases ------------------------------------------------------------------------


def test_series_order_sorts_by_series_then_time_and_is_stable() -> None:
    codes = np.array([2, 1, 2, 1, 1], dtype=np.int64)
    times = np.array([5, 9, 1, 3, 9], dtype=np.int64)
    order = kernels.series_order(codes, times)
    # (1,3)@3, (1,9)@1, (1,9)@4 (input order kept), (2,1)@2, (2,5)@0
    assert order.tolist() == [3, 1, 4, 2, 0]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 20)), max_size=50),
    st.sampled_from([1, 2**58]),
)
def test_series_order_packed_key_equals_lexsort(pairs: list[tuple[int, int]], scale: int) -> None:
    """Packed (code, time) keys sort like the two-key lexsort, ties in input order; a time span
    of 2^62 does not fit the packed key and takes the lexsort itself."""
    codes = np.array([p[0] for p in pairs], dtype=np.int64)
    times = np.array([p[1] * scale for p in pairs], dtype=np.int64)
    expected = sorted(range(len(pairs)), key=lambda i: (pairs[i][0], pairs[i][1], i))
    assert kernels.series_order(codes, times).tolist() == expected


def test_dedup_mask_keeps_first_of_each_series_time() -> None:
    codes = np.array([1, 1, 1, 2, 2, 3], dtype=np.int64)
    times = np.array([10, 10, 20, 20, 20, 10], dtype=np.int64)
    # same time in another series is not a duplicate
    assert kernels.dedup_mask(codes, times).tolist() == [True, False, True, True, False, True]


def test_duplicate_first_occurrence_wins_through_contributions() -> None:
    # row 1 duplicates row 0 (same series, same time) with different values: row 0 counts.
    idx, c, t = _pipeline([7, 7, 7], [T0, T0, T0 + 10 * NS])
    assert idx.tolist() == [0, 2]
    util = np.array([0.0, 1.0, 0.5], dtype=np.float32)[idx]
    energy = np.array([100.0, 900.0, 150.0])[idx]
    power = np.full(3, NAN, dtype=np.float32)[idx]
    iv = kernels.intervals(c, t, GAP)
    parts = kernels.gpu_contributions(iv, util, energy, power)
    assert parts["capacity_us"].tolist() == [0, 10_000_000]
    assert parts["busy_us"].tolist() == [0, 5_000_000]
    assert parts["energy_mj"].tolist() == [0, 50_000]  # 150 - 100, not 150 - 900 → restart


def test_intervals_first_row_gap_and_boundary() -> None:
    codes = np.array([1, 1, 1, 1, 2], dtype=np.int64)
    times = np.array([0, 10 * NS, 70 * NS, 70 * NS + GAP + 1, 5 * NS], dtype=np.int64)
    iv = kernels.intervals(codes, times, GAP)
    assert iv.dt_ns.tolist() == [0, 10 * NS, 60 * NS, GAP + 1, 0]
    assert iv.opens.tolist() == [True, False, False, False, True]
    # exactly max_gap is not a gap; one ns more is
    assert iv.gap.tolist() == [False, False, False, True, False]
    assert iv.valid.tolist() == [False, True, True, False, False]


def test_counter_delta_restart_null_and_series_start() -> None:
    values = np.array([5.0, 7.0, 3.0, NAN, 10.0, 12.0, 1.0, 4.0])
    opens = np.array([True, False, False, False, False, False, True, False])
    d = kernels.counter_delta(values, opens)
    expected = [NAN, 2.0, 3.0, NAN, NAN, 2.0, NAN, 3.0]
    np.testing.assert_array_equal(d, np.array(expected))


GPU_CASE = {
    # time s, utilization, energy J, power W
    "rows": [
        (0, 0.5, 1000.0, 200.0),  # opens the series
        (10, 0.5, 3000.0, 200.0),  # 10 s, busy 5 s, 2000 J
        (10, 1.0, 9999.0, 999.0),  # duplicate: ignored
        (100, 0.25, 4000.0, 200.0),  # 90 s gap: nothing but gap_us
        (110, 0.25, 50.0, 200.0),  # counter restart: 50 J
        (120, None, None, 150.0),  # util null → 0; energy from power: 1500 J
        (130, 0.75, 200.0, None),  # previous reading null, no power → 0 J
        (140, 0.75, 260.0, None),  # 60 J
        (200, 0.5, 300.0, None),  # exactly 60 s: not a gap; 40 J
    ],
    "capacity_us": [0, 10_000_000, 0, 10_000_000, 10_000_000, 10_000_000, 10_000_000, 60_000_000],
    "busy_us": [0, 5_000_000, 0, 2_500_000, 0, 7_500_000, 7_500_000, 30_000_000],
    "energy_mj": [0, 2_000_000, 0, 50_000, 1_500_000, 0, 60_000, 40_000],
    "gap_us": [0, 0, 90_000_000, 0, 0, 0, 0, 0],
}


def _gpu_case_arrays() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    rows = GPU_CASE["rows"]
    times = [T0 + r[0] * NS for r in rows]
    idx, c, t = _pipeline([4] * len(rows), times)

    def col(j: int, dtype: Any) -> np.ndarray:
        return np.array([NAN if r[j] is None else r[j] for r in rows], dtype=dtype)[idx]

    cols = {"util": col(1, np.float32), "energy": col(2, np.float64), "power": col(3, np.float32)}
    return c, t, cols


def test_gpu_contributions_hand_case() -> None:
    c, t, cols = _gpu_case_arrays()
    iv = kernels.intervals(c, t, GAP)
    parts = kernels.gpu_contributions(iv, cols["util"], cols["energy"], cols["power"])
    for name in ("capacity_us", "busy_us", "energy_mj", "gap_us"):
        assert parts[name].dtype == np.int64
        assert parts[name].tolist() == GPU_CASE[name], name
    starts, _ = kernels.segment_bounds(c)
    assert kernels.segment_sum(parts["capacity_us"], starts).tolist() == [110_000_000]
    assert kernels.segment_sum(parts["busy_us"], starts).tolist() == [52_500_000]
    assert kernels.segment_sum(parts["energy_mj"], starts).tolist() == [3_650_000]
    assert kernels.segment_sum(parts["gap_us"], starts).tolist() == [90_000_000]


def test_reference_agrees_with_gpu_hand_case() -> None:
    rows = [
        {
            "node": "n",
            "gpu_uuid": "g",
            "time": T0 + r[0] * NS,
            "utilization_ratio": r[1],
            "energy_joules": r[2],
            "power_watts": r[3],
        }
        for r in GPU_CASE["rows"]
    ]
    series = ref.table_series("gpu", rows)[("n", "g")]
    parts = ref.rows_parts("gpu", series, GAP)
    for name in ("capacity_us", "busy_us", "energy_mj", "gap_us"):
        assert [p[name] for p in parts] == GPU_CASE[name], name


def test_cpu_contributions_restart_and_null_energy() -> None:
    times = np.array([T0 + s * NS for s in (0, 10, 20, 30)], dtype=np.int64)
    codes = np.zeros(4, dtype=np.int64)
    iv = kernels.intervals(codes, times, GAP)
    cpus = np.array([4, 4, 4, 2], dtype=np.float64)
    busy = np.array([100.0, 150.0, 20.0, 30.0])  # restart at row 2
    energy = np.array([10.0, NAN, 30.0, 40.0])
    parts = kernels.cpu_contributions(iv, cpus, busy, energy)
    assert parts["capacity_us"].tolist() == [0, 40_000_000, 40_000_000, 20_000_000]
    assert parts["busy_us"].tolist() == [0, 50_000_000, 20_000_000, 10_000_000]
    assert parts["energy_mj"].tolist() == [0, 0, 0, 10_000]
    assert parts["gap_us"].tolist() == [0, 0, 0, 0]


def test_job_contributions_hand_case() -> None:
    times = np.array([T0, T0 + 10 * NS, T0 + 20 * NS, T0 + 200 * NS], dtype=np.int64)
    iv = kernels.intervals(np.zeros(4, dtype=np.int64), times, GAP)
    cpus = np.array([2.5, 2.5, 2.5, 2.5], dtype=np.float32)
    gpus = np.array([0.5, 0.5, 0.25, 1.0], dtype=np.float32)
    used = np.array([0.0, 20.0, 45.0, 500.0])
    parts = kernels.job_contributions(iv, cpus, gpus, used)
    assert parts["cpus_allocated_us"].tolist() == [0, 25_000_000, 25_000_000, 0]
    assert parts["gpus_allocated_us"].tolist() == [0, 5_000_000, 2_500_000, 0]
    assert parts["cpu_used_us"].tolist() == [0, 20_000_000, 25_000_000, 0]  # last is a gap


def test_products_round_half_to_even() -> None:
    # Δt of 1.5, 2.5 and 3.5 µs round to 2, 2 and 4 µs (not 2, 3, 4).
    times = np.cumsum(np.array([T0, 1500, 2500, 3500], dtype=np.int64))
    iv = kernels.intervals(np.zeros(4, dtype=np.int64), times, GAP)
    parts = kernels.cpu_contributions(iv, np.ones(4), np.zeros(4), np.zeros(4))
    assert parts["capacity_us"].tolist() == [0, 2, 2, 4]
    assert kernels.rint_int64(np.array([0.5, 1.5, -0.5, -2.5, NAN])).tolist() == [0, 2, 0, -2, 0]


def test_single_sample_series_adds_nothing() -> None:
    codes = np.array([1, 2, 2], dtype=np.int64)
    times = np.array([T0, T0, T0 + 10 * NS], dtype=np.int64)
    iv = kernels.intervals(codes, times, GAP)
    parts = kernels.gpu_contributions(
        iv,
        np.array([1.0, 1.0, 1.0], dtype=np.float32),
        np.array([5.0, 5.0, 6.0]),
        np.array([100.0, 100.0, 100.0], dtype=np.float32),
    )
    starts, _ = kernels.segment_bounds(codes)
    assert kernels.segment_sum(parts["capacity_us"], starts).tolist() == [0, 10_000_000]
    assert kernels.segment_sum(parts["energy_mj"], starts).tolist() == [0, 1000]
    last = kernels.last_rows(codes)
    assert last.tolist() == [0, 2]
    ratio = kernels.trailing_ratio(
        codes, times, parts["busy_us"], parts["capacity_us"], 60 * NS, last
    )
    assert np.isnan(ratio[0])
    assert ratio[1] == 1.0


def test_trailing_ratio_window_edges() -> None:
    # intervals ending at 10, 20, 30 s with utilisation 1, 0.5, 0.5
    times = np.array([T0 + s * NS for s in (0, 10, 20, 30)], dtype=np.int64)
    codes = np.zeros(4, dtype=np.int64)
    iv = kernels.intervals(codes, times, GAP)
    util = np.array([0.0, 1.0, 0.5, 0.5], dtype=np.float32)
    parts = kernels.gpu_contributions(iv, util, np.full(4, NAN), np.full(4, NAN, np.float32))
    busy, cap = parts["busy_us"], parts["capacity_us"]
    last = np.array([3])

    def ratio(window_ns: int) -> float:
        return float(kernels.trailing_ratio(codes, times, busy, cap, window_ns, last)[0])

    assert ratio(10 * NS) == 0.5  # (20, 30]: the last interval only
    assert ratio(20 * NS) == 0.5  # (10, 30]: the interval ending at 10 s is outside
    assert ratio(20 * NS + 1) == 20 / 30  # now it is inside
    assert ratio(3600 * NS) == 20 / 30  # a window not yet full averages what it holds
    sums = kernels.trailing_sums(codes, times, [cap], 15 * NS)[0]
    assert sums.tolist() == [0, 10_000_000, 20_000_000, 20_000_000]
    # the reference gives the same hand-computed answers
    t, b, k = times.tolist(), busy.tolist(), cap.tolist()
    assert ref.window_ratio(t, b, k, 20 * NS) == 0.5
    assert ref.window_ratio(t, b, k, 20 * NS + 1) == 20 / 30
    assert ref.window_ratio(t[:1], b[:1], k[:1], 60 * NS) is None


def test_empty_inputs() -> None:
    empty = np.zeros(0, dtype=np.int64)
    assert kernels.series_order(empty, empty).tolist() == []
    iv = kernels.intervals(empty, empty, GAP)
    assert iv.dt_ns.shape == (0,)
    starts, _ = kernels.segment_bounds(empty)
    assert kernels.segment_sum(empty, starts).tolist() == []
    assert kernels.trailing_sums(empty, empty, [empty], GAP)[0].tolist() == []


# --- backend ------------------------------------------------------------------------------------


class FakeCupyArray:
    """Stands in for a cupy.ndarray: only its type's module matters to array_namespace."""

    shape = (3,)


FakeCupyArray.__module__ = "cupy._core"


def test_array_namespace_refuses_to_mix_numpy_and_cupy() -> None:
    with pytest.raises(TypeError):
        kernels.array_namespace(np.zeros(3), FakeCupyArray())
    with pytest.raises(TypeError):
        kernels.counter_delta(np.zeros(3), FakeCupyArray())


def test_array_namespace_of_numpy_and_scalars() -> None:
    assert kernels.array_namespace(np.zeros(3), 1, 2.5, None, np.float32(1)) is np
    assert kernels.array_namespace() is np


def test_get_namespace() -> None:
    assert kernels.get_namespace("numpy") is np
    with pytest.raises(ValueError, match="bogus"):
        kernels.get_namespace("bogus")


def test_get_namespace_without_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    with pytest.raises(kernels.BackendError):
        kernels.get_namespace("cupy")
    assert kernels.get_namespace("auto") is np


def test_cupy_is_not_installed_here() -> None:
    # The real environment, not a patched one: "cupy" must fail and "auto" must fall back.
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("cupy is installed")
    with pytest.raises(kernels.BackendError):
        kernels.get_namespace("cupy")
    assert kernels.get_namespace("auto") is np


# --- properties against the reference -----------------------------------------------------------

STEP = st.one_of(
    st.just(0),  # duplicate time
    st.integers(1, GAP),
    st.just(GAP),
    st.just(GAP + 1),
    st.integers(1, 30).map(lambda s: s * NS),
    st.integers(GAP + 1, 400 * NS),  # gap
    st.sampled_from([500, 1500, 2500]),  # half-µs steps: rounding ties
)
RATIO = st.one_of(st.just(NAN), st.floats(0, 1, width=32))
POWER = st.one_of(st.just(NAN), st.floats(0, 1000, width=32))


@st.composite
def counter(draw: st.DrawFn, n: int) -> list[float]:
    """A cumulative counter with occasional restarts and nulls."""
    out, x = [], draw(st.floats(0, 1e6))
    for _ in range(n):
        kind = draw(st.sampled_from(["inc", "inc", "inc", "restart", "null"]))
        if kind == "null":
            out.append(NAN)
            continue
        if kind == "restart":
            x = draw(st.floats(0, 100))
        else:
            x += draw(st.floats(0, 1000))
        out.append(x)
    return out


@dataclass
class Data:
    codes: list[int]
    times: list[int]
    cols: dict[str, list[Any]]


@st.composite
def multi_series(draw: st.DrawFn) -> Data:
    codes_pool = draw(st.lists(st.integers(-3, 10_000), min_size=1, max_size=4, unique=True))
    codes: list[int] = []
    times: list[int] = []
    for code in codes_pool:
        n = draw(st.integers(1, 12))
        t = T0 + draw(st.integers(0, 600 * NS))
        for i in range(n):
            if i:
                t += draw(STEP)
            codes.append(code)
            times.append(t)
    n = len(codes)
    cols: dict[str, list[Any]] = {
        "util": draw(st.lists(RATIO, min_size=n, max_size=n)),
        "power": draw(st.lists(POWER, min_size=n, max_size=n)),
        "energy": draw(counter(n)),
        "busy": draw(counter(n)),
        "cpus": draw(st.lists(st.integers(1, 512), min_size=n, max_size=n)),
        "cpus_alloc": draw(st.lists(st.floats(0, 128, width=32), min_size=n, max_size=n)),
        "gpus_alloc": draw(st.lists(st.floats(0, 8, width=32), min_size=n, max_size=n)),
        "used": draw(counter(n)),
    }
    # Shuffle the rows: the kernels must sort them.
    perm = draw(st.permutations(range(n)))
    return Data(
        codes=[codes[i] for i in perm],
        times=[times[i] for i in perm],
        cols={k: [v[i] for i in perm] for k, v in cols.items()},
    )


def _expected_per_row(
    data: Data, kept: list[int], part_fn: Any, columns: list[str]
) -> dict[str, list[int]]:
    """Reference contributions for the kept rows, flattened in (series, time) order."""
    out: dict[str, list[int]] = {}
    by_code = ref.group_by(kept, lambda i: data.codes[i])
    for code in sorted(by_code):
        rows = by_code[code]
        times = [data.times[i] for i in rows]
        args = [[data.cols[c][i] for i in rows] for c in columns]
        for p in part_fn(times, *args, GAP):
            for k, v in p.items():
                out.setdefault(k, []).append(v)
    return out


def _kernel_arrays(data: Data, idx: np.ndarray) -> dict[str, np.ndarray]:
    dtypes = {"util": np.float32, "power": np.float32, "cpus": np.int32}
    dtypes |= {"cpus_alloc": np.float32, "gpus_alloc": np.float32}
    return {k: np.asarray(v, dtype=dtypes.get(k, np.float64))[idx] for k, v in data.cols.items()}


@settings(max_examples=300, deadline=None)
@given(multi_series())
def test_ordering_dedup_intervals_match_reference(data: Data) -> None:
    c = np.asarray(data.codes, dtype=np.int64)
    t = np.asarray(data.times, dtype=np.int64)
    order = kernels.series_order(c, t)
    assert order.tolist() == ref.sort_order(data.codes, data.times)
    keep = kernels.dedup_mask(c[order], t[order])
    kept = ref.kept_rows(data.codes, data.times)
    assert order[keep].tolist() == kept

    cs, ts = c[kept], t[kept]
    iv = kernels.intervals(cs, ts, GAP)
    by_code = ref.group_by(kept, lambda i: data.codes[i])
    expected = [
        iv_
        for code in sorted(by_code)
        for iv_ in ref.series_intervals([data.times[i] for i in by_code[code]], GAP)
    ]
    assert iv.dt_ns.tolist() == [e.dt_ns for e in expected]
    assert iv.opens.tolist() == [e.opens for e in expected]
    assert iv.gap.tolist() == [e.gap for e in expected]
    assert iv.valid.tolist() == [e.valid for e in expected]

    for column in ("energy", "busy"):
        values = np.asarray(data.cols[column])[kept]
        got = kernels.counter_delta(values, iv.opens)
        want = [
            NAN if d is None else d
            for code in sorted(by_code)
            for d in ref.series_deltas([data.cols[column][i] for i in by_code[code]])
        ]
        np.testing.assert_array_equal(got, np.array(want, dtype=np.float64))

    starts, row_start = kernels.segment_bounds(cs)
    firsts = np.flatnonzero(np.array([e.opens for e in expected]))
    assert starts.tolist() == firsts.tolist()
    assert row_start.tolist() == [int(firsts[firsts <= i].max()) for i in range(len(kept))]
    assert kernels.last_rows(cs).tolist() == [*(firsts[1:] - 1).tolist(), len(kept) - 1]


@settings(max_examples=300, deadline=None)
@given(multi_series())
def test_contributions_and_sums_match_reference(data: Data) -> None:
    c = np.asarray(data.codes, dtype=np.int64)
    t = np.asarray(data.times, dtype=np.int64)
    kept = ref.kept_rows(data.codes, data.times)
    idx = np.asarray(kept, dtype=np.int64)
    cs, ts = c[idx], t[idx]
    a = _kernel_arrays(data, idx)
    iv = kernels.intervals(cs, ts, GAP)
    starts, _ = kernels.segment_bounds(cs)

    cases = [
        (
            kernels.gpu_contributions(iv, a["util"], a["energy"], a["power"]),
            _expected_per_row(data, kept, ref.gpu_parts, ["util", "energy", "power"]),
        ),
        (
            kernels.cpu_contributions(iv, a["cpus"], a["busy"], a["energy"]),
            _expected_per_row(data, kept, ref.cpu_parts, ["cpus", "busy", "energy"]),
        ),
        (
            kernels.job_contributions(iv, a["cpus_alloc"], a["gpus_alloc"], a["used"]),
            _expected_per_row(data, kept, ref.job_parts, ["cpus_alloc", "gpus_alloc", "used"]),
        ),
    ]
    by_code = ref.group_by(range(len(kept)), lambda j: data.codes[kept[j]])
    for got, want in cases:
        assert sorted(got) == sorted(want)
        for name, values in got.items():
            assert values.dtype == np.int64
            assert values.tolist() == want[name], name
            sums = kernels.segment_sum(values, starts)
            assert sums.tolist() == [
                sum(want[name][j] for j in by_code[code]) for code in sorted(by_code)
            ], name


@settings(max_examples=300, deadline=None)
@given(
    multi_series(),
    st.one_of(
        st.sampled_from([NS, 15 * NS, 60 * NS, 300 * NS, 3600 * NS]),
        st.integers(1, 2000 * NS),
    ),
)
def test_trailing_windows_match_reference(data: Data, window_ns: int) -> None:
    c = np.asarray(data.codes, dtype=np.int64)
    t = np.asarray(data.times, dtype=np.int64)
    kept = ref.kept_rows(data.codes, data.times)
    idx = np.asarray(kept, dtype=np.int64)
    cs, ts = c[idx], t[idx]
    a = _kernel_arrays(data, idx)
    iv = kernels.intervals(cs, ts, GAP)
    parts = kernels.cpu_contributions(iv, a["cpus"], a["busy"], a["energy"])
    busy, cap = parts["busy_us"], parts["capacity_us"]
    want = _expected_per_row(data, kept, ref.cpu_parts, ["cpus", "busy", "energy"])

    by_code = ref.group_by(range(len(kept)), lambda j: data.codes[kept[j]])
    want_busy: list[int] = []
    want_cap: list[int] = []
    want_ratio: list[float] = []
    for code in sorted(by_code):
        rows = by_code[code]
        times = [int(ts[j]) for j in rows]
        b = [want["busy_us"][j] for j in rows]
        k = [want["capacity_us"][j] for j in rows]
        for i in range(len(rows)):
            want_busy.append(ref.trailing_sum(times, b, i, window_ns))
            want_cap.append(ref.trailing_sum(times, k, i, window_ns))
        r = ref.window_ratio(times, b, k, window_ns)
        want_ratio.append(NAN if r is None else r)

    got_busy, got_cap = kernels.trailing_sums(cs, ts, [busy, cap], window_ns)
    assert got_busy.tolist() == want_busy
    assert got_cap.tolist() == want_cap

    last = kernels.last_rows(cs)
    ratio = kernels.trailing_ratio(cs, ts, busy, cap, window_ns, last)
    np.testing.assert_array_equal(ratio, np.array(want_ratio))
    (at_last,) = kernels.trailing_sums(cs, ts, [cap], window_ns, at=last)
    assert at_last.tolist() == [want_cap[j] for j in last.tolist()]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 10**6), min_size=1, max_size=20), min_size=1, max_size=8),
    st.integers(1, 10**6),
    st.booleans(),
)
def test_packed_key_window_start_equals_the_bisection(
    series: list[list[int]], window: int, far: bool
) -> None:
    from kernels.rolling import window_start_bisect, window_start_index
    from kernels.series import segment_bounds

    # ``far`` spreads the times over ~2^61 ns so the packed key would overflow: the fallback runs.
    scale = 2**40 if far else 1
    codes = np.concatenate([np.full(len(t), i, np.int64) for i, t in enumerate(series)])
    times = np.concatenate([np.sort(np.asarray(t, np.int64)) * scale for t in series])
    _, row_start = segment_bounds(codes)
    at = np.arange(codes.size, dtype=np.int64)
    expected = window_start_bisect(times, row_start, at, window * scale)
    assert np.array_equal(window_start_index(times, row_start, at, window * scale), expected)
    sparse_codes = codes * 1_000_003  # monotone, not dense: still the same answer
    got = window_start_index(times, row_start, at, window * scale, sparse_codes)
    assert np.array_equal(got, expected)
    for i in range(codes.size):  # and both are what a loop finds
        j = int(row_start[i])
        while times[j] <= times[i] - window * scale:
            j += 1
        assert expected[i] == j


@settings(max_examples=250, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-1, 5), st.integers(0, 3), st.integers(-(2**40), 2**40),
                  st.integers(-(10**12), 10**12), st.booleans()),
        max_size=60,
    ),
    st.sampled_from(["binned", "sorted", "packed overflow"]),
    st.sampled_from([2**20, 2**40, 2**55]),
    st.booleans(),
)  # fmt: skip
def test_group_sums_equal_a_dictionary(
    rows: list[tuple[int, int, int, int, bool]], path: str, value_scale: int, masked: bool
) -> None:
    """Every path (bins, packed sort, lexsort) gives a plain dictionary's sums, exactly, with
    values small enough for float64 bins and ones that must be split."""
    from kernels.grouped_sums import group_sums

    # The third key's spread picks the path: a few values fit in bins, ±2^40 needs the packed
    # sort, ±2^60 overflows the packed key so the lexsort runs.
    spread = {"binned": 2**-40, "sorted": 1, "packed overflow": 2**20}[path]
    keys = [np.array([int(r[i] * (spread if i == 2 else 1)) for r in rows], dtype=np.int64)
            for i in range(3)]  # fmt: skip
    # |values| up to ~2^20, 2^40 (bins hold them) or 2^55 (60 of them overflow 2^53: split).
    values = np.array([r[3] * value_scale // 2**40 + r[3] % 7 for r in rows], dtype=np.int64)
    where = np.array([r[4] for r in rows], dtype=bool) if masked else None
    expected: dict[tuple[int, ...], int] = {}
    for i in range(len(rows)):
        if where is not None and not where[i]:
            continue
        key = tuple(int(k[i]) for k in keys)
        expected[key] = expected.get(key, 0) + int(values[i])
    got_keys, got_sums = group_sums(keys, [values, -values], where)
    got = {tuple(int(k[i]) for k in got_keys): int(got_sums[0][i]) for i in range(len(got_sums[0]))}
    assert got == expected
    assert [tuple(int(k[i]) for k in got_keys) for i in range(len(got))] == sorted(expected)
    assert [-int(v) for v in got_sums[1]] == [int(v) for v in got_sums[0]]
    assert all(k.dtype == np.int64 for k in got_keys)


def test_binned_group_sums_split_values_that_float64_bins_would_round() -> None:
    """2^53 + 1 is the first integer float64 cannot hold: summed in bins unsplit it would come
    out even. The split sums keep the 1."""
    from kernels.grouped_sums import group_sums

    keys = [np.array([0, 0, 1, 1, 1], dtype=np.int64)]
    values = np.array([2**53, 1, 2**60, -(2**60), 3], dtype=np.int64)
    got_keys, (sums,) = group_sums(keys, [values])
    assert got_keys[0].tolist() == [0, 1]
    assert sums.tolist() == [2**53 + 1, 3]
    near_limit = np.array([2**62, -(2**62), 2**62, 5, 0], dtype=np.int64)  # split parts exact
    assert group_sums(keys, [near_limit])[1][0].tolist() == [0, 2**62 + 5]
