"""deploy/grafana/tally-dashboard.json: a well-formed Grafana dashboard whose every PromQL
expression names tally's metrics (exporters.prometheus.METRICS) and returns data from a real
Prometheus engine: each one becomes a recording rule that ``promtool check rules`` checks and
``promtool test rules`` evaluates over synthetic tally series, so a renamed metric or label, or a
broken join, fails the build.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporters.prometheus import METRICS
from telemetry.schema import CPU_MODES

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "tally-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_COLUMNS = 24

# Exposed name → label names; counters carry _total in the exposition.
EXPOSED: dict[str, tuple[str, ...]] = {
    name + ("_total" if kind == "counter" else ""): labels
    for name, (kind, _, labels) in METRICS.items()
}
COUNTERS = {name + "_total" for name, (kind, _, _) in METRICS.items() if kind == "counter"}
# Labels Prometheus adds to every scraped series; an exposed `job` label is stored as
# `exported_job` (default honor_labels: false) or replaces the scrape job (honor_labels: true).
TARGET_LABELS = ("instance", "job")

# What the test substitutes for Grafana's variables. $node and $pool select two of the three
# nodes and pools of the synthetic series, in Grafana's regex form of a multi-value variable.
NODES = ("gpu-a01", "cpu-b01")
POOLS = ("gpu-own", "cpu-own")
VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "node": "(" + "|".join(NODES) + ")",
    "pool": "(" + "|".join(POOLS) + ")",
}
BUILTIN_VARIABLES = {name for name in VARIABLES if name.startswith("__")}

# The panels the issue asks for, by the metrics they must use.
REQUIRED_METRICS = {
    "tally_pool_capacity_unit_seconds_total",
    "tally_pool_allocated_unit_seconds_total",
    "tally_pool_busy_unit_seconds_total",
    "tally_tenant_busy_unit_seconds_total",
    "tally_cpu_utilization_ratio",
    "tally_cpu_seconds_total",
    "tally_gpu_utilization_avg_ratio",
    "tally_gpu_job_info",
    "tally_gpu_memory_used_bytes",
    "tally_gpu_memory_total_bytes",
    "tally_gpu_energy_joules_total",
    "tally_cpu_energy_joules_total",
    "tally_tenant_charge_total",
    "tally_gpu_ecc_errors_total",
    "tally_gpu_xid_errors_total",
    "tally_gpu_remapped_rows_pending",
    "tally_collector_success",
    "tally_collector_duration_seconds",
    "tally_store_errors_total",
    "tally_samples_dropped_total",
}


# --- the dashboard's expressions ---------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    where: str  # 'panel 2 "Pool allocation ratio" target A' or 'variable $node'
    key: tuple[str, str]  # (panel title, refId); ("$node", "") for a variable
    record: str  # the recording rule's name
    expr: str  # as written in the dashboard
    promql: str  # Grafana's variables replaced by the test's values

    def describe(self) -> str:
        return f"{self.where}: {self.expr!r}"


_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::\w+)?\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*$", re.DOTALL)


def load() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, with those inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def used_variables(expr: str) -> set[str]:
    """Grafana variables an expression uses; label_replace's $1 is none."""
    return {
        name
        for match in _VARIABLE.finditer(expr)
        if not (name := match.group(1) or match.group(2) or match.group(3)).isdigit()
    }


def substitute(expr: str, where: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name.isdigit():
            return match.group(0)
        if name not in VARIABLES:
            pytest.fail(f"{where}: the test has no value for Grafana variable ${name}: {expr!r}")
        return VARIABLES[name]

    return _VARIABLE.sub(value, expr)


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query")
    return str(query.get("query", "")) if isinstance(query, dict) else str(query or "")


def queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    out = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        where = f"variable ${variable['name']}"
        text = variable_query(variable)
        match = _LABEL_VALUES.match(text)
        if match is None:
            pytest.fail(f"{where}: only label_values(metric, label) queries are checked: {text!r}")
        selector, label = match.groups()
        out.append(
            Query(
                where,
                (f"${variable['name']}", ""),
                f"tally_dashboard:variable_{variable['name']}",
                text,
                substitute(f"group by ({label}) ({selector})", where),
            )
        )
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            where = f"panel {panel['id']} {panel['title']!r} target {target['refId']}"
            ref = re.sub(r"\W", "_", str(target["refId"]))
            out.append(
                Query(
                    where,
                    (panel["title"], target["refId"]),
                    f"tally_dashboard:panel_{panel['id']}_{ref}",
                    target["expr"],
                    substitute(target["expr"], where),
                )
            )
    return out


# A small PromQL scanner: enough to find every selector's metric name and matched labels.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.I)
_BRACES = re.compile(r"\{[^{}]*\}")
_SELECTOR = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*(?:\{(\d+)\})?")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_KEYWORDS = {
    *("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"),
    *("bottomk", "topk", "quantile", "by", "without", "on", "ignoring", "group_left"),
    *("group_right", "bool", "offset", "and", "or", "unless", "atan2", "inf", "nan"),
}


def selectors(promql: str) -> list[tuple[str, list[str]]]:
    """(metric name, matched label names) of every vector selector in ``promql``."""
    text = _STRING.sub('""', promql)
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # range and subquery durations
    text = _GROUPING.sub(r"\1", text)  # label lists of by, on, group_left, ...
    braces: list[str] = []

    def stash(match: re.Match[str]) -> str:
        braces.append(match.group(0))
        return f"{{{len(braces) - 1}}}"

    text = _BRACES.sub(stash, text)  # label matchers, each as {n}
    out = []
    used = set()
    for match in _SELECTOR.finditer(text):
        name, index = match.group(1), match.group(2)
        if name.lower() in _KEYWORDS:
            continue
        if index is None and text[match.end() :].startswith("("):
            continue  # a function
        used.add(index)
        out.append((name, _MATCHER.findall(braces[int(index)]) if index else []))
    if set(map(str, range(len(braces)))) - used:
        out.append(("{...}", []))  # a selector without a metric name
    return out


def name_errors(query: Query) -> list[str]:
    errors = []
    for name, labels in selectors(query.promql):
        if name not in EXPOSED:
            hint = " (counters end in _total)" if name + "_total" in EXPOSED else ""
            errors.append(f"{query.describe()} uses {name!r}, not a tally metric{hint}")
            continue
        allowed = {*EXPOSED[name], *TARGET_LABELS}
        if "job" in EXPOSED[name]:
            allowed.add("exported_job")
        errors += [
            f"{query.describe()} matches label {label!r}, which {name} does not have"
            for label in labels
            if label not in allowed
        ]
    return errors


# --- synthetic series: what Prometheus would store from tally's exposition --------------------

STEP_SECONDS = 15  # the scrape interval
STEPS = 300  # 75 minutes of samples
EVAL_TIME = "70m"  # a full hour of samples behind every [1h] range

ALL_NODES = (*NODES, "gpu-x99")  # gpu-x99 and gpu-leased are outside $node and $pool
GPUS = (  # node, index, uuid, the Slurm job holding it
    ("gpu-a01", "0", "GPU-a01-0", "4711"),
    ("gpu-a01", "1", "GPU-a01-1", "4712"),
    ("gpu-a01", "2", "GPU-a01-2", None),
    ("gpu-x99", "0", "GPU-x99-0", "4799"),
)
# GPU 1's job label as a Prometheus with honor_labels: true stores it (job="4712", no
# exported_job); every other `job` label as the default stores it (exported_job).
HONOR_LABELS_JOBS = {"4712"}
JOBS = (("gpu-a01", "4711"), ("gpu-a01", "4712"), ("cpu-b01", "4713"), ("gpu-x99", "4799"))
POOL_ROWS = (("gpu-own", "gpu"), ("cpu-own", "cpu"), ("gpu-leased", "gpu"))
TENANTS = (
    ("gpu-own", "gpu", "acme"),
    ("gpu-own", "gpu", "beta"),
    ("cpu-own", "cpu", "acme"),
    ("gpu-leased", "gpu", "acme"),
)
DAEMONS = ("gpu-a01:8469", "cpu-b01:8469")
BILLING_DAEMON = "gpu-a01:8469"  # the one running with --inventory
LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "mode": CPU_MODES,
    "window": ("1m", "5m", "15m", "1h"),
    "type": ("corrected", "uncorrected"),
    "reason": ("duplicate", "late"),
    "collector": ("cpu", "rapl", "gpu", "job"),
    "table": ("cpu", "gpu", "job"),
    "currency": ("CNY",),
    "model": ("NVIDIA H100 80GB HBM3",),
    "mig_profile": ("",),
    "user": ("alice",),
    "account": ("acme",),
    "version": ("0.1.0",),
}
GIB = 2**30
# (metric, labels a series must have, value); the first match wins. Counters grow by the value
# per second, gauges hold it; the default is 1 for both. Values are binary fractions, so the
# expected results below are exact.
SERIES_VALUES: tuple[tuple[str, dict[str, str], float], ...] = (
    ("tally_pool_capacity_unit_seconds_total", {"pool": "gpu-own"}, 8),
    ("tally_pool_capacity_unit_seconds_total", {"pool": "cpu-own"}, 128),
    ("tally_pool_capacity_unit_seconds_total", {"pool": "gpu-leased"}, 4),
    ("tally_pool_allocated_unit_seconds_total", {"pool": "gpu-own"}, 4),
    ("tally_pool_allocated_unit_seconds_total", {"pool": "cpu-own"}, 96),
    ("tally_pool_allocated_unit_seconds_total", {"pool": "gpu-leased"}, 4),
    ("tally_pool_busy_unit_seconds_total", {"pool": "gpu-own"}, 2),
    ("tally_pool_busy_unit_seconds_total", {"pool": "cpu-own"}, 48),
    ("tally_pool_busy_unit_seconds_total", {"pool": "gpu-leased"}, 4),
    ("tally_tenant_allocated_unit_seconds_total", {"pool": "gpu-own", "tenant": "acme"}, 3),
    ("tally_tenant_allocated_unit_seconds_total", {"pool": "cpu-own", "tenant": "acme"}, 96),
    ("tally_tenant_busy_unit_seconds_total", {"pool": "gpu-own", "tenant": "acme"}, 1.5),
    ("tally_tenant_busy_unit_seconds_total", {"pool": "gpu-own", "tenant": "beta"}, 0.25),
    ("tally_tenant_busy_unit_seconds_total", {"pool": "cpu-own", "tenant": "acme"}, 48),
    ("tally_tenant_charge_total", {"pool": "gpu-own", "tenant": "acme"}, 2**-6),
    ("tally_tenant_charge_total", {"pool": "gpu-own", "tenant": "beta"}, 2**-7),
    ("tally_tenant_charge_total", {"pool": "cpu-own", "tenant": "acme"}, 2**-7),
    ("tally_cpus", {"node": "gpu-a01"}, 64),
    ("tally_cpus", {"node": "cpu-b01"}, 128),
    ("tally_cpus", {"node": "gpu-x99"}, 32),
    # busy modes: gpu-a01 16 of 64 CPUs, cpu-b01 96 of 128; iowait and steal are not busy
    ("tally_cpu_seconds_total", {"node": "gpu-a01", "mode": "user"}, 12),
    ("tally_cpu_seconds_total", {"node": "gpu-a01", "mode": "system"}, 4),
    ("tally_cpu_seconds_total", {"node": "cpu-b01", "mode": "user"}, 64),
    ("tally_cpu_seconds_total", {"node": "cpu-b01", "mode": "softirq"}, 32),
    ("tally_cpu_seconds_total", {"mode": "idle"}, 16),
    ("tally_cpu_seconds_total", {"mode": "iowait"}, 8),
    ("tally_cpu_seconds_total", {"mode": "steal"}, 8),
    ("tally_cpu_seconds_total", {}, 0),
    ("tally_cpu_utilization_ratio", {"node": "gpu-a01", "window": "5m"}, 0.25),
    ("tally_cpu_utilization_ratio", {"node": "cpu-b01", "window": "5m"}, 0.75),
    ("tally_cpu_utilization_ratio", {}, 0.125),
    ("tally_memory_total_bytes", {}, 256 * GIB),
    ("tally_memory_available_bytes", {}, 64 * GIB),
    ("tally_cpu_energy_joules_total", {"node": "gpu-a01"}, 200),
    ("tally_cpu_energy_joules_total", {"node": "cpu-b01"}, 150),
    ("tally_cpu_energy_joules_total", {"node": "gpu-x99"}, 100),
    ("tally_gpu_utilization_avg_ratio", {"uuid": "GPU-a01-0", "window": "5m"}, 0.75),
    ("tally_gpu_utilization_avg_ratio", {"uuid": "GPU-a01-1", "window": "5m"}, 0.5),
    ("tally_gpu_utilization_avg_ratio", {"uuid": "GPU-a01-2", "window": "5m"}, 0.25),
    ("tally_gpu_utilization_avg_ratio", {}, 0.0625),
    ("tally_gpu_memory_used_bytes", {}, 40 * GIB),
    ("tally_gpu_memory_total_bytes", {}, 80 * GIB),
    ("tally_gpu_energy_joules_total", {"uuid": "GPU-a01-0"}, 250),
    ("tally_gpu_energy_joules_total", {"uuid": "GPU-a01-1"}, 300),
    ("tally_gpu_energy_joules_total", {"uuid": "GPU-a01-2"}, 50),
    ("tally_gpu_energy_joules_total", {"uuid": "GPU-x99-0"}, 700),
    ("tally_gpu_ecc_errors_total", {"uuid": "GPU-a01-0", "type": "uncorrected"}, 2**-4),
    ("tally_gpu_ecc_errors_total", {"uuid": "GPU-x99-0", "type": "uncorrected"}, 2**-4),
    ("tally_gpu_ecc_errors_total", {"type": "uncorrected"}, 0),
    ("tally_gpu_xid_errors_total", {"uuid": "GPU-a01-2"}, 2**-6),
    ("tally_gpu_xid_errors_total", {}, 0),
    ("tally_gpu_last_xid", {"uuid": "GPU-a01-2"}, 79),
    ("tally_gpu_last_xid", {}, 0),
    ("tally_gpu_remapped_rows_pending", {"uuid": "GPU-a01-1"}, 1),
    ("tally_gpu_remapped_rows_pending", {}, 0),
    ("tally_gpu_lost", {"uuid": "GPU-a01-0"}, 1),
    ("tally_gpu_lost", {"uuid": "GPU-x99-0"}, 1),  # a node $node leaves out
    ("tally_gpu_lost", {}, 0),
    ("tally_collector_success", {"instance": "cpu-b01:8469", "collector": "gpu"}, 0),
    ("tally_collector_duration_seconds", {}, 2**-9),
    ("tally_store_errors_total", {}, 0),
)

# (panel title, refId) → (labels to sum by, {labels: value}) at EVAL_TIME.
EXPECTED: dict[tuple[str, str], tuple[str, dict[str, float]]] = {
    ("Pool allocation ratio", "A"): (
        "pool, kind",
        {'pool="gpu-own", kind="gpu"': 0.5, 'pool="cpu-own", kind="cpu"': 0.75},
    ),
    ("Pool busy ratio", "A"): (
        "pool, kind",
        {'pool="gpu-own", kind="gpu"': 0.25, 'pool="cpu-own", kind="cpu"': 0.375},
    ),
    ("Pool busy ratio", "B"): (
        "pool, kind",
        {'pool="gpu-own", kind="gpu"': 0.5, 'pool="cpu-own", kind="cpu"': 0.5},
    ),
    ("Pool units: capacity, allocated, busy", "A"): (
        "pool",
        {'pool="gpu-own"': 8, 'pool="cpu-own"': 128},
    ),
    ("CPU utilisation (tally's 5 m window)", "A"): (
        "node",
        {'node="gpu-a01"': 0.25, 'node="cpu-b01"': 0.75},
    ),
    ("CPU utilisation (from counters)", "A"): (
        "node",
        {'node="gpu-a01"': 0.25, 'node="cpu-b01"': 0.75},
    ),
    ("Memory used", "A"): ("node", {'node="gpu-a01"': 0.75, 'node="cpu-b01"': 0.75}),
    ("GPU utilisation (5 m window) and the job holding it", "A"): (
        "node, gpu, slurm_job",
        {
            'node="gpu-a01", gpu="0", slurm_job="4711"': 0.75,
            'node="gpu-a01", gpu="1", slurm_job="4712"': 0.5,
            'node="gpu-a01", gpu="2"': 0.25,
        },
    ),
    ("Mean GPU utilisation per job", "A"): (
        "slurm_job",
        {'slurm_job="4711"': 0.75, 'slurm_job="4712"': 0.5},
    ),
    ("GPU memory used ratio", "A"): (
        "gpu",
        {'gpu="0"': 0.5, 'gpu="1"': 0.5, 'gpu="2"': 0.5},
    ),
    ("Power per node (from energy counters)", "A"): ("node", {'node="gpu-a01"': 600}),
    ("Power per node (from energy counters)", "B"): (
        "node",
        {'node="gpu-a01"': 200, 'node="cpu-b01"': 150},
    ),
    ("Energy in the time range", "A"): ("", {"": 0.6}),  # 600 W for an hour
    ("Energy in the time range", "B"): ("", {"": 0.35}),
    ("Tenant charge rate per hour", "A"): (
        "tenant, currency",
        {
            'tenant="acme", currency="CNY"': (2**-6 + 2**-7) * 3600,
            'tenant="beta", currency="CNY"': 2**-7 * 3600,
        },
    ),
    ("Tenant allocated units", "A"): (
        "tenant, kind",
        {
            'tenant="acme", kind="gpu"': 3,
            'tenant="beta", kind="gpu"': 1,
            'tenant="acme", kind="cpu"': 96,
        },
    ),
    ("Charges in the time range", "A"): (
        "tenant",
        {'tenant="acme"': (2**-6 + 2**-7) * 3600, 'tenant="beta"': 2**-7 * 3600},
    ),
    # acme holds 3 GPUs (1.5 busy) and 96 cores (48 busy), beta 1 GPU (0.25 busy)
    ("Tenant idle allocated units", "A"): (
        "tenant, kind",
        {
            'tenant="acme", kind="gpu"': 1.5,
            'tenant="beta", kind="gpu"': 0.75,
            'tenant="acme", kind="cpu"': 48,
        },
    ),
    ("Tenant efficiency", "A"): (
        "tenant, kind",
        {
            'tenant="acme", kind="gpu"': 0.5,
            'tenant="beta", kind="gpu"': 0.25,
            'tenant="acme", kind="cpu"': 0.5,
        },
    ),
    ("Tenant waste charge per hour", "A"): (
        "tenant, currency",
        {
            'tenant="acme", currency="CNY"': (2**-6 * 0.5 + 2**-7 * 0.5) * 3600,
            'tenant="beta", currency="CNY"': 2**-7 * 0.75 * 3600,
        },
    ),
    ("GPUs needing attention", "A"): ("", {"": 1}),
    ("GPUs needing attention", "B"): ("", {"": 1}),
    ("GPUs needing attention", "C"): ("", {"": 1}),
    ("GPUs needing attention", "D"): ("", {"": 1}),
    ("$node", ""): ("node", {'node="gpu-a01"': 1, 'node="cpu-b01"': 1, 'node="gpu-x99"': 1}),
    ("$pool", ""): (
        "pool",
        {'pool="gpu-own"': 1, 'pool="cpu-own"': 1, 'pool="gpu-leased"': 1},
    ),
}


def _label_sets(name: str, labels: tuple[str, ...]) -> list[dict[str, str]]:
    base: list[dict[str, str]] = []
    if "gpu" in labels:
        for node, gpu, uuid, job in GPUS:
            if "job" not in labels:
                base.append({"node": node, "gpu": gpu, "uuid": uuid})
            elif job is not None:  # tally_gpu_job_info: the GPUs a job holds
                base.append({"node": node, "gpu": gpu, "uuid": uuid, "job": job})
    elif "tenant" in labels:
        base = [{"pool": p, "kind": k, "tenant": t} for p, k, t in TENANTS]
    elif "pool" in labels:
        base = [{"pool": p, "kind": k} for p, k in POOL_ROWS]
    elif "job" in labels:
        base = [{"node": node, "job": job} for node, job in JOBS]
    elif "node" in labels:
        base = [{"node": node} for node in ALL_NODES]
    else:
        base = [{"instance": instance} for instance in DAEMONS]
    for label in labels:
        if label in base[0]:
            continue
        assert label in LABEL_VALUES, f"{name}: give label {label!r} values in LABEL_VALUES"
        base = [b | {label: value} for b in base for value in LABEL_VALUES[label]]
    return base


def _stored(labels: dict[str, str]) -> dict[str, str]:
    """The labels Prometheus stores for an exposed series (target labels added)."""
    out = {k: v for k, v in labels.items() if v}  # an empty label is no label
    if "job" in out and out["job"] not in HONOR_LABELS_JOBS:
        out["exported_job"] = out.pop("job")
    out.setdefault("job", "tally")
    node = labels.get("node")
    out.setdefault("instance", f"{node}:8469" if node else BILLING_DAEMON)
    return out


def _value(name: str, labels: dict[str, str]) -> float:
    for metric, match, value in SERIES_VALUES:
        if metric == name and match.items() <= labels.items():
            return value
    return 1


def _series_text(name: str, labels: dict[str, str]) -> str:
    body = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{body}}}"


def input_series() -> list[dict[str, str]]:
    """Every tally metric of METRICS as a synthetic series: counters from 0 growing linearly,
    gauges constant."""
    out = []
    for name, labels in EXPOSED.items():
        for exposed in _label_sets(name, labels):
            value = float(_value(name, exposed))
            stored = _stored(exposed)
            if name in COUNTERS:
                values = f"0+{value * STEP_SECONDS!r}x{STEPS}"
            else:
                values = f"{value!r}+0x{STEPS}"
            out.append({"series": _series_text(name, stored), "values": values})
    return out


def expression_tests(qs: list[Query]) -> list[dict[str, Any]]:
    tests: list[dict[str, Any]] = []
    for q in qs:
        # Some samples, all of them finite.
        tests.append(
            {
                "expr": f"count(abs({q.record}) < +Inf) == bool count({q.record})",
                "eval_time": EVAL_TIME,
                "exp_samples": [{"labels": "{}", "value": 1}],
            }
        )
        if q.key[0].startswith("$"):
            continue  # a variable lists every node or pool
        # Nothing from outside the nodes and pools the variables select.
        for label, values in (("node", NODES), ("pool", POOLS)):
            tests.append(
                {
                    "expr": f'{q.record}{{{label}=~".+", {label}!~"{"|".join(values)}"}}',
                    "eval_time": EVAL_TIME,
                    "exp_samples": [],
                }
            )
    by_key = {q.key: q for q in qs}
    for key, (by, samples) in EXPECTED.items():
        assert key in by_key, f"EXPECTED names {key}, which the dashboard does not have"
        tests.append(
            {
                "expr": f"sum by ({by}) ({by_key[key].record})",
                "eval_time": EVAL_TIME,
                "exp_samples": [{"labels": f"{{{k}}}", "value": v} for k, v in samples.items()],
            }
        )
    return tests


# --- tests -------------------------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = load()
    assert dashboard["title"]
    assert re.fullmatch(r"[\w-]{1,40}", dashboard["uid"])
    assert dashboard.get("id") is None  # importable by file
    assert dashboard["schemaVersion"] >= 36
    assert {"from", "to"} <= dashboard["time"].keys()

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert len(variables) == len(dashboard["templating"]["list"]), "duplicate variable names"
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("node", "pool"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE
        assert variable_query(variables[name]).startswith("label_values(")

    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids)
    assert len(set(ids)) == len(ids), f"duplicate panel ids: {sorted(ids)}"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        where = f"panel {panel['id']} {panel.get('title')!r}"
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in "hwxy"), where
        assert grid["h"] >= 1 and grid["w"] >= 1 and grid["x"] >= 0 and grid["y"] >= 0, where
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, where
        if panel in dashboard["panels"]:  # panels in collapsed rows have a grid of their own
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in cells, f"{where} overlaps panel {cells[(x, y)]}"
                    cells[(x, y)] = panel["id"]
        assert panel.get("title"), where
        if panel["type"] == "row":
            assert not panel.get("targets"), where
            continue
        assert panel["datasource"] == DATASOURCE, f"{where}: datasource is not $datasource"
        targets = panel["targets"]
        assert targets, f"{where} has no targets"
        refs = [t["refId"] for t in targets]
        assert len(set(refs)) == len(refs), f"{where}: duplicate refIds {refs}"
        for target in targets:
            assert isinstance(target["expr"], str) and target["expr"].strip(), where
            assert target.get("datasource", DATASOURCE) == DATASOURCE, where
            undefined = used_variables(target["expr"]) - variables.keys() - BUILTIN_VARIABLES
            assert not undefined, f"{where}: undefined variables {undefined}"


def test_every_expression_names_tally_metrics_and_labels() -> None:
    qs = queries(load())
    errors = [error for q in qs for error in name_errors(q)]
    if errors:
        pytest.fail("\n".join(errors))
    used = {name for q in qs for name, _ in selectors(q.promql)}
    assert used >= REQUIRED_METRICS, f"no panel uses {sorted(REQUIRED_METRICS - used)}"


def test_variables_list_labels_their_metric_has() -> None:
    for variable in load()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = _LABEL_VALUES.match(variable_query(variable))
        assert match is not None, variable["name"]
        selector, label = match.groups()
        ((name, _),) = selectors(selector)
        assert name in EXPOSED, f"variable ${variable['name']}: {name!r} is not a tally metric"
        assert label in EXPOSED[name], f"variable ${variable['name']}: {name} has no {label!r}"


def test_the_scanner_finds_names_where_promql_has_them() -> None:
    promql = (
        'sum by (node, job) (rate(a_total{mode!~"idle|x{y}", b="c"}[5m] offset 1m)) / 3.6e6'
        ' * on (node) group_left (slurm_job) label_replace(b, "d", "$1", "e", "(.+)")'
        " or vector(0) and topk(3, c:rec) > bool +Inf"
    )
    assert selectors(promql) == [("a_total", ["mode", "b"]), ("b", []), ("c:rec", [])]
    assert selectors('{__name__="x"}') == [("{...}", [])]
    expr = "rate(tally_cpu_seconds[1m])"
    renamed = Query("panel 1 'x' target A", ("x", "A"), "r", expr, expr)
    assert name_errors(renamed) == [
        f"{renamed.describe()} uses 'tally_cpu_seconds', not a tally metric"
        " (counters end in _total)"
    ]


def test_every_expression_runs_on_prometheus(tmp_path: Path, promtool: str) -> None:
    qs = queries(load())
    rules = {
        "groups": [
            {
                "name": "tally-dashboard",
                "rules": [{"record": q.record, "expr": q.promql} for q in qs],
            }
        ]
    }
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    check = subprocess.run(
        [promtool, "check", "rules", "rules.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check.returncode != 0:
        pytest.fail(_explain(check.stdout + check.stderr, qs))

    unit = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": f"{STEP_SECONDS}s",
                "input_series": input_series(),
                "promql_expr_test": expression_tests(qs),
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(unit, sort_keys=False))
    run = subprocess.run(
        [promtool, "test", "rules", "test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if run.returncode != 0:
        pytest.fail(_explain(run.stdout + run.stderr, qs))


def _explain(output: str, qs: list[Query]) -> str:
    """promtool's output, then the dashboard expression behind each recording rule it names."""
    named = set(re.findall(r"tally_dashboard:\w+", output))
    lines = [f"  {q.record} = {q.describe()}" for q in qs if q.record in named]
    return output + ("\nexpressions:\n" + "\n".join(lines) if lines else "")
