"""The benchmark script keeps working (a small run; nothing about speed)."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_benchmark_smoke_run():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench.py"), "--lines", "20000",
         "--repeats", "1", "--workers", "2", "--bad-fraction", "0.1", "--latency",
         "--big-auth-keys", "2000", "--scale-out", "--rate-limit", "--tls", "--flood", "2000"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    runs = [r for r in records if "proxy" in r]
    assert {r["proxy"] for r in runs} == {"no-proxy", "plain-verifier", "amproxy",
                                          "amproxy-3-destinations", "amproxy-broadcast-2",
                                          "amproxy-rate-limited", "amproxy-tls"}
    # Every line reaches its destinations: once over three, twice with broadcast.
    assert all(r["lost"] == 0 and r["extra"] == 0 for r in runs if r["proxy"] != "no-proxy")
    amproxy = next(r for r in runs if r["proxy"] == "amproxy")
    assert amproxy["valid_lines"] == 18000
    assert amproxy["lost"] == 0
    assert amproxy["cpu_us_per_line"] > 0
    assert len(amproxy["peak_rss_mb_per_worker"]) == 2
    summary = records[-1]
    assert summary["idle_latency_ms_median"] > 0
    assert summary["auth_keys"] == 2000
    assert 0 < summary["pss_mb_at_start"] and 0 < summary["pss_mb_after_10_reloads"]
    assert summary["keys_new_seconds_median"] > 0
    assert summary["routing_us_per_line"] > 0
    assert summary["tls_handshakes_per_s_one_worker"] > 0
    assert summary["flood_alone_s"] > 0 and summary["flood_beside_3_s"] > 0
    assert "| amproxy | 2 |" in result.stderr


def test_fleet_shapes_smoke_run():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench.py"), "--fleet-only",
         "--storm", "300", "--churn", "300", "--tls-churn", "40", "--repeats", "1",
         "--workers", "1", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.splitlines()[-1])["fleet"]
    rows = {(s["shape"], s["proxy"], s["workers"]): s for s in summary}
    for shape in ("storm", "churn"):
        for workers in (1, 2):
            row = rows[(shape, "amproxy", workers)]
            assert row["lost"] == row["client_errors"] == 0, row
            assert row["cpu_us_per_connection"] > 0
        assert "seconds_vs_1_worker" in rows[(shape, "amproxy", 2)]
    tls = rows[("tls-churn", "amproxy", 2)]
    # Every client after a thread's first resumes its session (8 threads).
    assert tls["tls13_resumed_resumed"] >= 40 - 8 and tls["tls12_resumed_resumed"] >= 40 - 8
    assert tls["tls13_full_resumed"] == tls["tls12_full_resumed"] == 0
    assert "| storm | amproxy | 2 |" in result.stderr


def test_device_view_smoke_run():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench.py"), "--devices-only",
         "--devices", "500", "--repeats", "1", "--workers", "2"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["devices_keys"] == 500
    for query in ("table", "json", "silent_1h", "rejected", "one_key",
                  "sorted_last_accepted", "table_server"):
        assert summary["devices_%s_s" % query] > 0
