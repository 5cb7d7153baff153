"""The Prometheus endpoint (--metrics): scraped over HTTP, parsed by the real Prometheus client
parser, and compared with INFO audit on the control port."""
import urllib.request

import redis
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, wait_until


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_match_info_audit(valkey, start_auditor):
    mport = free_port()
    auditor = start_auditor(valkey.pid, extra=("--metrics", f"127.0.0.1:{mport}"))
    with valkey.client() as c:
        for i in range(20):
            c.set(f"m{i}", "v")
        c.get("m1")
    auditor.wait_records(lambda rs: sum(r["command"] == "set" for r in rs) == 20
                         and any(r["command"] == "get" for r in rs), what="21 commands")
    control = redis.Redis(port=auditor.control)
    # The counters settle once the sink has written everything: wait until two readings agree.
    wait_until(lambda: control.info("audit")["audit_total_events"] == len(auditor.lines()),
               what="INFO to count every written record")
    info = control.info("audit")
    m = scrape(mport)
    for cat in ["connection", "auth", "config", "key_op", "other", "audit", "audit_loss"]:
        got = m.get(("auditor_records_total", (("category", cat),)))
        assert got == info[f"audit_events_{cat}"], (cat, got, info[f"audit_events_{cat}"])
    assert m[("auditor_filtered_total", ())] == info["audit_exclusion_hits"]
    assert m[("auditor_write_errors_total", ())] == info["audit_total_errors"]
    assert m[("auditor_connections", ())] == info["audit_connections"]
    assert m[("auditor_lost_records_total", (("cause", "ring_buffer_full"),))] == \
        info["audit_lost_ring_buffer_events"]
    assert m[("auditor_lost_records_total", (("cause", "queue_overflow"),))] == \
        info["audit_lost_queue_overflow"]
    assert m[("auditor_targets", ())] == info["audit_targets"] == 1
    target = [(k, v) for k, v in m.items() if k[0] == "auditor_target_records_total"]
    assert len(target) == 1
    labels = dict(target[0][0][1])
    assert labels["pid"] == str(valkey.pid) and labels["port"] == str(valkey.port)
    per = info[f"audit_target_{valkey.pid}"]
    per = dict(kv.split("=") for kv in per.split(",")) if isinstance(per, str) else per
    assert int(per["records"]) == target[0][1]
    key_ops = sum(1 for r in auditor.records() if r["category"] == "KEY_OP")
    assert m[("auditor_records_total", (("category", "key_op"),))] == key_ops == 21
    assert m[("auditor_sink_up", (("sink", "file"),))] == 1
    assert m[("auditor_ring_buffer_size_bytes", ())] == \
        info["audit_ring_buffer_size_bytes"] == 16 * 1024 * 1024


def test_metrics_endpoint_rejects_other_paths(valkey, start_auditor):
    mport = free_port()
    start_auditor(valkey.pid, extra=("--metrics", f"127.0.0.1:{mport}"))
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{mport}/nope", timeout=5)
        raise AssertionError("expected 404")
    except urllib.error.HTTPError as e:
        assert e.code == 404


def test_info_audit_has_the_modules_filter_counters(valkey, start_auditor):
    """`audit_prefix_filter_*` and `audit_custom_category*`, as the module names them."""
    from test_capture import info_audit
    auditor = start_auditor(valkey.pid, settings=(
        "audit.prefix_filter", "!ft*,get", "audit.custom_category", "reads:get,mget",
        "audit.events", "all,reads"))
    with valkey.client() as c:
        for i in range(3):
            c.get(f"p{i}")
        c.set("p-set", "v")
    auditor.wait_records(lambda rs: any(r["command"] == "set" for r in rs))
    fields = wait_until(lambda: (f := info_audit(auditor))
                        and f.get("audit_custom_category_matches") == "3" and f,
                        what="INFO audit to count the three GETs")
    assert fields["audit_prefix_filters_count"] == "2"
    assert fields["audit_custom_categories_count"] == "1"
    # Every command is checked (the client's HELLO/CLIENT SETINFO too); the GETs match.
    checks = int(fields["audit_prefix_filter_checks"])
    assert checks >= 4 and fields["audit_prefix_filter_matches"] == "3", fields
    assert fields["audit_prefix_filter_hit_rate_percent"] == f"{300 / checks:.2f}"
