#!/usr/bin/env python3
"""A real gRPC server and client (grpcio) for cellgate's tests; no generated code.

  echo.py serve --cell <id>        serve cellgate.test.Echo on a free loopback port; prints the port
  echo.py call --target <addr> --key <k>
                                   call Unary, Stream and Fail through <addr>; prints JSON results
  echo.py call --target <addr> --key <k> --method <M> --n <n>
                                   call method M (Unary, Fail, Unavailable, Stream,
                                   StreamThenUnavailable) n times; prints the codes

Messages are raw bytes (JSON text), so no protobuf schema is needed.
"""
import argparse
import json
import sys
from concurrent import futures

import grpc

SERVICE = "cellgate.test.Echo"


def serve(cell):
    def meta(ctx):
        return {k: v for k, v in ctx.invocation_metadata()}

    def unary(req, ctx):
        md = meta(ctx)
        ctx.set_trailing_metadata((("x-served-by", cell),))
        return json.dumps({"cell": cell, "x-cell-id": md.get("x-cell-id"), "time_remaining": ctx.time_remaining(),
                           "x-request-id": md.get("x-request-id"), "echo": req.decode()}).encode()

    def stream(req, ctx):
        md = meta(ctx)
        ctx.set_trailing_metadata((("x-stream-count", "3"),))
        for i in range(3):
            yield json.dumps({"cell": cell, "i": i, "x-cell-id": md.get("x-cell-id")}).encode()

    def fail(req, ctx):
        ctx.set_trailing_metadata((("x-fail-detail", "missing-" + cell),))
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such order in " + cell)

    def unavailable(req, ctx):
        ctx.abort(grpc.StatusCode.UNAVAILABLE, "overloaded " + cell)

    def slow_stream(req, ctx):
        import time
        for i in range(3):
            if i:
                time.sleep(0.8)
            yield json.dumps({"i": i, "time_remaining": ctx.time_remaining()}).encode()

    def collect(reqs, ctx):
        return json.dumps({"messages": sum(1 for _ in reqs)}).encode()

    def stream_then_unavailable(req, ctx):
        yield b"{}"
        ctx.abort(grpc.StatusCode.UNAVAILABLE, "lost its backend mid-stream " + cell)

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Unavailable": grpc.unary_unary_rpc_method_handler(unavailable),
        "StreamThenUnavailable": grpc.unary_stream_rpc_method_handler(stream_then_unavailable),
        "StreamSlow": grpc.unary_stream_rpc_method_handler(slow_stream),
        "Collect": grpc.stream_unary_rpc_method_handler(collect),
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def call(target, key):
    md = (("x-user-id", key),)
    out = {}
    with grpc.insecure_channel(target) as ch:
        unary = ch.unary_unary("/%s/Unary" % SERVICE)
        resp, c = unary.with_call(b"hello", metadata=md, timeout=10)
        out["unary"] = {"body": json.loads(resp), "code": c.code().name,
                        "initial": dict(c.initial_metadata()), "trailing": dict(c.trailing_metadata())}
        stream = ch.unary_stream("/%s/Stream" % SERVICE)
        it = stream(b"s", metadata=md, timeout=10)
        msgs = [json.loads(m) for m in it]
        out["stream"] = {"messages": msgs, "code": it.code().name, "trailing": dict(it.trailing_metadata()),
                         "initial": dict(it.initial_metadata())}
        failing = ch.unary_unary("/%s/Fail" % SERVICE)
        try:
            failing(b"f", metadata=md, timeout=10)
            out["fail"] = {"code": "OK"}
        except grpc.RpcError as e:
            out["fail"] = {"code": e.code().name, "details": e.details(), "trailing": dict(e.trailing_metadata() or ())}
    print(json.dumps(out), flush=True)


def call_n(target, key, method, n):
    md = (("x-user-id", key),)
    codes = []
    with grpc.insecure_channel(target) as ch:
        streaming = method.startswith("Stream")
        if method == "Collect":
            m = ch.stream_unary("/%s/Collect" % SERVICE)
            for _ in range(n):
                try:
                    m(iter([b"x" * 1024] * 8), metadata=md, timeout=10)
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)
            print(json.dumps(codes), flush=True)
            return
        m = (ch.unary_stream if streaming else ch.unary_unary)("/%s/%s" % (SERVICE, method))
        for _ in range(n):
            try:
                r = m(b"x", metadata=md, timeout=None if method == "StreamSlow" else 10)
                if streaming:
                    list(r)
                codes.append("OK")
            except grpc.RpcError as e:
                codes.append(e.code().name)
    print(json.dumps(codes), flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--cell", required=True)
    c = sub.add_parser("call")
    c.add_argument("--target", required=True)
    c.add_argument("--key", required=True)
    c.add_argument("--method")
    c.add_argument("--n", type=int, default=1)
    a = p.parse_args()
    if a.cmd == "serve":
        serve(a.cell)
    elif a.method:
        call_n(a.target, a.key, a.method, a.n)
    else:
        call(a.target, a.key)


if __name__ == "__main__":
    sys.exit(main())
