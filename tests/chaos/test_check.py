#!/usr/bin/python3
"""test_check.py: the history checker is known to work (it fails what it must fail).

Without arguments: a small history that holds (three senders, every path, a reconnection, an
inbox drain) must pass; the same history with one delivered message dropped, one shown twice
on a connection, one shown to a user it was not addressed to, and two swapped on one path
must each fail, for that reason. Prints `chaos-check: N passed, M failed`.

With --mutate HISTORY: a real run's history with one shown message removed (a message answered
delivered, queued or stored) must fail the check as lost. Exit 0 when it does.
"""
import copy
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check  # noqa: E402


def ev(kind, t, **kw):
    return {"ev": kind, "t": t, **kw}


def good_history():
    h = [ev("phase", 0, name="load")]
    t = 1.0

    def msg(mid, frm, to, sconn, seq, status, path, rconn, inbox=False, shown=True):
        nonlocal t
        h.append(ev("send", t, id=mid, **{"from": frm}, to=to, via="ws", sconn=sconn, seq=seq))
        h.append(ev("answer", t + 0.01, id=mid, status=status, path=path, reason=None))
        if shown:
            h.append(ev("recv", t + 0.02, user=to, conn=rconn, id=mid, **{"from": frm},
                        content=f"c:{mid}:{to}", inbox=inbox))
        t += 0.1

    h.append(ev("conn", 0.5, user="bob", conn="bob#1", gw="eu1"))
    h.append(ev("conn", 0.5, user="carol", conn="carol#1", gw="us1"))
    msg("a1", "alice", "bob", "alice#1", 1, "delivered", "local", "bob#1")
    msg("a2", "alice", "bob", "alice#1", 2, "delivered", "local", "bob#1")
    msg("a3", "alice", "carol", "alice#1", 3, "queued", "kafka", "carol#1")
    msg("a4", "alice", "carol", "alice#1", 4, "delivered", "grpc", "carol#1")
    msg("a5", "alice", "carol", "alice#1", 5, "queued", "kafka", "carol#1")
    msg("s1", "svc0", "bob", "svc0@eu1", 1, "delivered", "local", "bob#1")
    msg("s2", "svc0", "dave", "svc0@eu1", 2, "stored", "inbox", "dave#1", inbox=True,
        shown=False)
    msg("s3", "svc0", "dave", "svc0@eu1", 3, "stored", "inbox", "dave#1", inbox=True,
        shown=False)
    msg("f1", "alice", "bob", "alice#1", 6, "failed", "none", "bob#1", shown=False)
    # a message on a path switch may come before an older one (not compared): a6 by grpc
    # after a5 by kafka, shown before a5 would be fine; here it is simply shown later
    h.append(ev("fault", t, what="SIGKILL gateway eu1"))
    h.append(ev("phase", t, name="settle"))
    h.append(ev("conn", t, user="dave", conn="dave#1", gw="eu2"))
    for mid in ("s2", "s3"):
        h.append(ev("recv", t, user="dave", conn="dave#1", id=mid, **{"from": "svc0"},
                    content=f"c:{mid}:dave", inbox=True))
    h.append(ev("phase", t + 1, name="end", settled=True))
    return h


def run(history, *flags):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for e in history:
            f.write(json.dumps(e) + "\n")
        path = f.name
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    try:
        with open(os.devnull, "w") as null:
            old, sys.stdout = sys.stdout, null
            try:
                rc = check.main([path, "--json", out, *flags])
            finally:
                sys.stdout = old
        with open(out) as f:
            return rc, json.load(f)
    finally:
        os.unlink(path)
        os.unlink(out)


def find(h, pred):
    return next(i for i, e in enumerate(h) if pred(e))


def cases():
    good = good_history()

    def dropped():
        h = copy.deepcopy(good)
        del h[find(h, lambda e: e["ev"] == "recv" and e["id"] == "a4")]
        return h

    def duplicate():
        h = copy.deepcopy(good)
        i = find(h, lambda e: e["ev"] == "recv" and e["id"] == "a2")
        h.insert(i + 1, copy.deepcopy(h[i]))
        return h

    def misdelivered():
        h = copy.deepcopy(good)
        r = copy.deepcopy(h[find(h, lambda e: e["ev"] == "recv" and e["id"] == "a1")])
        r.update(user="carol", conn="carol#1")
        h.append(r)
        return h

    def reordered():
        h = copy.deepcopy(good)
        i = find(h, lambda e: e["ev"] == "recv" and e["id"] == "a1")
        j = find(h, lambda e: e["ev"] == "recv" and e["id"] == "a2")
        h[i], h[j] = h[j], h[i]
        return h

    def reordered_inbox():
        h = copy.deepcopy(good)
        i = find(h, lambda e: e["ev"] == "recv" and e["id"] == "s2")
        h[i], h[i + 1] = h[i + 1], h[i]
        return h

    def path_switch():  # a5 (kafka) shown before a4 (grpc): allowed by DESIGN.md
        h = copy.deepcopy(good)
        i = find(h, lambda e: e["ev"] == "recv" and e["id"] == "a4")
        j = find(h, lambda e: e["ev"] == "recv" and e["id"] == "a5")
        h[i], h[j] = h[j], h[i]
        return h

    def reconnect_repeat():
        h = copy.deepcopy(good)
        r = copy.deepcopy(h[find(h, lambda e: e["ev"] == "recv" and e["id"] == "a1")])
        h.append(ev("conn", 9, user="bob", conn="bob#2", gw="eu2"))
        r.update(conn="bob#2", t=9)
        h.append(r)
        return h

    def lost_not_promised():  # a FAILED message that never arrives is not lost
        return copy.deepcopy(good)

    return [
        ("a history that holds passes", good, (), 0, None),
        ("a FAILED message never shown is not a loss", lost_not_promised(), (), 0, None),
        ("a path switch may reorder", path_switch(), (), 0, None),
        ("a dropped DELIVERED message fails as lost", dropped(), (), 1, "lost"),
        ("a message shown twice on a connection fails", duplicate(), (), 1, "duplicate"),
        ("a message shown to another user fails", misdelivered(), (), 1, "misdelivery"),
        ("two local messages swapped fail the order", reordered(), (), 1, "order"),
        ("two inbox messages swapped fail the order", reordered_inbox(), (), 1, "order"),
        ("a repeat after a reconnection is reported", reconnect_repeat(), (), 0,
         "duplicate_reconnect"),
        ("... and fails with --strict-reconnect", reconnect_repeat(), ("--strict-reconnect",), 1,
         "duplicate_reconnect"),
        ("an empty history fails", [ev("phase", 0, name="load")], (), 1, None),
    ]


def mutate(path):
    with open(path) as f:
        h = [json.loads(line) for line in f if line.strip()]
    sends, answers, _, _, _, _ = check.load(path)
    for i, e in enumerate(h):
        if e["ev"] != "recv" or e["id"] not in sends:
            continue
        a = check.best_answer(answers.get(e["id"]))
        if a and a["status"] in check.PROMISED and \
                sum(1 for x in h if x["ev"] == "recv" and x["id"] == e["id"]) == 1:
            victim = h.pop(i)
            break
    else:
        print("chaos-check: no single-shown promised message to remove")
        return 1
    rc, res = run(h)
    lost = [v["send"]["id"] for v in res["violations"]["lost"]]
    ok = rc == 1 and victim["id"] in lost
    print(f"chaos-check: removed {victim['id']} from {os.path.basename(path)}: "
          f"checker {'failed it as lost' if ok else 'did NOT catch it'}")
    return 0 if ok else 1


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--mutate":
        return mutate(sys.argv[2])
    passed = failed = 0
    for name, h, flags, want_rc, want_kind in cases():
        rc, res = run(h, *flags)
        ok = rc == want_rc and (want_kind is None or bool(res["violations"][want_kind]))
        if want_rc == 0 and want_kind is None:
            ok = ok and not any(res["violations"].values())
        print(f"{'ok  ' if ok else 'FAIL'} {name} (exit {rc})")
        passed, failed = passed + ok, failed + (not ok)
    print(f"chaos-check: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
