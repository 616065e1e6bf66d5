"""Write docs/grpc-api.md, the gRPC API reference, from the .proto files under proto/.

    python scripts/gen_api_docs.py           # (re)write docs/grpc-api.md
    python scripts/gen_api_docs.py --check   # exit 1 if docs/grpc-api.md is stale

The .proto files are compiled by ``grpc_tools.protoc`` with ``--include_source_info`` into a
``FileDescriptorSet``; the page is rendered from those descriptors, and the comments written in
the .proto files (attached to a service, RPC, message, field, enum or value) become the
descriptions. Nothing is typed twice, so the page cannot drift from the protocol:
tests/test_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
OUTPUT = ROOT / "docs" / "grpc-api.md"
COMMAND = "python scripts/gen_api_docs.py"

# Field numbers of descriptor.proto, the steps of a SourceCodeInfo location path.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE, FILE_SYNTAX = 4, 5, 6, 12
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
ENUM_VALUE = 2
SERVICE_METHOD = 2

STREAMING = {
    (False, False): "unary",
    (False, True): "server streaming",
    (True, False): "client streaming",
    (True, True): "bidirectional streaming",
}


def proto_files(proto_dir: Path = PROTO_DIR) -> list[str]:
    """Every .proto file, relative to ``proto_dir`` (laid out by package path)."""
    return sorted(p.relative_to(proto_dir).as_posix() for p in proto_dir.rglob("*.proto"))


def descriptor_set(proto_dir: Path = PROTO_DIR) -> Any:
    """A ``FileDescriptorSet`` of every .proto file under ``proto_dir``, comments included."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    files = proto_files(proto_dir)
    if not files:
        raise SystemExit(f"no .proto files under {proto_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        args = ["protoc", f"-I{proto_dir}", "--include_source_info",
                f"--descriptor_set_out={out}", *files]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto_dir} (its errors are printed above)")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


# --- comments -----------------------------------------------------------------------------------

class Comments:
    """The comments of one file, looked up by the descriptor path of what they describe."""

    def __init__(self, file: Any) -> None:
        self._by_path: dict[tuple[int, ...], Any] = {
            tuple(loc.path): loc for loc in file.source_code_info.location
        }

    def text(self, path: Iterable[int], detached: bool = False) -> str:
        """Leading then trailing comment of ``path`` (with ``detached``, the detached ones
        before it too), one leading space per line removed, paragraphs kept."""
        loc = self._by_path.get(tuple(path))
        if loc is None:
            return ""
        parts = [*(loc.leading_detached_comments if detached else ()),
                 loc.leading_comments, loc.trailing_comments]
        blocks = [_dedent(p) for p in parts if p.strip()]
        return "\n\n".join(b for b in blocks if b)


def _dedent(comment: str) -> str:
    lines = [line[1:] if line.startswith(" ") else line for line in comment.splitlines()]
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def _cell(text: str) -> str:
    """A comment as one Markdown table cell: one line, pipes escaped."""
    words = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return words.replace("|", "\\|")


# --- names and types ----------------------------------------------------------------------------

def _anchor(full_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", full_name.lower()).strip("-")


def _file_anchor(file: Any) -> str:
    return _anchor("file " + file.name)


def _scalar(type_number: int) -> str:
    from google.protobuf import descriptor_pb2

    name = descriptor_pb2.FieldDescriptorProto.Type.Name(type_number)
    return name.removeprefix("TYPE_").lower()


class Index:
    """Every message and enum of the set by full name (``llmopt.v1.ChatMessage``)."""

    def __init__(self, files: Iterable[Any]) -> None:
        self.messages: dict[str, Any] = {}
        self.enums: dict[str, Any] = {}
        for file in files:
            prefix = file.package + "." if file.package else ""
            for message in file.message_type:
                self._add(prefix + message.name, message)
            for enum in file.enum_type:
                self.enums[prefix + enum.name] = enum

    def _add(self, full_name: str, message: Any) -> None:
        self.messages[full_name] = message
        for nested in message.nested_type:
            self._add(f"{full_name}.{nested.name}", nested)
        for enum in message.enum_type:
            self.enums[f"{full_name}.{enum.name}"] = enum

    def link(self, type_name: str, package: str) -> str:
        """A message or enum type as a Markdown link to its section."""
        full = type_name.lstrip(".")
        shown = full.removeprefix(package + ".") if package else full
        return f"[`{shown}`](#{_anchor(full)})"

    def field_type(self, field: Any, package: str) -> str:
        from google.protobuf import descriptor_pb2

        F = descriptor_pb2.FieldDescriptorProto
        if field.type == F.TYPE_MESSAGE:
            entry = self.messages.get(field.type_name.lstrip("."))
            if entry is not None and entry.options.map_entry:
                key, value = entry.field[0], entry.field[1]
                return f"{self.field_type(key, package)} → {self.field_type(value, package)}"
            return self.link(field.type_name, package)
        if field.type == F.TYPE_ENUM:
            return self.link(field.type_name, package)
        return f"`{_scalar(field.type)}`"

    def is_map(self, field: Any) -> bool:
        entry = self.messages.get(field.type_name.lstrip(".")) if field.type_name else None
        return entry is not None and bool(entry.options.map_entry)


def _label(field: Any, message: Any, index: Index) -> str:
    from google.protobuf import descriptor_pb2

    if index.is_map(field):
        return "map"
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return "repeated"
    if field.proto3_optional:
        return "optional"
    if field.HasField("oneof_index"):
        return f"oneof `{message.oneof_decl[field.oneof_index].name}`"
    return "singular"


# --- rendering ----------------------------------------------------------------------------------

def _ordered(files: Iterable[Any]) -> list[Any]:
    """llmopt's own API first, then the other files, each group by name."""
    return sorted(files, key=lambda f: (not f.package.startswith("llmopt"), f.name))


def render(fds: Any) -> str:
    """The Markdown page for a ``FileDescriptorSet`` compiled with source info."""
    files = _ordered(fds.file)
    index = Index(files)
    out: list[str] = [
        "# gRPC API reference",
        "",
        "<!-- Generated from proto/ by scripts/gen_api_docs.py. Do not edit: change the .proto",
        f"     files (their comments are these descriptions) and run `{COMMAND}`. -->",
        "",
        "Every service, RPC, message and enum that `llmopt serve` speaks, rendered from the",
        "`.proto` files under `proto/`; tests/test_docs.py fails when this page is stale. For how",
        "to serve, configure and call the models, see [grpc.md](grpc.md).",
        "",
        "Field labels: *singular* (proto3 implicit presence: an unset field reads as its zero",
        "value), *optional* (explicit presence: unset is distinguishable), *repeated*, *map*, or",
        "*oneof `name`* (at most one field of the group is set). A map field's type reads",
        "`key` → `value`.",
        "",
        "## Contents",
        "",
    ]
    for file in files:
        out.append(f"- [`{file.name}`](#{_file_anchor(file)}) (package `{file.package}`)")
        for service in file.service:
            full = f"{file.package}.{service.name}"
            out.append(f"  - service [`{full}`](#{_anchor(full)})")
    out.append("")
    for file in files:
        out += _render_file(file, index)
    return "\n".join(out).rstrip("\n") + "\n"


def _render_file(file: Any, index: Index) -> list[str]:
    comments = Comments(file)
    pkg = file.package
    out = [f'<a id="{_file_anchor(file)}"></a>', "", f"## `{file.name}`", "",
           f"Package `{pkg}`."]
    if file.dependency:
        out[-1] += " Imports " + ", ".join(f"`{d}`" for d in file.dependency) + "."
    out.append("")
    about = comments.text([FILE_SYNTAX], detached=True)
    if about:
        out += [about, ""]
    for i, service in enumerate(file.service):
        out += _render_service(service, pkg, [FILE_SERVICE, i], comments, index)
    if file.message_type:
        out += [f"### Messages of `{pkg}`", ""]
        for i, message in enumerate(file.message_type):
            out += _render_message(message, f"{pkg}.{message.name}", pkg, [FILE_MESSAGE, i],
                                   comments, index)
    if file.enum_type:
        out += [f"### Enums of `{pkg}`", ""]
        for i, enum in enumerate(file.enum_type):
            out += _render_enum(enum, f"{pkg}.{enum.name}", pkg, [FILE_ENUM, i], comments)
    return out


def _render_service(service: Any, pkg: str, path: list[int], comments: Comments,
                    index: Index) -> list[str]:
    full = f"{pkg}.{service.name}"
    out = [f'<a id="{_anchor(full)}"></a>', "", f"### Service `{full}`", ""]
    about = comments.text(path)
    if about:
        out += [about, ""]
    out += ["| RPC | Request | Response | Kind | Description |",
            "|---|---|---|---|---|"]
    for i, method in enumerate(service.method):
        kind = STREAMING[(method.client_streaming, method.server_streaming)]
        request = ("stream " if method.client_streaming else "") + \
            index.link(method.input_type, pkg)
        response = ("stream " if method.server_streaming else "") + \
            index.link(method.output_type, pkg)
        text = _cell(comments.text([*path, SERVICE_METHOD, i]))
        out.append(f"| `{method.name}` | {request} | {response} | {kind} | {text} |")
    out.append("")
    return out


def _render_message(message: Any, full: str, pkg: str, path: list[int], comments: Comments,
                    index: Index) -> list[str]:
    if message.options.map_entry:
        return []  # shown as map<K, V> on the field that holds it
    shown = full.removeprefix(pkg + ".")
    out = [f'<a id="{_anchor(full)}"></a>', "", f"#### `{shown}`", ""]
    about = comments.text(path)
    if about:
        out += [about, ""]
    if message.field:
        out += ["| Field | Number | Type | Label | Description |", "|---|---:|---|---|---|"]
        for i, field in enumerate(message.field):
            text = _cell(comments.text([*path, MESSAGE_FIELD, i]))
            out.append(f"| `{field.name}` | {field.number} | {index.field_type(field, pkg)} | "
                       f"{_label(field, message, index)} | {text} |")
    else:
        out.append("No fields.")
    out.append("")
    for i, nested in enumerate(message.nested_type):
        out += _render_message(nested, f"{full}.{nested.name}", pkg,
                               [*path, MESSAGE_NESTED, i], comments, index)
    for i, enum in enumerate(message.enum_type):
        out += _render_enum(enum, f"{full}.{enum.name}", pkg, [*path, MESSAGE_ENUM, i],
                            comments)
    return out


def _render_enum(enum: Any, full: str, pkg: str, path: list[int],
                 comments: Comments) -> list[str]:
    shown = full.removeprefix(pkg + ".")
    out = [f'<a id="{_anchor(full)}"></a>', "", f"#### enum `{shown}`", ""]
    about = comments.text(path)
    if about:
        out += [about, ""]
    out += ["| Name | Number | Description |", "|---|---:|---|"]
    for i, value in enumerate(enum.value):
        text = _cell(comments.text([*path, ENUM_VALUE, i]))
        out.append(f"| `{value.name}` | {value.number} | {text} |")
    out.append("")
    return out


# --- command line -------------------------------------------------------------------------------

def generate(proto_dir: Path = PROTO_DIR) -> str:
    """The page as it should be for the .proto files under ``proto_dir``."""
    return render(descriptor_set(proto_dir))


def check(output: Path = OUTPUT, proto_dir: Path = PROTO_DIR) -> list[str]:
    """Unified-diff lines between ``output`` and a fresh rendering; empty when up to date."""
    want = generate(proto_dir)
    have = output.read_text(encoding="utf-8") if output.is_file() else ""
    if have == want:
        return []
    name = output.relative_to(ROOT).as_posix() if output.is_relative_to(ROOT) else str(output)
    return list(difflib.unified_diff(have.splitlines(), want.splitlines(),
                                     f"{name} (committed)", f"{name} (from proto/)", lineterm=""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the page differs from what would be generated")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check:
        diff = check(args.output)
        if not diff:
            print(f"{args.output} is up to date")
            return 0
        shown = diff[:60]
        print("\n".join(shown), file=sys.stderr)
        if len(diff) > len(shown):
            print(f"... {len(diff) - len(shown)} more diff lines", file=sys.stderr)
        print(f"\n{args.output} is stale: the .proto files changed since it was generated. "
              f"Run `{COMMAND}` and commit the result.", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(generate(), encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
