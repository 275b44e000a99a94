from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporters.prometheus import METRICS, TallyCollector
from telemetry import __version__
from telemetry.collectors.base import CollectorStatus
from telemetry.frame import Frame
from telemetry.schema import GPU_JOB_SCHEMA
from telemetry.state import Snapshot, State
from tests.support.promtool import promtool_check
from tests.support.tables import HOSTILE, T0, cpu_table, gpu_table, job_table
from tests.support.units import NS


def _exposition(snapshot: Snapshot) -> bytes:
    registry = CollectorRegistry()
    registry.register(TallyCollector(lambda: snapshot))
    return generate_latest(registry)


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _state() -> State:
    state = State()
    times = [float(t) for t in range(0, 600, 5)]
    state.ingest("cpu", cpu_table("n1", times, cpus=8, busy_share=0.25))
    state.ingest("gpu", gpu_table("n1", "GPU-0", 0, times, util=0.5, job_id="42"))
    state.ingest("gpu", gpu_table("n1", "GPU-1", 1, times, util=None, job_id=None))
    state.ingest("job", job_table("n1", "42", times, user="alice", account="acme"))
    return state


def test_values_of_every_table_reach_the_exposition() -> None:
    status = {"cpu": CollectorStatus(True, 0.002), "rapl": CollectorStatus(False, 0.001, "x")}
    samples = _samples(_exposition(_state().snapshot(status)))
    node = (("node", "n1"),)
    # cpu_table: 8 CPUs busy a quarter of the time; counters start at elapsed=1000 s.
    assert samples[("tally_cpus", node)] == 8
    assert samples[("tally_cpu_seconds_total", (("mode", "user"), *node))] == pytest.approx(
        (1000 + 595) * 8 * 0.25 * 0.75
    )
    for window in ("1m", "5m", "15m", "1h"):
        key = ("tally_cpu_utilization_ratio", (*node, ("window", window)))
        assert samples[key] == pytest.approx(0.25, abs=1e-9)
    gpu0 = (("gpu", "0"), ("node", "n1"), ("uuid", "GPU-0"))
    gpu1 = (("gpu", "1"), ("node", "n1"), ("uuid", "GPU-1"))
    # 119 intervals of 5 s at 50 % utilisation, 300 W.
    assert samples[("tally_gpu_busy_seconds_total", gpu0)] == pytest.approx(119 * 5 * 0.5)
    assert samples[("tally_gpu_busy_seconds_total", gpu1)] == 0
    assert samples[("tally_gpu_energy_joules_total", gpu0)] == pytest.approx(119 * 5 * 300.0)
    assert samples[("tally_gpu_utilization_ratio", gpu0)] == 0.5
    assert ("tally_gpu_utilization_ratio", gpu1) not in samples, "null utilisation is not 0"
    assert (
        samples[
            ("tally_gpu_utilization_avg_ratio", (*gpu0[:2], ("uuid", "GPU-0"), ("window", "5m")))
        ]
        == 0.5
    )
    # 1m window of a 600 s series holds the last 12 intervals only; still 0.5.
    assert (
        samples[
            ("tally_gpu_job_info", (("gpu", "0"), ("job", "42"), ("node", "n1"), ("uuid", "GPU-0")))
        ]
        == 1
    )
    assert not any(k[0] == "tally_gpu_job_info" and ("uuid", "GPU-1") in k[1] for k in samples)
    assert (
        samples[
            (
                "tally_gpu_info",
                (
                    ("gpu", "0"),
                    ("mig_profile", ""),
                    ("model", "NVIDIA H100 80GB HBM3"),
                    ("node", "n1"),
                    ("uuid", "GPU-0"),
                ),
            )
        ]
        == 1
    )
    job = (("job", "42"), ("node", "n1"))
    assert (
        samples[
            ("tally_job_info", (("account", "acme"), *job[:1], ("node", "n1"), ("user", "alice")))
        ]
        == 1
    )
    assert samples[("tally_job_cpu_seconds_total", job)] == pytest.approx(595 * 3.0)
    assert samples[("tally_job_cpus_allocated", job)] == 4
    assert samples[("tally_collector_success", (("collector", "cpu"),))] == 1
    assert samples[("tally_collector_success", (("collector", "rapl"),))] == 0
    assert samples[("tally_build_info", (("version", __version__),))] == 1


def test_every_family_declared_is_described_and_has_units_in_its_name() -> None:
    called = []
    collector = TallyCollector(lambda: called.append(1) or Snapshot())  # type: ignore[func-returns-value]
    registry = CollectorRegistry()
    registry.register(collector)
    assert not called, "registering must not trigger a collection"
    assert {m.name for m in collector.describe()} == set(METRICS)


def test_no_sample_timestamps() -> None:
    text = _exposition(_state().snapshot()).decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert samples
    assert all(s.timestamp is None for s in samples)


def test_series_vanish_with_their_rows() -> None:
    state = State()
    state.ingest("job", job_table("n1", "7", [0, 5, 10]))
    assert b'job="7"' in _exposition(state.snapshot())
    state.ingest("job", job_table("n1", "8", [100, 105]))  # job 7 silent for 95 s > max gap
    text = _exposition(state.snapshot())
    assert b'job="7"' not in text and b'job="8"' in text


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_label_values_cannot_add_or_break_series(hostile: str, promtool: str) -> None:
    state = State()
    times = [0.0, 5.0, 10.0]
    state.ingest("job", job_table("n1", hostile, times, user=hostile, account=hostile))
    state.ingest(
        "gpu", gpu_table(hostile, "GPU-" + hostile, 0, times, job_id=hostile, model=hostile)
    )
    text = _exposition(state.snapshot())
    samples = _samples(text)
    jobs = [k for k in samples if k[0] == "tally_job_info"]
    assert len(jobs) == 1
    assert dict(jobs[0][1]) == {"node": "n1", "job": hostile, "user": hostile, "account": hostile}
    infos = [k for k in samples if k[0] == "tally_gpu_info"]
    assert len(infos) == 1 and dict(infos[0][1])["model"] == hostile
    names = {k[0] for k in samples}
    assert names <= {f"{n}_total" if METRICS[n][0] == "counter" else n for n in METRICS}
    result = promtool_check(promtool, text)
    assert result.returncode == 0, result.stdout + result.stderr


def test_full_exposition_passes_promtool(promtool: str) -> None:
    status = {"cpu": CollectorStatus(True, 0.002)}
    snapshot = _state().snapshot(status)
    snapshot.store = {"rows_written": 10, "errors": 0}
    text = _exposition(snapshot)
    result = promtool_check(promtool, text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"tally_store_rows_written_total 10.0" in text


def test_empty_snapshot_still_renders_build_info(promtool: str) -> None:
    text = _exposition(Snapshot())
    assert b"tally_build_info{" in text
    assert promtool_check(promtool, text).returncode == 0


def _frame(table: pa.Table, name: str) -> Frame:
    """The rows of an Arrow table as the daemon's collectors hand them over."""
    rows = table.set_column(0, "time", table.column("time").cast(pa.int64())).to_pylist()
    return Frame.from_rows(name, rows)


@pytest.mark.parametrize("label", ["plain", *HOSTILE])
def test_frames_render_the_bytes_arrow_tables_render(label: str) -> None:
    """The daemon's rows (Frames, no Arrow) and replay's (Arrow tables) make the same state and
    the same exposition, byte for byte, through both renderers."""
    times = [float(t) for t in range(0, 300, 5)]
    gpu_b = gpu_table(label, "GPU-b", 1, times, util=None, job_id=None)
    power = np.full(len(times), 300.0, dtype=np.float32)
    power[7] = 5e5  # out of range: dropped and counted either way
    gpu_b = gpu_b.set_column(gpu_b.schema.get_field_index("power_watts"), "power_watts",
                             pa.array(power))  # fmt: skip
    shared = pa.table(
        {
            "time": pa.array([T0 + int(t * NS) for t in times for _ in (0, 1)], pa.int64()),
            "node": [label] * (2 * len(times)),
            "gpu_uuid": ["GPU-b"] * (2 * len(times)),
            "job_id": [label, "other"] * len(times),
            "share": pa.array([0.25, 0.75] * len(times), pa.float32()),
            "sm_utilization_ratio": pa.array([0.1, None] * len(times), pa.float32()),
            "memory_used_bytes": pa.array([1 << 30, None] * len(times), pa.int64()),
        }
    ).cast(GPU_JOB_SCHEMA)
    tables = {
        "cpu": cpu_table(label, times, cpus=8, busy_share=0.3),
        "gpu": pa.concat_tables(
            [gpu_table(label, "GPU-a", 0, times, util=0.5, job_id=label, model=label), gpu_b]
        ),
        "job": job_table(label, label, times, user=label, account=label),
        "gpu_job": shared,
    }
    from_arrow, from_frames = State(), State()
    for lo in range(0, len(times), 20):  # three rounds' worth each
        window = (T0 + int(times[lo] * NS), T0 + int(times[min(lo + 20, len(times)) - 1] * NS))
        for name, table in tables.items():
            ns = table.column("time").cast(pa.int64()).to_numpy()
            part = table.filter(pa.array((ns >= window[0]) & (ns <= window[1])))
            from_arrow.ingest(name, part)
            from_frames.ingest(name, _frame(part, name))
    status = {"gpu": CollectorStatus(True, 0.001)}
    texts = []
    for state in (from_arrow, from_frames):
        snapshot = state.snapshot(status)
        assert snapshot.ingest["gpu"].out_of_range == 1
        collector = TallyCollector(lambda snapshot=snapshot: snapshot, dcgm_compat=True)
        registry = CollectorRegistry()
        registry.register(collector)
        texts.append((collector.render_text(), generate_latest(registry)))
    assert texts[0] == texts[1]
    samples = _samples(texts[1][0])
    share = ("tally_gpu_job_share", (("gpu", "1"), ("job", label), ("node", label),
                                     ("uuid", "GPU-b")))  # fmt: skip
    assert samples[share] == 0.25
    assert samples[("tally_gpu_power_watts", (("gpu", "1"), ("node", label), ("uuid", "GPU-b")))]
