"""A foreign Watch client: Python grpcio with stubs generated from
registry.proto by grpcio-tools, as a user in another language would follow
the registry. No library of ours.

Usage: watch_client.py HOST:PORT PROTO_DIR OUT_DIR

It grants a lease, registers `py-1` of service `py`, watches `py` and reads
the snapshot (a reset holding py-1), registers `py-2` and reads its Added
event, deregisters `py-1` and reads its Removed event; then checks two
refusals a Watch can get: a request over the registry's size limit
(RESOURCE_EXHAUSTED) and a service name that is not valid
(INVALID_ARGUMENT), each naming the problem. Prints one line per step and
`ok` at the end; exits non-zero with the reason otherwise.
"""

import subprocess
import sys

import grpc


def stubs(proto_dir, out_dir):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            "registry/v1/registry.proto",
        ],
        check=True,
    )
    sys.path.insert(0, out_dir)
    from registry.v1 import registry_pb2, registry_pb2_grpc

    return registry_pb2, registry_pb2_grpc


def refused(stub, pb, request, code, words):
    try:
        responses = stub.Watch(request, timeout=10)
        next(responses)
    except grpc.RpcError as e:
        if e.code() != code:
            sys.exit(f"expected {code}, got {e.code()}: {e.details()}")
        for word in words:
            if word not in e.details():
                sys.exit(f"the refusal does not name {word!r}: {e.details()}")
        print(f"refused {e.code().name}: {e.details()}")
        return
    sys.exit(f"expected {code}, the Watch was accepted")


def main():
    target, proto_dir, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    pb, pb_grpc = stubs(proto_dir, out_dir)
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=10)
    stub = pb_grpc.RegistryStub(channel)

    lease = stub.GrantLease(pb.GrantLeaseRequest(ttl_ms=30000))

    def register(instance_id):
        stub.Register(
            pb.RegisterRequest(
                lease_id=lease.lease_id,
                lease_secret=lease.lease_secret,
                instance=pb.Instance(
                    service="py", instance_id=instance_id, host="127.0.0.1", port=40000
                ),
            )
        )

    register("py-1")
    responses = stub.Watch(pb.WatchRequest(services=["py"]), timeout=30)
    first = next(responses)
    ids = [e.instance.instance_id for e in first.events]
    if not first.reset or ids != ["py-1"]:
        sys.exit(f"expected a reset holding py-1, got reset={first.reset} {ids}")
    print(f"snapshot: reset at revision {first.revision} with {ids}")

    register("py-2")
    added = next(responses)
    kinds = [(pb.Event.Kind.Name(e.kind), e.instance.instance_id) for e in added.events]
    if kinds != [("ADDED", "py-2")] or added.revision <= first.revision:
        sys.exit(f"expected py-2 ADDED after {first.revision}, got {kinds} at {added.revision}")
    print(f"change: {kinds} at revision {added.revision}")

    stub.Deregister(
        pb.DeregisterRequest(
            lease_id=lease.lease_id,
            lease_secret=lease.lease_secret,
            service="py",
            instance_id="py-1",
        )
    )
    removed = next(responses)
    kinds = [(pb.Event.Kind.Name(e.kind), e.instance.instance_id) for e in removed.events]
    if kinds != [("REMOVED", "py-1")]:
        sys.exit(f"expected py-1 REMOVED, got {kinds}")
    print(f"change: {kinds} at revision {removed.revision}")
    responses.cancel()

    big = pb.WatchRequest(services=["s" * 1000] * 9000)
    refused(stub, pb, big, grpc.StatusCode.RESOURCE_EXHAUSTED, ["WatchRequest", "bytes"])
    bad = pb.WatchRequest(services=["not a name!"])
    refused(stub, pb, bad, grpc.StatusCode.INVALID_ARGUMENT, ["not a name!"])
    print("ok")


if __name__ == "__main__":
    main()
