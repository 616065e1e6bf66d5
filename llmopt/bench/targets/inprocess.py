"""llmopt in the bench process: the Generator (a request is one batched generate) or, under
concurrency, the continuous-batching Engine (a request is its prompts submitted together);
encoders through the Embedder."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from llmopt.bench.config import EngineOptions, ProviderSpec
from llmopt.bench.targets.base import StreamFanout, Timing, TokenClock, timing_from_clocks


class InProcessTarget:
    supports_concurrency = True

    def __init__(self, package: Any, provider: ProviderSpec, strict: bool,
                 engine: EngineOptions, prompt_lookup: int = 0) -> None:
        import llmopt

        self.name = "inprocess"
        self.runner: Any = llmopt.load(package, [provider.name],
                                  provider_options={provider.name: dict(provider.options)},
                                  strict=strict)
        self.tokenizer = self.runner.tokenizer
        self.provider = provider
        self.engine_options = engine
        self.prompt_lookup = prompt_lookup  # draft tokens per step (Generator points only)
        if hasattr(self.runner, "prefix_cache_bytes"):  # every round repeats its prompts
            self.runner.prefix_cache_bytes = engine.prefix_cache_bytes
        self._engine: Any = None
        self._fanout: StreamFanout | None = None
        self._use_engine = False

    def info(self) -> dict[str, Any]:
        return {"library": "onnxruntime", "session": self.runner.session_info.as_dict(),
                "requested_options": dict(self.provider.options),
                "engine": asdict(self.engine_options) if self._engine else None}

    def uses_engine(self, concurrency: int, rate: float | None) -> bool:
        """Decoders only: concurrent encoder requests call the Embedder from their threads."""
        if not hasattr(self.runner, "generate"):
            return False
        use = self.engine_options.use
        return use == "always" or (use == "auto" and (concurrency > 1 or rate is not None))

    def prepare(self, concurrency: int, rate: float | None, batch_size: int) -> None:
        """Start the engine before the first point that needs it."""
        if self.uses_engine(concurrency, rate) and self._engine is None:
            from llmopt.runtime.engine import Engine, EngineConfig

            config = EngineConfig(max_batch_size=self.engine_options.max_batch_size,
                                  max_queue=4096,
                                  max_prefill_batch=self.engine_options.max_prefill_batch,
                                  prefix_cache_bytes=self.engine_options.prefix_cache_bytes)
            self._engine = Engine(self.runner, config).start()
            self._fanout = StreamFanout()
        self._use_engine = self.uses_engine(concurrency, rate)

    def decode(self, prompts: list[list[int]], new_tokens: int, issued: float) -> Timing:
        from llmopt.runtime.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True,
                                prompt_lookup=self.prompt_lookup)
        if self._use_engine:
            return self._decode_engine(prompts, params, issued)
        return self._decode_generator(prompts, params, issued)

    def _decode_generator(self, prompts: list[list[int]], params: Any, issued: float) -> Timing:
        # The Generator's step loop (the same one generate_batch drives) yields once per
        # forward pass, so each token of every row is time-stamped when it is chosen.
        gen = self.runner
        run = gen._run(prompts, [params] * len(prompts), issued, None)
        clocks = [TokenClock() for _ in prompts]
        ticked = [0] * len(prompts)
        while True:
            try:
                counts = next(run)  # a step that confirmed drafts made several tokens at once
            except StopIteration:
                break
            at = time.perf_counter()
            for row, count in enumerate(counts):
                for _ in range(count - ticked[row]):
                    clocks[row].tick(at=at)
                ticked[row] = count
        ended = time.perf_counter()
        return timing_from_clocks(clocks, issued, ended, sum(len(p) for p in prompts))

    def _decode_engine(self, prompts: list[list[int]], params: Any, issued: float) -> Timing:
        engine = self._engine

        def open_stream(prompt: list[int], clock: TokenClock) -> None:
            request = engine.submit(prompt, params)
            for _ in request:
                clock.tick()
            generated = request.result().stats.generated_tokens
            clock.tokens = generated  # a delta may carry more than one token

        assert self._fanout is not None
        return self._fanout.run(open_stream, prompts, issued)

    def encode(self, texts: list[str], issued: float) -> Timing:
        self.runner.embed(texts)
        ended = time.perf_counter()
        return Timing(e2e_s=ended - issued, sequences=len(texts))

    def memory(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close(grace=5)
        if self._fanout is not None:
            self._fanout.close()
