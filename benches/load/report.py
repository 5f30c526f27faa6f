#!/usr/bin/env python3
"""Parse the raw outputs of benches/load/run.sh and print the markdown report.

    report.py capacity RESULTS.tsv     -> best peer's median req/s (HTTP/1.1 runs)
    report.py table RESULTS.tsv META   -> markdown report on stdout

RESULTS.tsv has one line per run, written by run.sh:
    kind target round rawfile proxy_ticks upstream_ticks up1 up2 up3 elapsed_s
kind is h1 (wrk), h2 (h2load), fixed (wrk + paced.lua) or fixedpy
(fixedrate.py, JSON output);
*_ticks are utime+stime deltas in clock ticks; up1..up3 are the requests each
upstream served during the run (nginx stub_status).  META is a file of
`key<TAB>value` lines (machine info, settings) shown at the top.
"""

import json
import os
import re
import statistics
import sys

PEERS = ("nginx", "haproxy")
# The bare hyper engine (benches/src/bin/hyper_floor.rs): shown with its ratios, never a peer.
REFERENCE = "hyper"
ORDER = ("direct", "nginx", "haproxy", "hyper", "cellgate")
LABELS = {REFERENCE: "hyper (engine)"}
UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def label(target):
    return LABELS.get(target, target)


def dur_us(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        return None
    return float(m.group(1)) * UNIT_US[m.group(2)]


def parse_wrk(path):
    out = {"rps": None, "p50": None, "p99": None, "requests": 0, "non2xx": 0, "sockerr": 0}
    try:
        text = open(path, errors="replace").read()
    except OSError:
        return out
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if m:
        out["rps"] = float(m.group(1))
    for pct, key in (("50", "p50"), ("99", "p99")):
        m = re.search(r"^\s+%s%%\s+(\S+)" % pct, text, re.M)
        if m:
            out[key] = dur_us(m.group(1))
    m = re.search(r"^\s+(\d+) requests in", text, re.M)
    if m:
        out["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        out["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["sockerr"] = sum(int(x) for x in m.groups())
    return out


def parse_h2load(path):
    out = {"rps": None, "mean": None, "requests": 0, "non2xx": 0, "sockerr": 0, "max": None}
    try:
        text = open(path, errors="replace").read()
    except OSError:
        return out
    m = re.search(r"finished in \S+, ([\d.]+) req/s", text)
    if m:
        out["rps"] = float(m.group(1))
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored(?:, (\d+) timeout)?",
        text,
    )
    if m:
        out["requests"] = int(m.group(4))
        out["sockerr"] = int(m.group(6)) + int(m.group(7) or 0)
        out["failed"] = int(m.group(5))
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if m:
        out["non2xx"] = int(m.group(2)) + int(m.group(3)) + int(m.group(4))
        out["requests"] = int(m.group(1))  # 2xx answers
    m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", text)
    if m:
        out["max"] = dur_us(m.group(2))
        out["mean"] = dur_us(m.group(3))
    return out


def parse_fixed(path):
    try:
        return json.loads(open(path).read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def load(tsv):
    hz = os.sysconf("SC_CLK_TCK")
    runs = []
    for line in open(tsv):
        f = line.rstrip("\n").split("\t")
        if len(f) < 10 or f[0].startswith("#"):
            continue
        kind, target, rnd, raw = f[0], f[1], int(f[2]), f[3]
        r = {
            "kind": kind,
            "target": target,
            "round": rnd,
            "raw": raw,
            "proxy_ticks": int(f[4]) if f[4] not in ("", "-") else None,
            "up_ticks": int(f[5]),
            "ups": [int(x) if x.lstrip("-").isdigit() else None for x in f[6:9]],
            "elapsed": float(f[9]),
        }
        el = max(r["elapsed"], 1e-9)
        r["client_pct"] = int(f[10]) * 100.0 / hz / el if len(f) > 10 else None
        r["other_pct"] = max(0, int(f[11])) * 100.0 / hz / el if len(f) > 11 else None
        r["new_conns"] = int(f[12]) if len(f) > 12 and f[12].lstrip("-").isdigit() else None
        if kind in ("h1", "fixed"):
            r.update(parse_wrk(raw))
        elif kind == "h2":
            r.update(parse_h2load(raw))
        elif kind == "fixedpy":
            j = parse_fixed(raw) or {}
            r["py"] = j
            r["requests"] = j.get("completed", 0)
            r["rps"] = j.get("achieved_rate")
            r["p50"] = j.get("service_p50_us")
            r["p99"] = j.get("service_p99_us")
            r["non2xx"] = j.get("non2xx", 0)
            r["sockerr"] = j.get("errors", 0)
        # CPU per request: all requests the tool completed during the run
        # (fixedrate: including its warm-up second, which is inside the window).
        n = r.get("requests") or 0
        r["cpu_us"] = (r["proxy_ticks"] * 1e6 / hz / n) if (r["proxy_ticks"] is not None and n) else None
        r["up_cpu_us"] = (r["up_ticks"] * 1e6 / hz / n) if n else None
        runs.append(r)
    return runs


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt_us(v):
    if v is None:
        return "—"
    if v >= 1000:
        return "%.2f ms" % (v / 1000)
    return "%.0f µs" % v


def fmt_num(v, spec="%.0f"):
    return "—" if v is None else spec % v


def fmt_pct(v):
    return "—" if v is None else "%.0f %%" % v


def fmt_ratio(v):
    return "—" if v is None else "%.2f×" % v


def targets_in(runs, kind):
    seen = [r["target"] for r in runs if r["kind"] == kind]
    return [t for t in ORDER if t in seen] + sorted({t for t in seen if t not in ORDER})


def summarize(runs, kind, lat_keys):
    s = {}
    for t in targets_in(runs, kind):
        rs = [r for r in runs if r["kind"] == kind and r["target"] == t]
        s[t] = {
            "n": len(rs),
            "rps": med([r.get("rps") for r in rs]),
            "cpu": med([r.get("cpu_us") for r in rs]),
            "cpu_all": [r.get("cpu_us") for r in rs],
            "errors": sum((r.get("non2xx") or 0) + (r.get("sockerr") or 0) for r in rs),
            "requests": sum(r.get("requests") or 0 for r in rs),
            "other": max([r["other_pct"] for r in rs if r.get("other_pct") is not None], default=None),
        }
        for k in lat_keys:
            s[t][k] = med([r.get(k) for r in rs])
    return s


def best_peer(s):
    rps = [s[p]["rps"] for p in PEERS if p in s and s[p]["rps"]]
    cpu = [s[p]["cpu"] for p in PEERS if p in s and s[p]["cpu"]]
    return (max(rps) if rps else None, min(cpu) if cpu else None)


def ratio(a, b):
    return (a / b) if (a is not None and b) else None


def capacity(tsv):
    s = summarize(load(tsv), "h1", ())
    rps, _ = best_peer(s)
    if rps is None:  # no peer measured: fall back to cellgate (never the engine reference)
        vals = [v["rps"] for t, v in s.items() if t not in ("direct", REFERENCE) and v["rps"]]
        rps = max(vals) if vals else None
    print("%.0f" % rps if rps else "0")


def share(ups):
    if any(u is None for u in ups) or sum(ups) <= 0:
        return "—"
    tot = sum(ups)
    return "/".join("%.0f" % (100.0 * u / tot) for u in ups)


def table(tsv, meta_path):
    runs = load(tsv)
    meta = []
    for line in open(meta_path):
        if "\t" in line:
            k, v = line.rstrip("\n").split("\t", 1)
            meta.append((k, v))
    md = dict(meta)
    out = []
    w = out.append
    w("# cellgate load comparison — %s" % md.get("date", ""))
    w("")
    hidden = {"date", "duration", "rounds", "connections", "h2 duration", "fixed rate",
              "fixed rate basis", "h2 skipped", "fixed-rate skipped", "fixed connections",
              "fixed client", "h2 not run for"}
    for k, v in meta:
        if k in hidden:  # used in the section texts below
            continue
        w("- **%s**: %s" % (k, v))
    w("")

    # ---- HTTP/1.1 closed loop (wrk) -------------------------------------------
    s = summarize(runs, "h1", ("p50", "p99"))
    if s:
        brps, bcpu = best_peer(s)
        w("## HTTP/1.1, closed loop (`wrk -t1 -c%s -d%s --latency`, varying X-User-ID)" % (md.get("connections", "50"), md.get("duration", "10s")))
        w("")
        w("Medians over %s runs per target; ratios are against the best of nginx/haproxy in this run "
          "(CPU: lowest µs/req = %s; req/s: highest = %s)." % (
              md.get("rounds", "?"), fmt_num(bcpu, "%.1f"), fmt_num(brps)))
        w("")
        w("| target | req/s | p50 | p99 | CPU µs/req | CPU ratio | req/s ratio | CPU µs/req per run | errors | other load |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for t, v in s.items():
            per_run = ", ".join(fmt_num(c, "%.1f") for c in v["cpu_all"]) if t != "direct" else "—"
            w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                label(t), fmt_num(v["rps"]), fmt_us(v["p50"]), fmt_us(v["p99"]),
                fmt_num(v["cpu"], "%.1f") if t != "direct" else "— (no proxy)",
                fmt_ratio(ratio(v["cpu"], bcpu)) if t != "direct" else "—",
                fmt_ratio(ratio(v["rps"], brps)),
                per_run, v["errors"], fmt_pct(v["other"])))
        w("")
        if REFERENCE in s:
            w("*%s* is a reference, not a peer: the bare engine cellgate is built on, a minimal "
              "hyper 1.x proxy doing the same job (`benches/src/bin/hyper_floor.rs`: one thread, own "
              "pool of upstream connections, mimalloc, no other feature), so the gap from it to "
              "cellgate is the cost of cellgate's features; it is left out of the best-peer figures." % label(REFERENCE))
            w("")
        w("*other load*: the most CPU that processes outside the benchmark (builds, ...) used during "
          "one of the runs, in % of one core; above ~10 % the req/s and latency figures of that run "
          "are disturbed (CPU µs/req much less so).")
        w("")

    # ---- HTTP/2 (h2load) -------------------------------------------------------
    s2 = summarize(runs, "h2", ("mean",))
    if s2 or md.get("h2 skipped") or md.get("h2 not run for"):
        w("## HTTP/2 cleartext, prior knowledge (`h2load -c10 -m10 -D %s`)" % md.get("h2 duration", "?"))
        w("")
        w("h2load sends one fixed `X-User-ID` (it cannot vary headers per request), so every "
          "request is still hashed and routed but lands on one upstream; h2load reports "
          "no percentiles, so latency is the mean time per request (100 streams in flight). "
          "direct = an h2c (`listen ... http2`) listener on upstream 1; nginx and haproxy get an "
          "h2c listener of their own (`listen ... http2`, `bind ... proto h2`) with the same upstream "
          "configuration; cellgate serves h2c on its one port.")
        w("")
        if s2:
            brps, bcpu = best_peer(s2)
            w("| target | req/s | mean latency | CPU µs/req | CPU ratio | req/s ratio | errors | other load |")
            w("|---|---|---|---|---|---|---|---|")
            for t, v in s2.items():
                w("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    label(t), fmt_num(v["rps"]), fmt_us(v["mean"]),
                    fmt_num(v["cpu"], "%.1f") if t != "direct" else "— (no proxy)",
                    fmt_ratio(ratio(v["cpu"], bcpu)) if t != "direct" else "—",
                    fmt_ratio(ratio(v["rps"], brps)), v["errors"], fmt_pct(v["other"])))
        if md.get("h2 not run for"):
            if s2:
                w("")
            w("No h2c listener, not run over HTTP/2: %s." % ", ".join(
                label(t) for t in md["h2 not run for"].split()))
        if md.get("h2 skipped"):
            w("")
            w("Not run over HTTP/2: %s" % md["h2 skipped"])
        w("")

    # ---- fixed rate ------------------------------------------------------------
    fixed = [r for r in runs if r["kind"] in ("fixed", "fixedpy")]
    if fixed or md.get("fixed-rate skipped"):
        python = any(r["kind"] == "fixedpy" for r in fixed)
        w("## Fixed rate, added latency vs direct")
        w("")
        if fixed:
            if python:
                w("Client: `fixedrate.py` (open loop, Python asyncio), %s connections, %s measured + 1 s "
                  "warm-up per run. p50/p99 are from write to complete response; \"intended p99\" counts "
                  "from when the request was due (includes queueing, coordinated-omission corrected); "
                  "\"client lag p99\" is how late the client itself wrote requests: when it is large the "
                  "client, not the target, is the limit." % (md.get("fixed connections", "?"), md.get("duration", "10s")))
            else:
                w("Client: `wrk -t1 -c%s -d%s --latency -s paced.lua` — wrk paced to a global schedule "
                  "of the target rate (1 ms timer resolution, random rounding), latencies from write to "
                  "response (not corrected for coordinated omission; a target that falls behind shows a "
                  "lower achieved req/s)." % (md.get("fixed connections", "?"), md.get("duration", "10s")))
            w("Rate: %s req/s (%s). Medians over the runs; CPU µs/req at this load." % (
                md.get("fixed rate", "?"), md.get("fixed rate basis", "")))
            w("")
            extra_h = " intended p99 | client lag p99 | client CPU |" if python else ""
            w("| target | achieved req/s | p50 | p99 | added p99 vs direct | CPU µs/req |%s errors | other load |" % extra_h)
            w("|---|---|---|---|---|---|%s---|---|" % ("---|---|---|" if python else ""))
            by = {}
            for r in fixed:
                by.setdefault(r["target"], []).append(r)
            order = [t for t in ORDER if t in by] + sorted(t for t in by if t not in ORDER)

            def fm(t, key):
                return med([r.get(key) for r in by[t]])

            def fpy(t, key):
                return med([(r.get("py") or {}).get(key) for r in by[t]])

            d99 = fm("direct", "p99") if "direct" in by else None
            for t in order:
                p99 = fm(t, "p99")
                added = (p99 - d99) if (p99 is not None and d99 is not None and t != "direct") else None
                if added is None:
                    added_s = "—"
                else:
                    added_s = ("+" if added >= 0 else "−") + fmt_us(abs(added))
                errs = sum((r.get("non2xx") or 0) + (r.get("sockerr") or 0) for r in by[t])
                extra = ""
                if python:
                    extra = " %s | %s | %s |" % (fmt_us(fpy(t, "intended_p99_us")), fmt_us(fpy(t, "lag_p99_us")),
                                                 fmt_num(fpy(t, "client_cpu_pct"), "%.0f %%"))
                other = max([r["other_pct"] for r in by[t] if r.get("other_pct") is not None], default=None)
                w("| %s | %s | %s | %s | %s | %s |%s %s | %s |" % (
                    label(t), fmt_num(fm(t, "rps")), fmt_us(fm(t, "p50")), fmt_us(p99), added_s,
                    fmt_num(fm(t, "cpu_us"), "%.1f") if t != "direct" else "—", extra, errs, fmt_pct(other)))
        if md.get("fixed-rate skipped"):
            w("")
            w("Not run: %s" % md["fixed-rate skipped"])
        w("")

    # ---- every run -------------------------------------------------------------
    w("## Every run (in the order they ran)")
    w("")
    w("Upstream share = requests served by upstream 1/2/3 in % (nginx stub_status); "
      "upstream CPU = the three upstream nginx processes' CPU µs per request; new upstream conns = "
      "connections the upstreams accepted during the run (a proxy that reuses its keep-alive "
      "connections opens few); client CPU and "
      "other load (everything else on the machine) in % of one core over the run.")
    w("")
    w("| # | kind | target | round | req/s | p50 / mean | p99 | CPU µs/req | upstream CPU µs/req | upstream share % | new upstream conns | client CPU | other load | non-2xx | socket errors |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(runs, 1):
        if r["kind"] == "h2":
            lat50, lat99 = r.get("mean"), None
        else:
            lat50, lat99 = r.get("p50"), r.get("p99")
        w("| %d | %s | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            i, r["kind"], label(r["target"]), r["round"], fmt_num(r.get("rps")), fmt_us(lat50), fmt_us(lat99),
            fmt_num(r.get("cpu_us"), "%.1f"), fmt_num(r.get("up_cpu_us"), "%.1f"), share(r["ups"]),
            fmt_num(r.get("new_conns"), "%d"),
            fmt_pct(r.get("client_pct")), fmt_pct(r.get("other_pct")),
            r.get("non2xx", 0), r.get("sockerr", 0)))
    w("")
    problems = [r for r in runs if (r.get("non2xx") or 0) + (r.get("sockerr") or 0) > 0 or not r.get("rps")]
    if problems:
        w("**Runs with errors or no result:** " + ", ".join(
            "%s/%s round %d (non-2xx %s, socket errors %s; raw output %s)" % (
                r["kind"], label(r["target"]), r["round"], r.get("non2xx", 0), r.get("sockerr", 0), r["raw"])
            for r in problems))
        w("")
    print("\n".join(out))


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "capacity":
        capacity(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "table":
        table(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 3 and sys.argv[1] in ("wrk", "h2load"):
        fn = parse_wrk if sys.argv[1] == "wrk" else parse_h2load
        print(json.dumps(fn(sys.argv[2])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
