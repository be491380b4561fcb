"""A foreign reflection client: lists a server's services with one protocol
version (v1 or v1alpha) and resolves every one of them, the way generic
tools (grpc_requests, grpcurl, Evans) do, through grpcio-reflection's
descriptor database. Also checks that a lookup miss is an in-stream
error_response with NOT_FOUND, not a status that ends the stream.

grpcio-reflection ships stubs for v1alpha only; v1's messages are the same
on the wire, so v1 is spoken with those message classes on v1's method path.

Usage: reflection_client.py HOST:PORT v1|v1alpha
Prints one line per service (`resolved NAME: N methods`) and `ok` at the end;
exits non-zero with the reason otherwise.
"""

import sys

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as pb
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main():
    target, version = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=10)
    path = {
        "v1": "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "v1alpha": "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    }[version]
    call = channel.stream_stream(
        path,
        request_serializer=pb.ServerReflectionRequest.SerializeToString,
        response_deserializer=pb.ServerReflectionResponse.FromString,
    )

    db = ProtoReflectionDescriptorDatabase(channel)

    class Stub:
        ServerReflectionInfo = call

    db._stub = Stub()  # speak `version`, not the library's v1alpha
    pool = descriptor_pool.DescriptorPool(db)

    services = list(db.get_services())
    print("listed:", ", ".join(services), flush=True)
    for name in services:
        service = pool.FindServiceByName(name)
        for method in service.methods:
            # Resolving the messages pulls in every file they live in.
            method.input_type.fields
            method.output_type.fields
        print(f"resolved {name}: {len(service.methods)} methods", flush=True)

    # Several requests on ONE stream: a miss must not end it.
    requests = [
        pb.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
        pb.ServerReflectionRequest(file_by_filename="no/such/file.proto"),
        pb.ServerReflectionRequest(list_services=""),
    ]
    responses = list(call(iter(requests), timeout=10))
    assert len(responses) == 3, f"{len(responses)} answers to 3 requests"
    for res in responses[:2]:
        kind = res.WhichOneof("message_response")
        assert kind == "error_response", f"a miss answered with {kind}"
        code = res.error_response.error_code
        assert code == grpc.StatusCode.NOT_FOUND.value[0], f"a miss answered code {code}"
    assert responses[2].WhichOneof("message_response") == "list_services_response"

    # FileContainingSymbol of a method, by its full name.
    first = services[0]
    method = pool.FindServiceByName(first).methods[0]
    res = next(
        call(
            iter([pb.ServerReflectionRequest(file_containing_symbol=method.full_name)]),
            timeout=10,
        )
    )
    assert res.WhichOneof("message_response") == "file_descriptor_response", res
    print("ok", flush=True)


if __name__ == "__main__":
    main()
