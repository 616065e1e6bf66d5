"""Peak RSS of a process that loads one package and runs one request of the workload.

    python -m llmopt.bench.rss_probe PACKAGE --prompt-tokens 100 --new-tokens 128 [--threads N]
        [--cpu-option NAME=VALUE ...]

The sweep loads every package into one process (to interleave them), so its peak RSS is the
sum of them all. A fresh process per package gives the number to set beside a GenAI worker's
(itself a process holding one model): prints ``{"peak_rss_bytes": N}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def probe_peak_rss(package: str | Path, prompt_tokens: int, new_tokens: int,
                   threads: int | None = None, batch_size: int = 1) -> int | None:
    """Run this module in a child process and return its peak RSS (None where unknown)."""
    command = [sys.executable, "-m", "llmopt.bench.rss_probe", str(package),
               "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens),
               "--batch-size", str(batch_size)]
    if threads:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"the RSS probe of {package} failed: {tail}")
    value = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    return None if value is None else int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cpu-option", action="append", default=[], metavar="NAME=VALUE",
                        help="a CPUOptions field, e.g. float_prompts=false (JSON values)")
    args = parser.parse_args()

    import llmopt
    from llmopt.bench import memory, prompts

    cpu: dict[str, Any] = {"intra_op_threads": args.threads} if args.threads else {}
    for option in args.cpu_option:
        name, _, value = option.partition("=")
        cpu[name] = json.loads(value)
    options = {"cpu": cpu} if cpu else None
    runner: Any = llmopt.load(args.package, ["cpu"], provider_options=options)
    if hasattr(runner, "generate"):
        ids = prompts.decoder_prompts(runner.tokenizer, args.prompt_tokens, args.batch_size)
        runner.generate_batch(ids, max_new_tokens=args.new_tokens, ignore_eos=True)
    else:
        texts, _ = prompts.encoder_texts(runner.tokenizer, args.prompt_tokens, args.batch_size)
        runner.embed(texts)
    print(json.dumps({"peak_rss_bytes": memory.peak_rss_bytes()}))


if __name__ == "__main__":
    main()
