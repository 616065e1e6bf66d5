"""``llmopt generate PKG PROMPT``: stream a completion (chat-formatted where the package has a
chat template, unless ``--raw``). With ``--server HOST:PORT``, PKG names a model of that
server and the completion streams through :class:`llmopt.Client`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llmopt.cli._providers import add_provider_args, load_runner


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="generate text with a decoder package",
                              description="Generate a completion and stream it to stdout; "
                              "statistics go to stderr.")
    p.add_argument("package", help="package directory (with --server: the model's name)")
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
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="draft up to N tokens per step from the text so far and check them in "
                   "one step: the same tokens, fewer steps where the answer repeats (default "
                   "0: off; with --server, the server's default; a served request drafts while "
                   "it runs alone in its batch)")
    p.add_argument("--prediction-file", metavar="FILE",
                   help="text the answer is expected to resemble (OpenAI's Predicted Outputs: "
                   "a file being edited): drafts are looked up in it too, 4 per step unless "
                   "--prompt-lookup says; the same tokens as without")
    p.add_argument("--no-stream", action="store_true", help="print the text when done")
    p.add_argument("--json", action="store_true", help="print the result and stats as JSON")
    structured = p.add_argument_group(
        "structured output (docs/structured-output.md)").add_mutually_exclusive_group()
    structured.add_argument("--json-object", action="store_true",
                            help="the output is one JSON object")
    structured.add_argument("--json-schema", metavar="FILE",
                            help="the output is JSON valid against the JSON Schema in FILE")
    structured.add_argument("--regex", metavar="PATTERN",
                            help="the output matches this regular expression")
    structured.add_argument("--lark", metavar="FILE",
                            help="the output follows the Lark grammar in FILE")
    add_provider_args(p)
    remote = p.add_argument_group("remote generation (llmopt serve)")
    remote.add_argument("--server", metavar="HOST:PORT",
                        help="generate on this llmopt server instead of in-process")
    remote.add_argument("--token-file", help="file whose first line is the bearer token")
    remote.add_argument("--token-env", metavar="VAR", help="variable holding the bearer token")
    remote.add_argument("--tls", action="store_true", help="connect with TLS (system CAs)")
    remote.add_argument("--tls-ca", help="CA certificate (PEM) that signed the server's")
    remote.add_argument("--tls-cert", help="client certificate (PEM), for mutual TLS")
    remote.add_argument("--tls-key", help="client private key (PEM), for mutual TLS")
    remote.add_argument("--timeout", type=float, help="deadline of the request, seconds")


def run(args: argparse.Namespace) -> int:
    from llmopt.errors import InvalidInputError
    from llmopt.runtime.generator import Generator
    from llmopt.runtime.sampling import SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop=tuple(args.stop), ignore_eos=args.ignore_eos, response_format=_format(args),
        prompt_lookup=args.prompt_lookup, prediction=_prediction(args.prediction_file),
    )
    if args.server:
        stream, providers = _remote_stream(args, prompt, params)
    else:
        generator = load_runner(args)
        if not isinstance(generator, Generator):
            raise InvalidInputError(f"{args.package} is an encoder package",
                                    fix="use `llmopt embed` for it")
        chat = not args.raw and bool(getattr(generator.tokenizer, "chat_template", None))
        stream = generator.stream(prompt, params, chat=chat)
        providers = generator.providers
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
                          "providers": providers}, ensure_ascii=False))
        return 0
    if args.no_stream:
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    s = result.stats
    print(f"[{s.prompt_tokens} prompt + {s.generated_tokens} generated tokens, "
          f"TTFT {s.ttft_s * 1000:.0f} ms, decode {s.decode_tokens_per_s:.1f} tokens/s, "
          f"finish: {result.finish_reason}, provider: {providers[0] if providers else '?'}]",
          file=sys.stderr)
    return 0


def _remote_stream(args: argparse.Namespace, prompt: str, params: Any) -> tuple[Any, list[str]]:
    """A stream from the server's model ``args.package``, and the providers it runs on."""
    from llmopt.client import Client
    from llmopt.server.config import read_tokens

    token = None
    if args.token_file or args.token_env:
        token = read_tokens(file=args.token_file, env=args.token_env)[0]
    client = Client(args.server, token=token, tls=args.tls, root_certificates=args.tls_ca,
                    client_cert=args.tls_cert, client_key=args.tls_key, timeout=args.timeout)
    details = client.get_model(args.package)
    has_template = bool((details.manifest.get("generation") or {}).get("chat_template"))
    stream = client.stream(args.package, prompt, params, chat=not args.raw and has_template)
    return stream, list(details.providers)


def _prediction(path: str | None) -> str | None:
    from llmopt.errors import InvalidInputError

    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read the prediction {path}: {exc}",
                                fix="pass a readable UTF-8 text file") from None


def _format(args: argparse.Namespace) -> Any:
    """The ResponseFormat the flags ask for, or None."""
    from llmopt.errors import InvalidInputError
    from llmopt.runtime.constraints import ResponseFormat

    if args.json_object:
        return ResponseFormat.json_object()
    if args.regex is not None:
        return ResponseFormat.regex(args.regex)
    path = args.json_schema or args.lark
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror}",
                                fix="pass a readable file") from None
    if args.lark:
        return ResponseFormat.lark(text)
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise InvalidInputError(f"{path} is not JSON: {exc}",
                                fix="pass a file holding one JSON Schema object") from None
    return ResponseFormat.json_schema(schema)
