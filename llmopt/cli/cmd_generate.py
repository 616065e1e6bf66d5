"""``llmopt generate PKG PROMPT``: stream a completion (chat-formatted where the package has a
chat template, unless ``--raw``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from llmopt.cli._providers import add_provider_args, load_runner


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="generate text with a decoder package",
                              description="Generate a completion and stream it to stdout; "
                              "statistics go to stderr.")
    p.add_argument("package", help="package directory")
    p.add_argument("prompt", help="the prompt ('-' reads stdin)")
    p.add_argument("--raw", action="store_true",
                   help="continue the text as is instead of using the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate past end-of-sequence")
    p.add_argument("--no-stream", action="store_true", help="print the text when done")
    p.add_argument("--json", action="store_true", help="print the result and stats as JSON")
    add_provider_args(p)


def run(args: argparse.Namespace) -> int:
    from llmopt.errors import InvalidInputError
    from llmopt.runtime.generator import Generator
    from llmopt.runtime.sampling import SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )
    generator = load_runner(args)
    if not isinstance(generator, Generator):
        raise InvalidInputError(f"{args.package} is an encoder package",
                                fix="use `llmopt embed` for it")
    chat = not args.raw and bool(getattr(generator.tokenizer, "chat_template", None))
    stream = generator.stream(prompt, params, chat=chat)
    quiet = args.no_stream or args.json
    for delta in stream:
        if not quiet:
            sys.stdout.write(delta)
            sys.stdout.flush()
    result = stream.result
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids,
                          "finish_reason": result.finish_reason,
                          "stats": result.stats.as_dict(),
                          "providers": generator.providers}, ensure_ascii=False))
        return 0
    if args.no_stream:
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    s = result.stats
    print(f"[{s.prompt_tokens} prompt + {s.generated_tokens} generated tokens, "
          f"TTFT {s.ttft_s * 1000:.0f} ms, decode {s.decode_tokens_per_s:.1f} tokens/s, "
          f"finish: {result.finish_reason}, provider: {generator.providers[0]}]",
          file=sys.stderr)
    return 0
