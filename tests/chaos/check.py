#!/usr/bin/python3
"""check.py: the history checker of tests/chaos (reads what driver.py wrote; sends nothing).

Proves, from the history alone:
  lost        every message answered delivered, queued or stored reached its recipient;
  misdelivery no message reached a user it was not addressed to (nor a message nobody sent,
              nor with other content or sender than sent);
  duplicate   each device was shown each message at most once: on one connection (the
              gateway's guarantee, DESIGN.md "At most once per device"), and over the
              device's reconnections (reported apart: DESIGN.md allows a repeat around a
              gateway crash, always with the same id; --strict-reconnect fails on it too);
  order       DESIGN.md's order table, path by path: what one sender connection sent to one
              recipient, answered on the same path (local, grpc, kafka; inbox arrival), is
              shown on one recipient connection in the order it was sent. Messages whose
              paths differ are not compared ("across a path switch: not guaranteed"), nor
              messages without a positive answer.

Usage: check.py HISTORY [--json OUT] [--strict-reconnect] [--max-show N]
Exit 0 when every check holds, 1 when one does not, 2 on an unreadable history.
"""
import argparse
import json
import sys

PROMISED = ("delivered", "queued", "stored")


def load(path):
    sends, answers, recvs, conns, faults, phases = {}, {}, [], {}, [], []
    closes = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                e = json.loads(line)
            except ValueError:
                raise SystemExit(f"check: {path}:{n}: not JSON")
            ev = e.get("ev")
            if ev == "send":
                sends[e["id"]] = e
            elif ev == "answer":
                answers.setdefault(e["id"], []).append(e)
            elif ev == "recv":
                recvs.append(e)
            elif ev == "conn":
                conns[e["conn"]] = e
            elif ev == "fault":
                faults.append(e)
            elif ev == "phase":
                phases.append(e)
            elif ev == "closed":
                closes[str(e.get("code"))] = closes.get(str(e.get("code")), 0) + 1
    conns["_closes"] = closes
    return sends, answers, recvs, conns, faults, phases


def best_answer(answers):
    """The answer that counts: a positive one if any (a message is answered once per send)."""
    for a in answers or ():
        if a["status"] in PROMISED:
            return a
    return (answers or [None])[-1]


def check(sends, answers, recvs, strict_reconnect=False):
    v = {"lost": [], "misdelivery": [], "duplicate": [], "duplicate_reconnect": [], "order": []}
    seen_conn, seen_user = {}, {}
    for r in recvs:
        s = sends.get(r["id"])
        if s is None:
            v["misdelivery"].append({"why": "a message nobody sent", "recv": r})
            continue
        if r["user"] != s["to"]:
            v["misdelivery"].append({"why": f"addressed to {s['to']}", "recv": r})
            continue
        if r.get("from") != s["from"] or r.get("content") != f"c:{s['id']}:{s['to']}":
            v["misdelivery"].append({"why": "sender or content differs from the send", "recv": r})
            continue
        k = (r["conn"], r["id"])
        if k in seen_conn:
            v["duplicate"].append({"first": seen_conn[k], "again": r})
            continue
        seen_conn[k] = r
        ku = (r["user"], r["id"])
        if ku in seen_user:
            v["duplicate_reconnect"].append({"first": seen_user[ku], "again": r})
        else:
            seen_user[ku] = r
    # lost: a positive answer and never shown to the recipient
    for mid, s in sends.items():
        a = best_answer(answers.get(mid))
        if a and a["status"] in PROMISED and (s["to"], mid) not in seen_user:
            v["lost"].append({"send": s, "answer": a})
    # order: per recipient connection, per (sender connection, answer, how shown), seq grows
    last, compared = {}, {}
    for r in recvs:
        s = sends.get(r["id"])
        if s is None or r["user"] != s["to"] or seen_conn.get((r["conn"], r["id"])) is not r:
            continue
        a = best_answer(answers.get(r["id"]))
        if not a or a["status"] not in PROMISED:
            continue
        k = (r["conn"], s["from"], s["sconn"], a["status"], a["path"], bool(r.get("inbox")))
        prev = last.get(k)
        if prev is not None:
            cls = f"{a['status']}/{a['path']}" + ("/from inbox" if r.get("inbox") else "")
            compared[cls] = compared.get(cls, 0) + 1
        if prev is not None and sends[prev["id"]]["seq"] > s["seq"]:
            v["order"].append({"path": f"{a['status']}/{a['path']}" +
                               ("/shown from inbox" if r.get("inbox") else ""),
                               "shown_first": prev, "shown_after": r})
        if prev is None or sends[prev["id"]]["seq"] < s["seq"]:
            last[k] = r
    failing = ["lost", "misdelivery", "duplicate", "order"]
    if strict_reconnect:
        failing.append("duplicate_reconnect")
    ok = all(not v[k] for k in failing)
    v["_order_pairs_compared"] = compared
    return ok, v


def summary(sends, answers, recvs, faults, phases, v, closes=None):
    status = {}
    paths = {}
    for mid in sends:
        a = best_answer(answers.get(mid))
        st = a["status"] if a else "unanswered"
        status[st] = status.get(st, 0) + 1
        if a and st in PROMISED:
            paths[f"{st}/{a['path']}"] = paths.get(f"{st}/{a['path']}", 0) + 1
    load = next((p for p in phases if p.get("name") == "load"), {})
    settle = next((p for p in phases if p.get("name") == "settle"), {})
    end = next((p for p in phases if p.get("name") == "end"), {})
    return {
        "sent": len(sends),
        "load_seconds": settle.get("load_seconds", load.get("seconds")),
        "rate_per_s": round(len(sends) / settle["load_seconds"]) if settle.get("load_seconds") else None,
        "max_behind_schedule": end.get("max_behind_schedule"),
        "answers": status,
        "promised_by_path": paths,
        "promised": sum(status.get(k, 0) for k in PROMISED),
        "frames_shown": len(recvs),
        "faults": [f"t={f['t'] - load.get('t', 0):.1f}s {f['what']}" for f in faults],
        "settled": end.get("settled"),
        "lost": len(v["lost"]),
        "misdelivered": len(v["misdelivery"]),
        "duplicates_same_connection": len(v["duplicate"]),
        "duplicates_after_reconnect": len(v["duplicate_reconnect"]),
        "duplicates_after_reconnect_from_inbox": sum(
            1 for d in v["duplicate_reconnect"] if d["first"].get("inbox") and d["again"].get("inbox")),
        "server_closes": closes,
        "order_violations": len(v["order"]),
        "order_pairs_compared": v.get("_order_pairs_compared"),
    }


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("history")
    ap.add_argument("--json", help="write the summary and the violations here")
    ap.add_argument("--strict-reconnect", action="store_true",
                    help="also fail on a message shown again after a reconnection")
    ap.add_argument("--max-show", type=int, default=5)
    a = ap.parse_args(argv)
    try:
        sends, answers, recvs, conns, faults, phases = load(a.history)
    except OSError as e:
        print(f"check: {e}")
        return 2
    ok, v = check(sends, answers, recvs, a.strict_reconnect)
    s = summary(sends, answers, recvs, faults, phases, v, conns["_closes"])
    if s["promised"] == 0:  # a history with nothing promised proves nothing
        print("check: no message was answered delivered, queued or stored")
        ok = False
    for k, val in s.items():
        print(f"check: {k}: {val}")
    v.pop("_order_pairs_compared", None)
    for k, items in v.items():
        for it in items[:a.max_show]:
            print(f"check: {k.upper()}: {json.dumps(it, separators=(',', ':'))}")
        if len(items) > a.max_show:
            print(f"check: ... {len(items) - a.max_show} more {k}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"ok": ok, "summary": s, "violations": v}, f, indent=1)
    print(f"check: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
