"""Message classes and service descriptors of llmopt's gRPC protocols.

Built from ``descriptors.py`` (generated from ``proto/`` by ``make proto``) into a private
descriptor pool rather than protobuf's default one: tritonclient registers the same
``inference.*`` names from files of its own, and two definitions of one name in the default pool
make the second import fail. With a private pool a process can hold llmopt's server or client
and tritonclient at once.
"""

from __future__ import annotations

import functools
from typing import Any

LLMOPT_SERVICE = "llmopt.v1.Llmopt"
KSERVE_SERVICE = "inference.GRPCInferenceService"


@functools.cache
def pool() -> Any:
    """The descriptor pool holding llmopt's protocol files (built on first use)."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    from llmopt._proto.descriptors import FILE_DESCRIPTOR_SET

    built = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET).file:
        built.AddSerializedFile(file.SerializeToString())
    return built


@functools.cache
def message(full_name: str) -> Any:
    """The message class of ``full_name``, e.g. ``message("llmopt.v1.GenerateRequest")``."""
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(pool().FindMessageTypeByName(full_name))


def service(full_name: str) -> Any:
    """The ``ServiceDescriptor`` of ``full_name``."""
    return pool().FindServiceByName(full_name)


def add_file(serialized: bytes) -> None:
    """Add another file (health, reflection) so that server reflection can describe it too."""
    from google.protobuf import descriptor_pb2

    name = descriptor_pb2.FileDescriptorProto.FromString(serialized).name
    try:
        pool().FindFileByName(name)
    except KeyError:
        pool().AddSerializedFile(serialized)
