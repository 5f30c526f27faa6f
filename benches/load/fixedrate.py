#!/usr/bin/env python3
"""Open-loop, fixed-rate HTTP/1.1 load client (wrk2-style), standard library only.

wrk is closed-loop (it sends the next request when the previous answer came
back) and Debian's h2load `--rate` paces *connection creation*, not requests,
so neither can hold a fixed request rate on keep-alive connections.  This
client does: request i is due at  start + i / rate;  when it is due it is
written on a free keep-alive connection, or queued until one frees up (so a
slow server is charged for the queueing it causes, no coordinated omission).

Each request carries a different X-User-ID (same deterministic key sequence as
userid.lua uses: a fixed seed), sent with HTTP/1.1 keep-alive.

Latencies are recorded two ways:
  * `service`  : from the moment the request was written to the moment the
                 whole response was read (what the server + network cost);
  * `intended` : from the moment the request was *due* (includes queueing for
                 a free connection and the client's own scheduling lag).
`lag_*` is how late the client wrote requests (a Python event loop is not a
precise clock); if lag_p99 is large the client, not the target, is the limit.

Work is split over --procs processes (rate and connections are divided) to
keep each event loop under one core.  Prints one JSON object on stdout.
"""

import argparse
import array
import asyncio
import collections
import gc
import json
import multiprocessing as mp
import os
import random
import sys
import time


def build_requests(host: str, port: int, n: int, seed: int) -> list:
    rnd = random.Random(seed)
    reqs = []
    for i in range(n):
        uid = "user-%d-%d" % (i + 1, rnd.randint(1, 1_000_000_000))
        reqs.append(
            (
                "GET / HTTP/1.1\r\nHost: %s:%d\r\nX-User-ID: %s\r\n\r\n" % (host, port, uid)
            ).encode()
        )
    return reqs


class Conn(asyncio.Protocol):
    __slots__ = ("cl", "buf", "transport", "sent_at", "due_at", "alive")

    def __init__(self, cl):
        self.cl = cl
        self.buf = bytearray()
        self.transport = None
        self.sent_at = 0.0
        self.due_at = 0.0
        self.alive = False

    def connection_made(self, transport):
        self.transport = transport
        self.alive = True

    def connection_lost(self, exc):
        self.alive = False
        self.cl.on_lost(self)

    def data_received(self, data):
        buf = self.buf
        buf += data
        while True:
            he = buf.find(b"\r\n\r\n")
            if he < 0:
                return
            head = bytes(buf[:he]).lower()
            try:
                status = int(head[9:12])
            except ValueError:
                status = 0
            body_start = he + 4
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                n = int(head[i + 17 : j if j >= 0 else len(head)])
                end = body_start + n
                if len(buf) < end:
                    return
            elif b"\r\ntransfer-encoding: chunked" in head:
                end = body_start
                while True:
                    k = buf.find(b"\r\n", end)
                    if k < 0:
                        return
                    size = int(bytes(buf[end:k]).split(b";")[0], 16)
                    if size == 0:
                        t = buf.find(b"\r\n\r\n", k)  # trailers end
                        if t < 0:
                            return
                        end = t + 4
                        break
                    end = k + 2 + size + 2
                    if len(buf) < end:
                        return
            else:
                end = body_start
            del buf[:end]
            closing = b"\r\nconnection: close" in head
            self.cl.on_response(self, status, closing)


class Client:
    def __init__(self, loop, args, share_rate, share_conns, start_wall, seed):
        self.loop = loop
        self.a = args
        self.rate = share_rate
        self.nconns = share_conns
        self.reqs = build_requests(args.host, args.port, 16384, seed)
        self.ri = 0
        self.free = collections.deque()
        self.pending = collections.deque()
        self.conns = []
        self.service = array.array("d")
        self.intended = array.array("d")
        self.lag = array.array("d")
        self.errors = 0
        self.non2xx = 0
        self.reconnects = 0
        self.completed = 0
        self.sent = 0
        # translate the shared wall-clock start into this loop's clock
        self.start = loop.time() + (start_wall - time.time())
        self.warm_end = self.start + args.warmup
        self.total = int(self.rate * (args.warmup + args.duration))
        self.next_i = 0
        self.done = loop.create_future()
        self.in_flight = 0
        self.last_done = 0.0

    async def connect_all(self):
        for _ in range(self.nconns):
            await self.connect_one()

    async def connect_one(self):
        try:
            _, c = await self.loop.create_connection(lambda: Conn(self), self.a.host, self.a.port)
        except OSError:
            self.errors += 1
            return
        self.conns.append(c)
        self.free.append(c)

    def on_lost(self, c):
        if c in self.conns:
            self.conns.remove(c)
        try:
            self.free.remove(c)
        except ValueError:
            pass
        if c.due_at:  # a request was in flight on it
            self.errors += 1
            self.in_flight -= 1
            c.due_at = 0.0
        if not self.done.done() and self.next_i < self.total:
            self.reconnects += 1
            self.loop.create_task(self.connect_one_and_pump())
        self.maybe_finish()

    async def connect_one_and_pump(self):
        await self.connect_one()
        self.pump()

    def send(self, c, due):
        now = self.loop.time()
        c.sent_at = now
        c.due_at = due
        self.in_flight += 1
        self.sent += 1
        self.ri = (self.ri + 1) & 16383
        c.transport.write(self.reqs[self.ri])
        if due >= self.warm_end:
            self.lag.append(now - due)

    def on_response(self, c, status, closing):
        now = self.loop.time()
        due = c.due_at
        c.due_at = 0.0
        self.in_flight -= 1
        self.completed += 1
        if due >= self.warm_end:
            self.last_done = now
            self.service.append(now - c.sent_at)
            self.intended.append(now - due)
            if not (200 <= status < 300):
                self.non2xx += 1
        if closing:
            c.transport.close()
            return
        self.free.append(c)
        self.pump()
        self.maybe_finish()

    def pump(self):
        while self.pending and self.free:
            self.send(self.free.popleft(), self.pending.popleft())

    def tick(self):
        now = self.loop.time()
        due_n = min(self.total, int((now - self.start) * self.rate) + 1)
        interval = 1.0 / self.rate
        while self.next_i < due_n:
            due = self.start + self.next_i * interval
            self.next_i += 1
            if self.free:
                self.send(self.free.popleft(), due)
            else:
                self.pending.append(due)
        if self.next_i < self.total:
            self.loop.call_at(self.start + self.next_i * interval, self.tick)
        else:
            self.loop.call_later(self.a.drain, self.finish)
            self.maybe_finish()

    def maybe_finish(self):
        if (
            self.next_i >= self.total
            and not self.pending
            and self.in_flight <= 0
            and not self.done.done()
        ):
            self.done.set_result(None)

    def finish(self):
        if not self.done.done():
            # whatever is still queued or in flight after the drain period failed
            self.errors += len(self.pending) + max(self.in_flight, 0)
            self.done.set_result(None)

    async def run(self):
        await self.connect_all()
        delay = self.start - self.loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        t0 = os.times()
        self.tick()
        await self.done
        t1 = os.times()
        for c in list(self.conns):
            c.transport.close()
        cpu = (t1.user - t0.user) + (t1.system - t0.system)
        return cpu


def worker(args, share_rate, share_conns, start_wall, seed):
    gc.disable()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    cl = Client(loop, args, share_rate, share_conns, start_wall, seed)
    cpu = loop.run_until_complete(cl.run())
    loop.close()
    return {
        "service": cl.service.tobytes(),
        "intended": cl.intended.tobytes(),
        "lag": cl.lag.tobytes(),
        "errors": cl.errors,
        "non2xx": cl.non2xx,
        "reconnects": cl.reconnects,
        "sent": cl.sent,
        "completed": cl.completed,
        "cpu": cpu,
        # measured answers over the time from the end of the warm-up to the last one
        "window": max(cl.last_done - cl.warm_end, 1e-9),
    }


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * len(sorted_vals))) - 1))
    return sorted_vals[k]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True, help="requests per second (total)")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds at rate before measuring")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--drain", type=float, default=2.0, help="seconds to wait for the last answers")
    ap.add_argument("--seed", type=int, default=20240601)
    a = ap.parse_args()
    if a.host not in ("127.0.0.1", "::1", "localhost"):
        sys.exit("fixedrate.py: loopback targets only")
    procs = max(1, a.procs)
    start_wall = time.time() + 0.5 + 0.02 * a.connections
    shares = [
        (a, a.rate / procs, max(1, a.connections // procs), start_wall, a.seed + k)
        for k in range(procs)
    ]
    if procs == 1:
        results = [worker(*shares[0])]
    else:
        with mp.get_context("fork").Pool(procs) as pool:
            results = pool.starmap(worker, shares)

    def merged(key):
        out = array.array("d")
        for r in results:
            part = array.array("d")
            part.frombytes(r[key])
            out.extend(part)
        return sorted(out)

    service, intended, lag = merged("service"), merged("intended"), merged("lag")
    us = lambda v: None if v is None else round(v * 1e6, 1)
    measured = len(service)
    out = {
        "target_rate": a.rate,
        "achieved_rate": round(measured / max(r["window"] for r in results), 1),
        "measured": measured,
        "sent": sum(r["sent"] for r in results),
        "completed": sum(r["completed"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "non2xx": sum(r["non2xx"] for r in results),
        "reconnects": sum(r["reconnects"] for r in results),
        "procs": procs,
        "client_cpu_pct": round(100.0 * sum(r["cpu"] for r in results) / (a.duration + a.warmup), 1),
    }
    for name, vals in (("service", service), ("intended", intended), ("lag", lag)):
        for p in (50, 90, 99, 99.9):
            out["%s_p%s_us" % (name, str(p).replace(".", "_"))] = us(pct(vals, p))
        out["%s_max_us" % name] = us(vals[-1] if vals else None)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
