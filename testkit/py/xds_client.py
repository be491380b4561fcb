"""gRPC Python's own xDS client, dialing services through the registry.

Driven by testkit/tests/xds.rs. GRPC_XDS_BOOTSTRAP names the bootstrap file
(the registry as the xDS server). The stubs are generated at start from the
workspace's .proto files with grpcio-tools, as a Python user would.

Usage: xds_client.py PROTO_DIR OUT_DIR  (the stubs are written to OUT_DIR)
Reads one command per line on stdin and answers one JSON line on stdout:
  calc N             N Calculator/Add calls over xds:///calculator
  split N            N Echo calls over xds:///echo, counted by served_by
  until ADDR SECS    Echo calls until one is served by ADDR: the ms it took
  load SECS CONC     Echo calls from CONC threads for SECS seconds: calls per
                     server, and the start time (ms) of every failed call
  missing NAME       one call over xds:///NAME: its status and how long it took
"""

import json
import sys
import threading
import time

import grpc
from grpc_tools import protoc

DEADLINE = 5.0


def stubs(proto_dir, out):
    for proto in ("calculator/v1/calculator.proto", "echo/v1/echo.proto"):
        rc = protoc.main(
            ["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}", proto]
        )
        if rc != 0:
            sys.exit(f"protoc failed on {proto}")
    sys.path.insert(0, out)
    from calculator.v1 import calculator_pb2, calculator_pb2_grpc
    from echo.v1 import echo_pb2, echo_pb2_grpc

    return calculator_pb2, calculator_pb2_grpc, echo_pb2, echo_pb2_grpc


def main():
    calc_pb, calc_grpc, echo_pb, echo_grpc = stubs(sys.argv[1], sys.argv[2])
    calc = calc_grpc.CalculatorStub(grpc.insecure_channel("xds:///calculator"))
    echo = echo_grpc.EchoStub(grpc.insecure_channel("xds:///echo"))

    def served_by():
        return echo.Echo(echo_pb.EchoRequest(message="hi"), timeout=DEADLINE).served_by

    print("xds-result " + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd, args = words[0], words[1:]
        start = time.monotonic()
        if cmd == "calc":
            ok = failed = 0
            errors = []
            for i in range(int(args[0])):
                try:
                    r = calc.Add(calc_pb.BinaryRequest(a=i, b=2), timeout=DEADLINE)
                    ok += r.value == i + 2
                except grpc.RpcError as e:
                    failed += 1
                    errors.append(f"{e.code()}: {e.details()}")
            print("xds-result " + json.dumps({"ok": ok, "failed": failed, "errors": errors[:3]}), flush=True)
        elif cmd == "split":
            counts, failed = {}, 0
            for _ in range(int(args[0])):
                try:
                    who = served_by()
                    counts[who] = counts.get(who, 0) + 1
                except grpc.RpcError:
                    failed += 1
            print("xds-result " + json.dumps({"counts": counts, "failed": failed}), flush=True)
        elif cmd == "until":
            want, limit = args[0], float(args[1])
            seen = False
            while time.monotonic() - start < limit:
                try:
                    if served_by() == want:
                        seen = True
                        break
                except grpc.RpcError:
                    pass
            ms = (time.monotonic() - start) * 1000
            print("xds-result " + json.dumps({"seen": seen, "ms": round(ms, 1)}), flush=True)
        elif cmd == "load":
            secs, conc = float(args[0]), int(args[1])
            lock = threading.Lock()
            counts, failures = {}, []

            def worker():
                while time.monotonic() - start < secs:
                    t = time.monotonic()
                    try:
                        who = served_by()
                        with lock:
                            counts[who] = counts.get(who, 0) + 1
                    except grpc.RpcError as e:
                        with lock:
                            failures.append(
                                {"ms": round((t - start) * 1000, 1), "error": f"{e.code()}"}
                            )

            threads = [threading.Thread(target=worker) for _ in range(conc)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            print("xds-result " + json.dumps({"counts": counts, "failures": failures}), flush=True)
        elif cmd == "missing":
            channel = grpc.insecure_channel(f"xds:///{args[0]}")
            stub = echo_grpc.EchoStub(channel)
            try:
                stub.Echo(echo_pb.EchoRequest(message="hi"), timeout=DEADLINE)
                code, details = "OK", ""
            except grpc.RpcError as e:
                code, details = str(e.code()), e.details()
            ms = (time.monotonic() - start) * 1000
            print("xds-result " + json.dumps({"code": code, "details": details, "ms": round(ms, 1)}), flush=True)
            channel.close()
        else:
            print("xds-result " + json.dumps({"error": f"unknown command {cmd}"}), flush=True)


if __name__ == "__main__":
    main()
