"""An external node-host plugin in Python: the inventory.v1.Inventory service.

node-host starts it (a [plugins.NAME] table with `command`), and it follows
the plugin contract (README: "Writing a plugin in any language"):

- serve gRPC on the address in PLUGIN_LISTEN (`unix:/path` or `host:port`);
- serve the standard health service and server reflection;
- exit when stdin reaches end-of-file (the node is gone) or on SIGTERM.

Try the lifecycle by hand: `kill -USR1 PID` makes its health NOT_SERVING (the
node deregisters it), `kill -USR2 PID` SERVING again.

Needs grpcio, grpcio-tools (the .proto is compiled when it starts: no
generated files to keep in step), grpcio-health-checking and
grpcio-reflection. Environment:
  INVENTORY_DB             a JSON file to keep the items in (default: memory)
  INVENTORY_START_HEALTH   SERVING (default) or NOT_SERVING
"""

import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# Compiles inventory.proto in-process (needs grpcio-tools).
protos, services = grpc.protos_and_services("inventory.proto")

SERVICE = protos.DESCRIPTOR.services_by_name["Inventory"].full_name
SERVED_BY = f"pid {os.getpid()}"
log = logging.getLogger("inventory")


class Inventory(services.InventoryServicer):
    def __init__(self, db_path):
        self.db_path = db_path
        self.lock = threading.Lock()
        self.items = {}
        if db_path and os.path.exists(db_path):
            with open(db_path) as f:
                self.items = json.load(f)

    def _save(self):
        if self.db_path:
            tmp = self.db_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.items, f)
            os.replace(tmp, self.db_path)

    def _item(self, name):
        entry = self.items[name]
        return protos.Item(
            name=name, count=entry["count"], note=entry["note"], served_by=SERVED_BY
        )

    def Put(self, request, context):
        if not request.name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name is required")
        if request.count < 0:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"count must not be negative, got {request.count}",
            )
        with self.lock:
            self.items[request.name] = {"count": request.count, "note": request.note}
            self._save()
            log.info("put %s = %d", request.name, request.count)
            return self._item(request.name)

    def Get(self, request, context):
        if request.delay_ms:
            deadline = time.monotonic() + request.delay_ms / 1000
            while time.monotonic() < deadline:
                if not context.is_active():
                    log.info(
                        "get %s: the caller gave up (deadline or cancel), %.0f ms before the delay ended",
                        request.name,
                        (deadline - time.monotonic()) * 1000,
                    )
                    return protos.Item()
                time.sleep(0.01)
        with self.lock:
            if request.name not in self.items:
                # Trailing metadata with the status: how many items there
                # are, and the caller's x-request-id if it sent one.
                trailers = [("inventory-known", str(len(self.items)))]
                trailers += [(k, v) for k, v in context.invocation_metadata() if k == "x-request-id"]
                context.set_trailing_metadata(trailers)
                context.abort(grpc.StatusCode.NOT_FOUND, f"no item named {request.name!r}")
            return self._item(request.name)

    def Take(self, request, context):
        with self.lock:
            if request.name not in self.items:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no item named {request.name!r}")
            have = self.items[request.name]["count"]
            if have < request.count:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"only {have} of {request.name!r}, cannot take {request.count}",
                )
            self.items[request.name]["count"] = have - request.count
            self._save()
            return self._item(request.name)

    def List(self, request, context):
        with self.lock:
            names = sorted(n for n in self.items if n.startswith(request.prefix))
            items = [self._item(n) for n in names]
        for i, item in enumerate(items):
            if i and request.interval_ms:
                time.sleep(request.interval_ms / 1000)
            yield item


def build_server(listen, also_listed=()):
    """The gRPC server, not started, and its health servicer. `also_listed`
    adds names to what reflection lists (tests use it)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    services.add_InventoryServicer_to_server(
        Inventory(os.environ.get("INVENTORY_DB")), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        SERVICE,
        *also_listed,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    if server.add_insecure_port(listen) == 0:
        sys.exit(f"inventory: cannot listen on {listen}")
    return server, health_servicer


def set_health(health_servicer, serving):
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", SERVICE):
        health_servicer.set(name, status)
    log.info("health: %s", "SERVING" if serving else "NOT_SERVING")


def run(also_listed=()):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    listen = os.environ.get("PLUGIN_LISTEN")
    if not listen:
        sys.exit("inventory: PLUGIN_LISTEN is not set (node-host sets it)")
    server, health_servicer = build_server(listen, also_listed)
    server.start()
    start = os.environ.get("INVENTORY_START_HEALTH", "SERVING")
    set_health(health_servicer, start == "SERVING")
    log.info("serving %s on %s", SERVICE, listen)

    stop = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: set_health(health_servicer, False))
    signal.signal(signal.SIGUSR2, lambda *_: set_health(health_servicer, True))
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def watch_stdin():
        # End-of-file: the node is gone. Leave, whatever else happens.
        # os.read, not sys.stdin: a daemon thread inside the buffered reader
        # would hold its lock at interpreter shutdown.
        while os.read(0, 4096):
            pass
        log.info("stdin closed: the node is gone, exiting")
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.wait(0.5):
        pass
    log.info("stopping")
    server.stop(grace=1).wait()


if __name__ == "__main__":
    run()
