"""Server reflection that keeps the proto comments.

Python's generated descriptors carry no source info, so stock reflection hands grpcurl `describe` bare
definitions. This servicer answers with the FileDescriptorProtos of `velesio/v1/descriptors.binpb`
(generated with source info next to the code) wherever it has them, so users read the doc comments.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionResponse


@cache
def documented_files() -> dict[str, bytes]:
    """Serialized FileDescriptorProto (with comments) by file name, for every file of the velesio API."""
    data = resources.files("velesio.v1").joinpath("descriptors.binpb").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    return {f.name: f.SerializeToString() for f in files}


class DocumentedReflectionServicer(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    def _documented(self, response: ServerReflectionResponse) -> ServerReflectionResponse:
        if response.HasField("file_descriptor_response"):
            files = response.file_descriptor_response.file_descriptor_proto
            docs = documented_files()
            for i, serialized in enumerate(files):
                name = descriptor_pb2.FileDescriptorProto.FromString(serialized).name
                files[i] = docs.get(name, serialized)
        return response

    def _file_by_filename(self, request: Any, filename: str) -> ServerReflectionResponse:
        return self._documented(super()._file_by_filename(request, filename))

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> ServerReflectionResponse:
        name = self._owner_of_method(fully_qualified_name)
        return self._documented(super()._file_containing_symbol(request, name))

    def _owner_of_method(self, name: str) -> str:
        """The service of `name` when it names a method, else `name`: protobuf's upb pool finds no
        method by its full name (grpcurl's `describe pkg.Service.Method` asks for one); its service's
        file holds the method."""
        service, _, method = name.rpartition(".")
        try:
            self._pool.FindFileContainingSymbol(name)
            return name
        except KeyError:
            pass
        try:
            return service if method in self._pool.FindServiceByName(service).methods_by_name else name
        except KeyError:
            return name

    def _file_containing_extension(
        self, request: Any, containing_type: str, extension_number: int
    ) -> ServerReflectionResponse:
        return self._documented(
            super()._file_containing_extension(request, containing_type, extension_number)
        )
