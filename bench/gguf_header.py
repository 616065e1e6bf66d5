"""How long llmopt's GGUF header check takes before a refusal (or the load), against
``gguf.GGUFReader`` (what transformers constructs to read a GGUF config), on SmolLM2's GGUF.

Interleaved repeats in one process (warm page cache, imports done), medians; plus one fresh
process timing ``sources.resolve`` (header read + check) with its imports, as a user's first
``llmopt export`` pays it.

    python -m bench.gguf_header [--repeats 5] [--out bench/results/gguf_header.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

FRESH = ("import sys, time; t = time.perf_counter(); from llmopt.exporter import sources; "
         "sources.resolve(sys.argv[1]); print(time.perf_counter() - t)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/gguf_header.json")
    args = parser.parse_args()

    import gguf

    from llmopt.exporter import gguf_header
    from llmopt.models import fetch

    path = Path(fetch("smollm2-135m-instruct"))  # the .gguf file
    header_s, reader_s = [], []
    gguf_header.check(gguf_header.read(path))  # imports and page cache warm
    for _ in range(args.repeats):
        start = time.perf_counter()
        gguf_header.check(gguf_header.read(path))
        header_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        gguf.GGUFReader(path)
        reader_s.append(time.perf_counter() - start)
    fresh = subprocess.run([sys.executable, "-c", FRESH, str(path)], capture_output=True,
                           text=True, check=True)
    result = {
        "file": path.name,
        "repeats": args.repeats,
        "header_read_and_check_s": statistics.median(header_s),
        "gguf_reader_s": statistics.median(reader_s),
        "reader_over_header": statistics.median(reader_s) / statistics.median(header_s),
        "fresh_process_resolve_s": float(fresh.stdout.strip().splitlines()[-1]),
        "runs": {"header": header_s, "gguf_reader": reader_s},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
