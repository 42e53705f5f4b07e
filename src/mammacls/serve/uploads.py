"""Reading ``multipart/form-data`` uploads into memory, with limits enforced while the body streams in.

Starlette's own form parser spools files over 1 MB to temporary files; scans must never touch the
disk, so the parts are gathered here (python-multipart's streaming parser) as ``InMemoryFile``s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath

from mammacls.inference.pixels import InMemoryFile

FILES_FIELD = "files"
MAX_FIELDS = 16  # plain form fields (explain, lesion_map): a handful
MAX_FIELD_BYTES = 1024


class UploadRefused(Exception):
    """The request as a whole cannot be taken: an HTTP status and one line for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 64 * 1024 * 1024
    max_files: int = 32


@dataclass
class Upload:
    files: list[InMemoryFile] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)


def boundary_of(content_type: str | None) -> bytes:
    """The multipart boundary, or 415 for any other body."""
    from python_multipart.multipart import parse_options_header

    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        shown = (content_type or "none").split(";")[0]
        raise UploadRefused(415, f"send the scans as multipart/form-data in the field '{FILES_FIELD}' "
                                 f"(got content type {shown})")
    return options[b"boundary"]


def display_name(raw: str, index: int) -> str:
    """The client's file name without its folders (``C:\\scans\\a.png`` -> ``a.png``)."""
    name = PureWindowsPath(PurePosixPath(raw).name).name.strip()
    return name or f"upload-{index + 1}"


async def read_upload(content_type: str | None, declared_length: str | None, body: AsyncIterator[bytes],
                      limits: UploadLimits) -> Upload:
    """Every part of a multipart body, held in memory; ``UploadRefused`` as soon as a limit is passed."""
    from python_multipart import MultipartParser
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import parse_options_header

    boundary = boundary_of(content_type)
    too_large = UploadRefused(413, f"request larger than {limits.max_bytes // (1024 * 1024)} MB "
                                   "(mammacls serve --max-upload-mb)")
    if declared_length and declared_length.isdigit() and int(declared_length) > limits.max_bytes:
        raise too_large
    upload, state = Upload(), _PartState()

    def on_headers_finished() -> None:
        disposition = parse_options_header(state.headers.get(b"content-disposition", b""))[1]
        state.name = disposition.get(b"name", b"").decode("utf-8", "replace")
        state.filename = disposition.get(b"filename")
        if state.filename is not None and len(upload.files) >= limits.max_files:
            raise UploadRefused(413, f"more than {limits.max_files} files in one request "
                                     "(mammacls serve --max-files); send them in several")
        if state.filename is None and len(upload.fields) >= MAX_FIELDS:
            raise UploadRefused(400, f"more than {MAX_FIELDS} form fields")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state.data.extend(data[start:end])
        if state.filename is None and len(state.data) > MAX_FIELD_BYTES:
            raise UploadRefused(400, f"form field '{state.name}' longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end() -> None:
        if state.filename is not None:
            raw = state.filename.decode("utf-8", "replace")
            upload.files.append(InMemoryFile(display_name(raw, len(upload.files)), bytes(state.data)))
        else:
            upload.fields[state.name] = state.data.decode("utf-8", "replace")
        state.reset()

    callbacks = {"on_part_begin": state.reset, "on_header_field": state.header_field,
                 "on_header_value": state.header_value, "on_header_end": state.header_end,
                 "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
                 "on_part_end": on_part_end}
    parser = MultipartParser(boundary, callbacks)
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > limits.max_bytes:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise UploadRefused(400, f"malformed multipart body ({str(exc).splitlines()[0][:120]})") from None
    return upload


@dataclass
class _PartState:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    field_name: bytearray = field(default_factory=bytearray)
    value: bytearray = field(default_factory=bytearray)
    name: str = ""
    filename: bytes | None = None
    data: bytearray = field(default_factory=bytearray)

    def reset(self) -> None:
        self.headers, self.name, self.filename, self.data = {}, "", None, bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.field_name.extend(data[start:end])

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.value.extend(data[start:end])

    def header_end(self) -> None:
        self.headers[bytes(self.field_name).lower()] = bytes(self.value)
        self.field_name, self.value = bytearray(), bytearray()
