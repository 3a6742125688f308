"""bench/compare.py PREVIOUS.jsonl CURRENT.jsonl: each scenario's change.

Used by bench/run.sh after every run, against the previous run's latest.jsonl,
so a regression shows the day it lands. A change of 5 % or more is marked
better or WORSE (msg/s up is better; latency, CPU per message, fan-out time and
memory per connection down are better)."""
import json
import sys

KEYS = [("msgs_per_s", "msg/s", 1), ("p99_us", "p99 us", -1), ("gw_cpu_us_per_msg", "CPU us/msg", -1),
        ("all_received_ms_mean", "fan-out ms", -1), ("rss_per_conn_bytes", "B/conn", -1)]


def load(path):
    rows, machine = {}, {}
    for line in open(path):
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("scenario") == "machine":
            machine = r
            continue
        if r.get("skipped") or (r.get("scenario") == "fanout" and not r.get("summary")):
            continue
        rows[r.get("label")] = r
    return rows, machine


prev, m = load(sys.argv[1])
cur, _ = load(sys.argv[2])
print(f"change against the previous run ({m.get('run')}, commit {m.get('commit')}):")
for label, r in cur.items():
    p = prev.get(label)
    if not p:
        print(f"  {label}: new")
        continue
    parts = []
    for key, name, better in KEYS:
        a, b = p.get(key), r.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b >= 0:
            ch = (b - a) / a * 100
            tag = "" if abs(ch) < 5 else (" better" if ch * better > 0 else " WORSE")
            parts.append(f"{name} {a:,.1f} -> {b:,.1f} ({ch:+.0f}%{tag})")
    print(f"  {label}: " + "; ".join(parts))
