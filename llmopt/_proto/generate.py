"""Regenerate ``descriptors.py`` from the ``.proto`` files under ``proto/`` (``make proto``).

    python -m llmopt._proto.generate

Runs ``grpc_tools.protoc`` over every ``.proto`` file (laid out by package path, so their
imports resolve as written) and stores the resulting ``FileDescriptorSet``, imports included, as
a bytes literal in a Python module: it ships inside the wheel like any module, and
tests/server/test_proto.py regenerates it to prove it matches the ``.proto`` sources.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
OUTPUT = Path(__file__).with_name("descriptors.py")
HEADER = '''"""Generated from proto/ by ``make proto`` (``python -m llmopt._proto.generate``).

Do not edit. A serialized ``google.protobuf.FileDescriptorSet`` of: {files}.
"""

FILE_DESCRIPTOR_SET = (
'''


def proto_files(proto_dir: Path = PROTO_DIR) -> list[str]:
    return sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))


def descriptor_set(proto_dir: Path = PROTO_DIR) -> bytes:
    """Compile every ``.proto`` under ``proto_dir`` into one serialized FileDescriptorSet."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        args = ["protoc", f"-I{proto_dir}", "--include_imports",
                f"--descriptor_set_out={out}", *proto_files(proto_dir)]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto_dir}")
        return out.read_bytes()


def render(data: bytes, files: list[str]) -> str:
    lines = [HEADER.format(files=", ".join(files))]
    for start in range(0, len(data), 72):
        lines.append(f"    {data[start:start + 72]!r}\n")
    lines.append(")\n")
    return "".join(lines)


def main(output: Path = OUTPUT) -> int:
    output.write_text(render(descriptor_set(), proto_files()))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT))
