"""Structured output: decoding constrained to a JSON schema, a regex, a Lark grammar or a tool call.

:class:`ResponseFormat` says what the output must match; it is built from OpenAI request shapes by
:meth:`ResponseFormat.from_openai` and checked when it is made, so a bad schema fails the request
that sent it, before any decoding. :class:`TokenConstraint` follows one sequence: before each
step it gives the mask of allowed tokens, after it consumes the sampled one; once the grammar is
complete the sequence ends, as at end-of-sequence.

Grammars are compiled and matched by llguidance (why that library: docs/structured-output.md).
Its view of a tokenizer takes about a second to build, so it is built once per tokenizer (that
is, once per loaded package) and cached; each request then compiles only its grammar.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmopt.errors import InvalidInputError
from llmopt.runtime.tool_calls import TOOL_NAME, tool_call_grammar

KINDS = ("json_object", "json_schema", "regex", "lark")
# compact JSON with the spacing models are trained on; flexible whitespace lets a model pad an
# object with newlines until max_new_tokens runs out
JSON_LAYOUT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ",
                               "key_separator": ": "}
ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ResponseFormat:
    """What generated text must match; ``text`` is the JSON schema, regex or Lark grammar.

    ``strict=False`` (JSON schemas) ignores keywords the grammar compiler does not implement
    instead of refusing the schema; the output is JSON of the schema's shape either way.
    """

    kind: str
    text: str = ""
    strict: bool = True
    grammar: str = field(init=False, repr=False, compare=False)  # llguidance's, compiled here

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInputError(f"unknown response format {self.kind!r}",
                                    fix="use one of " + ", ".join(KINDS))
        if not isinstance(self.text, str) or (self.kind != "json_object" and not self.text):
            raise InvalidInputError(f"a {self.kind} response format needs its {_WHAT[self.kind]}",
                                    fix=f"e.g. {_EXAMPLE[self.kind]}")
        object.__setattr__(self, "grammar", _compile(self.kind, self.text, self.strict))

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def json_object(cls) -> ResponseFormat:
        """Any JSON object."""
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any], strict: bool = True) -> ResponseFormat:
        """JSON valid against ``schema`` (a JSON Schema, as a dict)."""
        if not isinstance(schema, Mapping):
            raise InvalidInputError(f"a JSON schema is an object, not {type(schema).__name__}",
                                    fix=f"e.g. {_EXAMPLE['json_schema']}")
        try:
            text = json.dumps(schema, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"the JSON schema is not JSON: {exc}",
                                    fix="use only dicts, lists, strings, numbers, booleans and "
                                        "None in it") from None
        return cls("json_schema", text, strict)

    @classmethod
    def regex(cls, pattern: str) -> ResponseFormat:
        """Text matching ``pattern`` as a whole (Rust regex syntax, no look-around)."""
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> ResponseFormat:
        """Text of a Lark grammar (llguidance's dialect: ``start`` rule, ``%json {...}``)."""
        return cls("lark", grammar)

    @classmethod
    def tool_call(cls, tools: Sequence[Mapping[str, Any]], tool_choice: Any = "auto",
                  answer: ResponseFormat | None = None, parallel: bool = False) -> ResponseFormat:
        """A call of one of OpenAI-shaped ``tools``, as ``{"name": ..., "arguments": {...}}``
        (:func:`parse_tool_calls` reads it back); with ``parallel``, one or more calls, a line
        each.

        ``tool_choice`` ``"required"`` forces a call, ``{"type": "function", "function":
        {"name": N}}`` a call of N, ``"auto"`` lets the model answer in text instead (or in
        ``answer``'s JSON format, where one is given).
        """
        if answer is not None and answer.schema is None:
            raise InvalidInputError(f"tools combine with a JSON answer format, not {answer.kind}",
                                    fix="drop the tools or use a json_schema response format")
        return cls("lark", tool_call_grammar(tools, tool_choice,
                                             None if answer is None else answer.schema,
                                             JSON_LAYOUT, parallel))

    @classmethod
    def from_openai(cls, response_format: Mapping[str, Any] | None, tools: Any = None,
                    tool_choice: Any = None, parallel: bool = False) -> ResponseFormat | None:
        """The constraint of an OpenAI chat/completions request, or None where it has none.

        ``response_format`` is ``{"type": "text" | "json_object" | "json_schema", ...}``;
        ``tools`` and ``tool_choice`` as in the chat route (``"none"`` disables the tools),
        ``parallel`` its ``parallel_tool_calls``.
        Raises :class:`~llmopt.errors.InvalidInputError` naming the fix for a bad shape.
        """
        answer = _from_openai_format(response_format)
        if tools is None:
            if tool_choice not in (None, "none", "auto"):
                raise InvalidInputError("tool_choice is set but the request has no tools",
                                        fix="send tools, or drop tool_choice")
            return answer
        choice = "auto" if tool_choice is None else tool_choice
        if choice == "none":
            return answer
        return cls.tool_call(tools, choice, answer, parallel)

    # -- views ---------------------------------------------------------------------------------

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema the output matches (``{"type": "object"}`` for json_object)."""
        if self.kind == "json_object":
            return dict(ANY_OBJECT)
        return json.loads(self.text) if self.kind == "json_schema" else None


_WHAT = {"json_object": "", "json_schema": "schema", "regex": "pattern", "lark": "grammar"}
_EXAMPLE = {
    "json_object": 'ResponseFormat.json_object()',
    "json_schema": '{"type": "object", "properties": {"name": {"type": "string"}}}',
    "regex": r'ResponseFormat.regex(r"\d{4}-\d{2}-\d{2}")',
    "lark": 'ResponseFormat.lark(\'start: "yes" | "no"\')',
}


def _compile(kind: str, text: str, strict: bool) -> str:
    """llguidance's grammar for a format, checked: a bad schema, regex or grammar fails here."""
    from llguidance import LLMatcher

    if kind in ("json_object", "json_schema"):
        schema = text or json.dumps(ANY_OBJECT)
        try:
            grammar = LLMatcher.grammar_from_json_schema(
                schema, overrides={**JSON_LAYOUT, "lenient": not strict})  # type: ignore[arg-type]
        except ValueError as exc:
            raise InvalidInputError(f"the JSON schema is not a JSON object: {exc}",
                                    fix=f"e.g. {_EXAMPLE['json_schema']}") from None
    elif kind == "regex":
        grammar = LLMatcher.grammar_from_regex(text)
    else:
        grammar = LLMatcher.grammar_from_lark(text)
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        detail = messages[0].strip().splitlines()[0] if messages else "rejected"
        fix = ("pass strict=False (or \"strict\": false) to ignore unsupported keywords, or "
               "fix the schema" if kind == "json_schema" and strict else
               f"fix the {_WHAT[kind] or 'schema'}; e.g. {_EXAMPLE[kind]}")
        raise InvalidInputError(f"invalid {kind.replace('_', ' ')}: {detail}", fix=fix)
    return grammar


def _from_openai_format(value: Mapping[str, Any] | None) -> ResponseFormat | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidInputError("response_format must be an object",
                                fix='e.g. {"type": "json_object"}')
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat.json_object()
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise InvalidInputError(
                "response_format json_schema needs a \"json_schema\" object with a \"schema\"",
                fix='e.g. {"type": "json_schema", "json_schema": {"name": "answer", '
                    '"schema": {"type": "object"}}}')
        name = spec.get("name")
        if name is not None and (not isinstance(name, str) or not TOOL_NAME.match(name)):
            raise InvalidInputError(f"json_schema name {name!r} is not 1-64 letters, digits, "
                                    "_ or -", fix='e.g. "name": "answer"')
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidInputError("json_schema strict must be true or false",
                                    fix='e.g. "strict": true')
        return ResponseFormat.json_schema(spec.get("schema", ANY_OBJECT), strict is not False)
    raise InvalidInputError(f"unsupported response_format type {kind!r}",
                            fix='use "text", "json_object" or "json_schema"')


# -- matching ----------------------------------------------------------------------------------

_TOKENIZERS: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], Any]] = \
    weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def grammar_tokenizer(tokenizer: Any, eos_token_ids: Sequence[int]) -> Any:
    """llguidance's view of a Hugging Face fast tokenizer, built once per tokenizer and EOS set
    (about a second for a 50k vocabulary), then shared by every request."""
    if tokenizer is None:
        raise InvalidInputError("structured output needs the package's tokenizer, and this "
                                "package has none", fix="re-export the model with its tokenizer")
    eos = tuple(sorted(eos_token_ids))
    with _TOKENIZERS_LOCK:
        by_eos = _TOKENIZERS.setdefault(tokenizer, {})
        if eos not in by_eos:
            import llguidance.hf

            try:
                by_eos[eos] = llguidance.hf.from_tokenizer(tokenizer,
                                                           eos_token=list(eos) or None)
            except ValueError as exc:  # a slow tokenizer, or one without a byte decoder
                raise InvalidInputError(
                    f"structured output cannot read this package's tokenizer: {exc}",
                    fix="use a package with a fast byte-level or SentencePiece tokenizer") \
                    from None
        return by_eos[eos]


class TokenConstraint:
    """One sequence's place in its grammar: the tokens allowed next, and the tokens taken."""

    def __init__(self, response_format: ResponseFormat, tokenizer: Any,
                 eos_token_ids: Sequence[int]) -> None:
        from llguidance import LLMatcher

        self.grammar_tokenizer = grammar_tokenizer(tokenizer, eos_token_ids)
        self.matcher = LLMatcher(self.grammar_tokenizer, response_format.grammar)
        if self.matcher.is_error():
            raise InvalidInputError(f"the {response_format.kind} grammar does not work with "
                                    f"this tokenizer: {self.matcher.get_error()}",
                                    fix="simplify the grammar")
        vocab = self.grammar_tokenizer.vocab_size
        self._bits = np.zeros((vocab + 31) // 32, np.int32)
        if not self.allowed(vocab).any():
            raise InvalidInputError(
                f"no token of this tokenizer can begin the {response_format.kind}",
                fix="check the grammar against the model's vocabulary")

    def allowed(self, vocab_size: int) -> np.ndarray:
        """A ``[vocab_size]`` bool mask of the tokens the grammar takes next (end-of-sequence
        only, once it is complete); logits past the tokenizer's vocabulary are never allowed."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little").view(bool)
        if bits.size >= vocab_size:
            return bits[:vocab_size]
        return np.concatenate([bits, np.zeros(vocab_size - bits.size, bool)])

    def consume(self, token: int) -> None:
        """Advance past the sampled ``token`` (one the mask allowed)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token} that its own mask allowed: "
                               f"{self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """Nothing can follow: the grammar forces end-of-sequence."""
        return bool(self.matcher.is_stopped())
