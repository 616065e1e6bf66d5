"""Loaded models: a decoder behind one continuous-batching Engine, or an encoder behind its
Embedder with a bounded number of concurrent session runs and a bounded wait queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from llmopt.errors import BusyError, InvalidInputError
from llmopt.package import Package
from llmopt.runtime.embedder import Embedder, pool
from llmopt.runtime.engine import Engine, EngineConfig, Request
from llmopt.runtime.generator import Generator, Prompt
from llmopt.runtime.sampling import SamplingParams
from llmopt.server.config import ModelConfig
from llmopt.server.deadline import finite
from llmopt.server.status import DeadlineExceededError, RequestTooLargeError


class ServedModel:
    """What every served model has: its package, config and session facts."""

    kind = ""

    def __init__(self, name: str, package: Package, runner: Any, config: ModelConfig) -> None:
        self.name = name
        self.package = package
        self.runner = runner
        self.config = config
        self.session_info = runner.session_info

    @property
    def tokenizer(self) -> Any:
        return self.runner.tokenizer

    def queue_depth(self) -> int:
        return 0

    def batch_size(self) -> int:
        return 0

    def kv_cache_bytes(self) -> int:
        return 0

    def warmup(self) -> None:
        raise NotImplementedError

    def close(self, grace: float | None = None) -> None:
        """Stop taking requests; give running ones ``grace`` seconds."""


class Decoder(ServedModel):
    kind = "decoder"

    def __init__(self, name: str, package: Package, runner: Generator,
                 config: ModelConfig) -> None:
        super().__init__(name, package, runner, config)
        self.generator = runner
        self.engine = Engine(runner, EngineConfig(
            max_batch_size=config.max_batch_size, max_queue=config.max_queue,
            kv_budget_bytes=config.kv_budget_bytes, max_prefill_batch=config.max_prefill_batch,
            prefill_chunk=config.prefill_chunk, max_prompt_tokens=config.max_prompt_tokens,
            batch_invariant=config.batch_invariant, prefix_cache_bytes=config.prefix_cache_bytes,
            prompt_lookup=config.prompt_lookup,
        )).start()

    @property
    def context_length(self) -> int:
        return self.generator.context_length

    def submit(self, prompt: Prompt, params: SamplingParams, *, chat: bool = False,
               timeout: float | None = None) -> Request:
        self.generator.check_params(params)
        return self.engine.submit(prompt, params, chat=chat, timeout=timeout)

    def tokenize(self, prompt: Prompt, chat: bool = False) -> tuple[list[int], list[str]]:
        ids = self.generator.encode(prompt, chat=chat)
        if self.tokenizer is None:  # a package without a tokenizer takes token ids only
            return ids, []
        return ids, list(self.tokenizer.convert_ids_to_tokens(ids))

    def queue_depth(self) -> int:
        return self.engine.queue_depth

    def batch_size(self) -> int:
        return self.engine.batch_size

    def kv_cache_bytes(self) -> int:
        return self.engine.kv_bytes

    def warmup(self) -> None:
        prompt = [0, 0] if self.tokenizer is None else "Hello"  # packages may lack a tokenizer
        request = self.submit(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True))
        request.result(timeout=300)

    def close(self, grace: float | None = None) -> None:
        self.engine.close(grace)


class Encoder(ServedModel):
    kind = "encoder"

    def __init__(self, name: str, package: Package, runner: Embedder,
                 config: ModelConfig) -> None:
        super().__init__(name, package, runner, config)
        self.embedder = runner
        self.inputs = list(runner.inputs)
        self.outputs = [o.name for o in runner.session.get_outputs()]
        self.max_length = runner.max_length
        self.bounds = gather_bounds(package.model_path, self.inputs)
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not thread-safe
        self._slots = threading.BoundedSemaphore(config.max_concurrency)
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._closed = False

    def queue_depth(self) -> int:
        return self._waiting

    def batch_size(self) -> int:
        return self._running

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        if len(texts) > self.config.max_batch_size:
            raise RequestTooLargeError(
                f"{len(texts)} texts in one request; this model takes at most "
                f"{self.config.max_batch_size}", fix="split the texts over several requests")
        with self._tokenizer_lock:
            return self.embedder.tokenize(texts)

    def embed(self, texts: Sequence[str], normalize: bool | None = None,
              timeout: float | None = None) -> tuple[np.ndarray, int]:
        """Pooled embeddings (as :meth:`Embedder.embed`) and the number of real tokens."""
        if self.embedder.output != "last_hidden_state":
            raise InvalidInputError(f"model {self.name!r} is a text-classification package",
                                    fix="call ModelInfer for its logits, or serve a "
                                    "feature-extraction package")
        feed = self.encode(texts)
        (hidden,) = self.run(feed, [self.embedder.output], timeout)
        mask = feed["attention_mask"]
        pooled = pool(hidden, mask, self.embedder.pooling)
        if self.embedder.normalize if normalize is None else normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled.astype(np.float32), int(mask.sum())

    def tokenize(self, text: str) -> tuple[list[int], list[str]]:
        if not isinstance(text, str) or not text:
            raise InvalidInputError("the text is empty", fix="pass some text")
        if self.tokenizer is None:
            raise InvalidInputError(f"model {self.name!r} has no tokenizer",
                                    fix="send token ids through ModelInfer")
        with self._tokenizer_lock:
            ids = list(self.tokenizer(text, truncation=True, max_length=self.max_length)[
                "input_ids"])
            return ids, list(self.tokenizer.convert_ids_to_tokens(ids))

    def run(self, feed: dict[str, np.ndarray], outputs: list[str],
            timeout: float | None = None) -> list[np.ndarray]:
        """One session run within the concurrency limit; ``feed`` must be validated."""
        with self._slot(timeout):
            try:
                return list(self.embedder.session.run(outputs, feed))
            except Exception as exc:  # onnxruntime's own types; bounds it checks, we missed
                if type(exc).__name__ in ("InvalidArgument", "InvalidGraph", "Fail"):
                    raise InvalidInputError(f"onnxruntime rejected the inputs: {exc}",
                                            fix="check the token ids and shapes") from None
                raise

    def check_feed(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate named int64 tensors against the model; fill the optional ones."""
        unknown = set(tensors) - set(self.inputs)
        if unknown:
            raise InvalidInputError(f"unknown input(s) {sorted(unknown)} for model {self.name!r}",
                                    fix=f"its inputs are {', '.join(self.inputs)}")
        if "input_ids" not in tensors:
            raise InvalidInputError("the input_ids tensor is missing",
                                    fix="send input_ids as INT64 [batch, sequence]")
        ids = tensors["input_ids"]
        for name, array in tensors.items():
            if array.dtype != np.int64:
                raise InvalidInputError(f"input {name} must be INT64", fix="send INT64 data")
            if array.ndim != 2 or array.shape != ids.shape or 0 in array.shape:
                raise InvalidInputError(
                    f"input {name} has shape {list(array.shape)}; every input must be "
                    f"[batch, sequence], non-empty, and all of one shape",
                    fix=f"send every input as {_shape_example(ids.shape)}")
        batch, length = ids.shape
        if batch > self.config.max_batch_size:
            raise RequestTooLargeError(f"batch of {batch}; this model takes at most "
                                       f"{self.config.max_batch_size}", fix="send smaller batches")
        if length > self.max_length:
            raise InvalidInputError(f"sequence of {length} tokens; the model's context is "
                                    f"{self.max_length}", fix="truncate the sequences")
        feed = dict(tensors)
        feed.setdefault("attention_mask", np.ones_like(ids))
        if "token_type_ids" in self.inputs:
            feed.setdefault("token_type_ids", np.zeros_like(ids))
        if not np.isin(feed["attention_mask"], (0, 1)).all():
            raise InvalidInputError("attention_mask holds values other than 0 and 1",
                                    fix="1 for real tokens, 0 for padding")
        for name in ("input_ids", "token_type_ids"):
            if name in feed:
                bound = self.bounds.get(name)
                values = feed[name]
                if values.min() < 0 or (bound is not None and values.max() >= bound):
                    raise InvalidInputError(
                        f"{name} holds values outside 0..{bound - 1 if bound else 'max'}",
                        fix="use ids from this model's tokenizer")
        return feed

    def warmup(self) -> None:
        feed = self.check_feed({"input_ids": np.ones((1, 4), np.int64)})
        self.run(feed, self.outputs)

    def close(self, grace: float | None = None) -> None:
        with self._lock:
            self._closed = True
        deadline = time.monotonic() + (grace or 0.0)
        while self._running and time.monotonic() < deadline:
            time.sleep(0.01)

    @contextmanager
    def _slot(self, timeout: float | None) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise BusyError(f"model {self.name!r} is being unloaded", fix="retry later")
            if self._waiting >= self.config.max_queue:
                raise BusyError(f"model {self.name!r} has {self._waiting} requests waiting "
                                f"(max_queue {self.config.max_queue})",
                                fix="retry later, or raise max_queue / max_concurrency")
            self._waiting += 1
        try:
            acquired = self._slots.acquire(timeout=finite(timeout))
        finally:
            with self._lock:
                self._waiting -= 1
        if not acquired:
            raise DeadlineExceededError("the deadline passed while waiting for a free session",
                                        fix="raise the deadline or max_concurrency")
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
            self._slots.release()


def load_model(name: str, directory: Path, config: ModelConfig) -> ServedModel:
    """Open the package, create its session and wrap it; warm it up if configured."""
    import llmopt

    package = Package.open(directory)
    runner = llmopt.load(package, list(config.providers),
                         provider_options=dict(config.provider_options) or None,
                         strict=config.strict_providers)
    model: ServedModel
    if isinstance(runner, Generator):
        model = Decoder(name, package, runner, config)
    else:
        model = Encoder(name, package, runner, config)
    if config.warmup:
        try:
            model.warmup()
        except BaseException:
            model.close(0)
            raise
    return model


def _shape_example(shape: tuple[int, ...]) -> str:
    """input_ids' own shape where it is a valid one, else a valid example."""
    if len(shape) == 2 and 0 not in shape:
        return str(list(shape))
    return "[batch, sequence] with both >= 1, e.g. [1, 8]"


def gather_bounds(model_path: Path, inputs: Sequence[str]) -> dict[str, int]:
    """Rows of the embedding tables the graph gathers each id input from, so out-of-range ids
    are refused with a clear message before onnxruntime sees them."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    rows = {init.name: int(init.dims[0]) for init in graph.initializer if init.dims}
    bounds: dict[str, int] = {}
    for node in graph.node:
        if (node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in inputs
                and node.input[0] in rows):
            bounds[node.input[1]] = rows[node.input[0]]
    return bounds
