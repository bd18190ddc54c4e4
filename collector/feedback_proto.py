"""Message classes of ``proto/tracetrain/v1/feedback.proto``, built at import time.

Why not generated ``_pb2`` code: protoc (grpcio-tools) is not a dependency, and
generated modules pin the protobuf runtime to the generator's major version
(gencode 7.x refuses runtime 5.x), while tracetrain accepts protobuf >= 5. So the
descriptor is written here with ``descriptor_pb2``, as ``otlp_wire`` does for its
shadow of the OTLP schema, and registered in the default pool like generated code
would be. ``tests/unit/collector/test_feedback_proto.py`` parses the .proto file
and checks it declares exactly these messages, fields and methods.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

FILE_NAME = "tracetrain/v1/feedback.proto"
PACKAGE = "tracetrain.v1"
SERVICE = f"{PACKAGE}.FeedbackService"
ADD_REWARD_METHOD = f"/{SERVICE}/AddReward"

_F = descriptor_pb2.FieldDescriptorProto
# (message, [(field, number, type, type_name, proto3 optional)])
MESSAGES = {
    "AddRewardRequest": [
        ("episode_id", 1, _F.TYPE_STRING, None, False),
        ("value", 2, _F.TYPE_DOUBLE, None, True),
        ("name", 3, _F.TYPE_STRING, None, False),
        ("reward_id", 4, _F.TYPE_STRING, None, False),
        ("attributes", 5, _F.TYPE_MESSAGE, ".google.protobuf.Struct", False),
        ("time_unix_nano", 6, _F.TYPE_FIXED64, None, False),
    ],
    "AddRewardResponse": [
        ("accepted", 1, _F.TYPE_BOOL, None, False),
        ("duplicate", 2, _F.TYPE_BOOL, None, False),
        ("reward_id", 3, _F.TYPE_STRING, None, False),
    ],
}
METHODS = {"AddReward": ("AddRewardRequest", "AddRewardResponse")}


def _file_proto() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(
        name=FILE_NAME, package=PACKAGE, syntax="proto3", dependency=[struct_pb2.DESCRIPTOR.name])
    for message_name, fields in MESSAGES.items():
        message = proto.message_type.add(name=message_name)
        for name, number, type_, type_name, optional in fields:
            field = message.field.add(name=name, number=number, type=type_, label=_F.LABEL_OPTIONAL,
                                      json_name="".join(w.capitalize() if i else w
                                                        for i, w in enumerate(name.split("_"))))
            if type_name:
                field.type_name = type_name
            if optional:  # proto3 `optional`: a synthetic oneof, so presence is known
                field.proto3_optional = True
                field.oneof_index = len(message.oneof_decl)
                message.oneof_decl.add(name=f"_{name}")
    service = proto.service.add(name="FeedbackService")
    for name, (request, response) in METHODS.items():
        service.method.add(name=name, input_type=f".{PACKAGE}.{request}", output_type=f".{PACKAGE}.{response}")
    return proto


def _register() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(FILE_NAME)
    except KeyError:
        pool.Add(_file_proto())
    return pool


_POOL = _register()
AddRewardRequest = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.AddRewardRequest"))
AddRewardResponse = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.AddRewardResponse"))
