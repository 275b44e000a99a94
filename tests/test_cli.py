from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from telemetry.cli import build_parser, daemon_config, main
from telemetry.collectors import REGISTRY
from telemetry.errors import TallyError
from tests.support.cli import tally
from tests.support.net import free_port
from tests.support.promtool import promtool_check
from tests.support.tables import cpu_table, gpu_table, job_table, write_dataset


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["daemon", "--bogus"], "unrecognized arguments: --bogus"),
        (["daemon", "--listen", "nonsense"], "expected ADDR:PORT"),
        (["daemon", "--listen", "127.0.0.1:99999"], "port must be a number"),
        (["daemon", "--interval", "-1"], "is not a duration"),
        (["daemon", "--interval", "45s"], "more than half of max-gap"),
        (
            ["daemon", "--path.procfs", "/nonexistent/proc"],
            "--path.procfs /nonexistent/proc: not a directory",
        ),
        (
            ["replay", "/nonexistent/dataset", "--once"],
            "dataset /nonexistent/dataset does not exist",
        ),
        (["replay", "/tmp", "--speed", "0"], "must be positive"),
        # each of these was a traceback or a value that could not work (item 19 of the
        # reliability round): one line, exit 2
        (["bill", "/tmp", "--inventory", "x", "--window", "10000000000"], "longer than"),
        (["bill", "/tmp", "--inventory", "x", "--window", "9" * 400], "longer than a century"),
        (["aggregate", "/tmp", "--inventory", "x", "--poll", "10000000000"], "longer than"),
        (["aggregate", "/tmp", "--inventory", "x", "--poll", "2d"], "between 0.1s"),
        (["aggregate", "/tmp", "--inventory", "x", "--poll", "0"], "between 0.1s"),
        (["replay", "/tmp", "--max-gap", "10000000000"], "longer than"),
        (["replay", "/tmp", "--max-gap", "30d"], "between 1s"),
        (["replay", "/tmp", "--speed", "1e-300"], "between 1e-06"),
        (["demo", "/tmp/never", "--hours", "1e-9"], "between 0.05"),
        (["demo", "/tmp/never", "--seed", "-1"], "between 0 and 2^63"),
        (["daemon", "--interval", "0.01"], "between 0.1s"),
        (["frobnicate"], "invalid choice"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = tally(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tally: error: ") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_a_multi_line_reason_is_one_line_in_logs_and_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """pyarrow's thrift errors span lines; a log line and an error line are one line each."""
    import logging

    from telemetry.logs import say, setup

    root = logging.getLogger("tally")
    kept = (root.handlers[:], root.propagate, root.level)
    setup("info", "text")
    reason = (
        "Couldn't deserialize thrift: don't know what type: \nDeserializing page header failed.\n"
    )
    logging.getLogger("tally.store").warning("quarantined x.parquet: unreadable: %s", reason)
    say(f"x.parquet: {reason}", "error")
    root.handlers[:], root.propagate = kept[0], kept[1]
    root.setLevel(kept[2])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("type: Deserializing page header failed.")
    assert lines[1] == (
        "tally: error: x.parquet: Couldn't deserialize thrift: don't know what type: "
        "Deserializing page header failed."
    )


def test_unwritable_data_dir_and_busy_port_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = tally(
        "daemon", "--data-dir", str(blocker / "data"), "--listen", f"127.0.0.1:{free_port()}"
    )
    assert result.returncode == 2 and "data dir" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = tally("daemon", "--data-dir", str(tmp_path / "d"), "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_collector_flags_come_from_the_registry() -> None:
    parser = build_parser()
    for name in REGISTRY:
        args = parser.parse_args(["daemon", f"--no-collector.{name}"])
        assert daemon_config(args).collectors[name] is False
        args = parser.parse_args(["daemon", f"--collector.{name}"])
        assert daemon_config(args).collectors[name] is True
    assert set(daemon_config(parser.parse_args(["daemon"])).collectors) == set(REGISTRY)


def test_gpu_energy_source_from_the_command_line_or_the_config_file(tmp_path: Path) -> None:
    parser = build_parser()
    assert daemon_config(parser.parse_args(["daemon"])).gpu_energy == "counter"  # the default
    config = tmp_path / "tally.toml"
    config.write_text('[collector]\ngpu = true\n[gpu]\nenergy = "power"\n')  # both: valid TOML
    cfg = daemon_config(parser.parse_args(["daemon", "--config", str(config)]))
    assert cfg.gpu_energy == "power" and cfg.collectors["gpu"] is True
    args = parser.parse_args(["daemon", "--config", str(config), "--gpu.energy", "counter"])
    assert daemon_config(args).gpu_energy == "counter"  # command line beats the file
    with pytest.raises(TallyError, match="invalid choice: 'watts'"):
        parser.parse_args(["daemon", "--gpu.energy", "watts"])


def test_config_file_precedence_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tally.toml"
    config.write_text(
        'listen = "127.0.0.1:9999"\ninterval = "10s"\ndata-dir = "/var/lib/tally"\n'
        '[path]\nprocfs = "/host/proc"\n[collector]\nrapl = false\n'
    )
    parser = build_parser()
    cfg = daemon_config(parser.parse_args(["daemon", "--config", str(config), "--interval", "2"]))
    assert cfg.interval_seconds == 2.0  # command line beats the file
    assert cfg.listen == "127.0.0.1:9999" and str(cfg.data_dir) == "/var/lib/tally"
    assert str(cfg.procfs) == "/host/proc" and cfg.collectors["rapl"] is False
    assert cfg.collectors["cpu"] is True  # default
    config.write_text('listen = "x:1"\nlisen = "typo"\n')
    assert main(["daemon", "--config", str(config)]) == 2
    assert "unknown key 'lisen'" in capsys.readouterr().err
    config.write_text("listen = \n")
    assert main(["daemon", "--config", str(config)]) == 2
    assert f"config {config}: not valid TOML" in capsys.readouterr().err


def test_daemon_counts_gaps_by_its_inventory(tmp_path: Path) -> None:
    """The daemon's node series take the inventory's max_gap_seconds, as its pool counters do;
    a --max-gap (or config file max-gap) that differs is refused; one that agrees is fine."""
    from telemetry.errors import TallyError

    inv = tmp_path / "inv.toml"
    inv.write_text(
        'max_gap_seconds = 120\n[[pool]]\nname = "p"\nkind = "cpu"\nownership = "own"\n'
        'nodes = ["*"]\ncost_per_unit_hour = 1.0\nprice_per_unit_hour = 2.0\n'
    )
    parser = build_parser()
    given = ["daemon", "--inventory", str(inv)]
    assert daemon_config(parser.parse_args(given)).max_gap_seconds == 120
    assert daemon_config(parser.parse_args([*given, "--max-gap", "2m"])).max_gap_seconds == 120
    clash = daemon_config(parser.parse_args([*given, "--max-gap", "90s"]))
    with pytest.raises(TallyError, match=r"max-gap 90s differs from max_gap_seconds = 120"):
        clash.check()  # what the daemon runs first, and doctor reports as one line
    config = tmp_path / "tally.toml"
    config.write_text('max-gap = "30s"\n')
    with pytest.raises(TallyError, match=r"max-gap 30s differs"):
        daemon_config(parser.parse_args([*given, "--config", str(config)])).check()
    assert daemon_config(parser.parse_args(["daemon"])).max_gap_seconds == 60
    refused = tally("daemon", *given[1:], "--max-gap", "90s", "--listen", "127.0.0.1:0")
    assert refused.returncode == 2 and "differs from max_gap_seconds" in refused.stderr
    doctor = tally("doctor", *given[1:], "--max-gap", "90s", "--listen", "127.0.0.1:0")
    lines = doctor.stdout.splitlines()
    assert any(x.startswith("[FAIL] settings:") and "differs" in x for x in lines), doctor.stdout
    assert any(x.startswith("[  ok] inventory:") for x in lines)  # and the other checks ran


def test_replay_once_prints_a_promtool_clean_exposition(tmp_path: Path, promtool: str) -> None:
    times = [float(t) for t in range(0, 900, 10)]
    write_dataset(tmp_path, "cpu", cpu_table("n1", times, busy_share=0.4))
    write_dataset(tmp_path, "gpu", gpu_table("n1", "GPU-a", 0, times, util=0.75, job_id="9"))
    write_dataset(tmp_path, "job", job_table("n1", "9", times))
    result = tally("replay", str(tmp_path), "--once")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert 'tally_cpu_utilization_ratio{node="n1",window="5m"} 0.4' in out
    assert (
        'tally_gpu_utilization_avg_ratio{gpu="0",node="n1",uuid="GPU-a",window="15m"} 0.75' in out
    )
    assert 'tally_gpu_job_info{gpu="0",job="9",node="n1",uuid="GPU-a"} 1.0' in out
    # 89 intervals of 10 s at 75 %.
    assert 'tally_gpu_busy_seconds_total{gpu="0",node="n1",uuid="GPU-a"} 667.5' in out
    assert "process_" not in out, "replay output is a function of the dataset only"
    check = promtool_check(promtool, result.stdout.encode())
    assert check.returncode == 0, check.stdout + check.stderr


def test_replay_paced_reaches_the_same_final_state(tmp_path: Path) -> None:
    times = [float(t) for t in range(0, 120, 5)]
    write_dataset(tmp_path, "cpu", cpu_table("n1", times, busy_share=0.3))
    fast = tally("replay", str(tmp_path), "--once")
    paced = tally("replay", str(tmp_path), "--once", "--speed", "200")
    assert fast.returncode == paced.returncode == 0
    assert fast.stdout == paced.stdout


def test_help_says_defaults_and_the_forms_each_option_takes() -> None:
    def help_of(*command: str) -> str:
        return " ".join(tally(*command, "--help").stdout.split())  # argparse wraps lines

    bill = help_of("bill")
    assert "(default 1h)" in bill and "json (default)" in bill
    assert "without an offset, in the bill's time zone" in bill and "(UTC)" not in bill
    assert "dataset directory to read" in bill
    assert "(default 127.0.0.1:8470)" in help_of("aggregate")
    assert "the same seed writes the same dataset" in help_of("demo")
    assert "e.g. 5s, 500ms" in help_of("daemon")
    window = tally("bill", "x", "--inventory", "y", "--window", "5x")
    assert window.returncode == 2 and "15m, 1h, 1d" in window.stderr and "5s" not in window.stderr


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("node = 5\n", "node must be a string, got 5"),
        ('dcgm-compat = "no"\n', "dcgm-compat must be true or false"),
        ('[collector]\ngpu = "off"\n', "collector.gpu must be true or false"),
        ('[gpu]\nenergy = "watts"\n', "gpu.energy must be counter or power, got 'watts'"),
        ("interval = true\n", "interval must be a duration"),
        ('max-gap = "30d"\n', "max-gap: 2.592e+06s must be between"),
    ],
)
def test_config_values_of_the_wrong_type_are_one_line_errors(
    tmp_path: Path, body: str, message: str
) -> None:
    config = tmp_path / "tally.toml"
    config.write_text(body)
    result = tally("daemon", "--config", str(config), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_inventory_values_a_finance_team_would_not_type(tmp_path: Path) -> None:
    pool = (
        '[[pool]]\nname = "{name}"\nkind = "gpu"\nownership = "own"\nnodes = ["*"]\n'
        "cost_per_unit_hour = {cost}\nprice_per_unit_hour = {price}\n"
    )
    cases = [
        (
            "max_gap_seconds = 1e300\n",
            "max_gap_seconds: must be a finite number >= 0 and <= 604800",
        ),
        (pool.format(name="p", cost=1, price="1e308"), "price_per_unit_hour: must be a finite"),
        (pool.format(name="Unassigned ", cost=1, price=2), "reserved"),
    ]
    for body, message in cases:
        inventory = tmp_path / "inv.toml"
        inventory.write_text(body)
        result = tally("bill", str(tmp_path), "--inventory", str(inventory))
        assert result.returncode == 2 and message in result.stderr, (body, result.stderr)
    from telemetry.billing.inventory import parse_inventory

    negative_zero = parse_inventory(pool.format(name="p", cost="-0.0", price="-0.0"))
    assert str(negative_zero.pools[0].price_per_unit_hour) == "0.0"  # never "-0.00" on a bill


def _bill_on_one_cpu_pool(tmp_path: Path, root: Path) -> subprocess.CompletedProcess[str]:
    """``tally bill`` of ``root`` with an inventory of one owned CPU pool over every node."""
    inventory = tmp_path / "inv.toml"
    inventory.write_text(
        '[[pool]]\nname = "p"\nkind = "cpu"\nownership = "own"\nnodes = ["*"]\n'
        "cost_per_unit_hour = 1\nprice_per_unit_hour = 2\n"
    )
    return tally("bill", str(root), "--inventory", str(inventory))


def test_a_file_name_that_is_not_utf8_is_said_not_a_traceback(tmp_path: Path) -> None:
    from tests.support.tables import cpu_table, write_dataset

    root = tmp_path / "ds"
    good = write_dataset(root, "cpu", cpu_table("n1", [0.0, 30.0]))
    (good.parent / b"caf\xe9-torn.parquet".decode("utf-8", "surrogateescape")).write_bytes(
        b"PAR1 torn"
    )
    result = _bill_on_one_cpu_pool(tmp_path, root)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr
    assert "caf\\udce9-torn.parquet" in result.stderr and "not valid UTF-8" in result.stderr
    import json

    assert json.loads(result.stdout)["input"]["files_quarantined"] == 1


def test_head_metrics_answers_like_get_without_a_body(tmp_path: Path) -> None:
    import http.client

    from tests.support.daemon import DaemonProcess

    daemon = DaemonProcess(tmp_path / "data", tmp_path, node="head")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=5)
        conn.request("HEAD", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b""
        assert int(resp.getheader("Content-Length", "0")) > 0
        conn.close()
    finally:
        daemon.stop()


def test_a_column_name_that_is_not_utf8_is_quarantined_not_a_traceback(tmp_path: Path) -> None:
    from tests.support.tables import cpu_table, write_dataset, write_undecodable_column_name

    root = tmp_path / "ds"
    good = write_dataset(root, "cpu", cpu_table("n1", [0.0, 30.0]))
    bad = good.parent.parent / "node=n2" / "foreign.parquet"
    write_undecodable_column_name(bad, cpu_table("n2", [0.0, 30.0]), "node")
    result = _bill_on_one_cpu_pool(tmp_path, root)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "foreign.parquet" in result.stderr and "column name is not valid UTF-8" in result.stderr
    import json

    billed = json.loads(result.stdout)
    assert billed["input"]["files_quarantined"] == 1
    assert (billed["input"]["files"], billed["input"]["rows"]) == (1, 2)  # n1's file, whole
    assert not bad.exists() and (root / "quarantine").is_dir()
