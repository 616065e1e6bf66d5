"""Message classes and service descriptors of llmopt's gRPC protocols.

Built from ``descriptors.py`` (generated from ``proto/`` by ``make proto``) into a private
descriptor pool rather than protobuf's default one: tritonclient registers the same
``inference.*`` names from files of its own, and two definitions of one name in the default pool
make the second import fail. With a private pool a process can hold llmopt's server or client
and tritonclient at once.

The pool and every message class are built once, under a lock: two threads creating the class
of one message would get two classes, and a message would refuse the other's instances.
"""

from __future__ import annotations

import threading
from typing import Any

LLMOPT_SERVICE = "llmopt.v1.Llmopt"
KSERVE_SERVICE = "inference.GRPCInferenceService"

_lock = threading.Lock()
_built: dict[str, Any] = {}  # "pool" once built
_classes: dict[str, Any] = {}


def pool() -> Any:
    """The descriptor pool holding llmopt's protocol files (built on first use)."""
    if "pool" not in _built:
        with _lock:
            if "pool" not in _built:
                _build()
    return _built["pool"]


def _build() -> None:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    from llmopt._proto.descriptors import FILE_DESCRIPTOR_SET

    built = descriptor_pool.DescriptorPool()
    files = descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET).file
    for file in files:
        built.AddSerializedFile(file.SerializeToString())

    def add(descriptor: Any) -> None:
        _classes[descriptor.full_name] = message_factory.GetMessageClass(descriptor)
        for nested in descriptor.nested_types:
            add(nested)

    for file in files:
        for message_type in built.FindFileByName(file.name).message_types_by_name.values():
            add(message_type)
    _built["pool"] = built


def message(full_name: str) -> Any:
    """The message class of ``full_name``, e.g. ``message("llmopt.v1.GenerateRequest")``."""
    pool()
    return _classes[full_name]


def service(full_name: str) -> Any:
    """The ``ServiceDescriptor`` of ``full_name``."""
    return pool().FindServiceByName(full_name)


def add_file(serialized: bytes) -> None:
    """Add another file (health, reflection) so that server reflection can describe it too."""
    from google.protobuf import descriptor_pb2

    name = descriptor_pb2.FileDescriptorProto.FromString(serialized).name
    built = pool()
    with _lock:
        try:
            built.FindFileByName(name)
        except KeyError:
            built.AddSerializedFile(serialized)
