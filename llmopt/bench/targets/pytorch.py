"""The baseline: the package's source model in transformers, eager PyTorch (no compilation).

Timing uses a streamer object handed to ``generate``: transformers calls ``put`` with the
prompt, then once per generated step, so each step is time-stamped as it is produced. The
length is forced (``min_new_tokens == max_new_tokens``) as llmopt's ``ignore_eos`` does.
"""

from __future__ import annotations

import time
from typing import Any

from llmopt.bench.config import PytorchOptions
from llmopt.bench.targets.base import Timing, TokenClock, timing_from_clocks
from llmopt.errors import InvalidInputError

_AUTO = {"text-generation": "AutoModelForCausalLM", "feature-extraction": "AutoModel",
         "text-classification": "AutoModelForSequenceClassification"}


class _StepClock:
    """A transformers streamer that only records when each step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class PytorchTarget:
    supports_concurrency = False

    def __init__(self, source: str, task: str, options: PytorchOptions) -> None:
        import torch
        import transformers

        from llmopt.exporter import sources

        self.name = "pytorch"
        self.options = options
        transformers.utils.logging.disable_progress_bar()  # keep the bench's progress readable
        if options.threads:
            torch.set_num_threads(options.threads)
        dtype = getattr(torch, options.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise InvalidInputError(f"unknown torch dtype {options.dtype!r}",
                                    fix="use float32, float16 or bfloat16")
        src = sources.resolve(source)
        kwargs: dict[str, Any] = {"dtype": dtype,
                                  "attn_implementation": options.attn_implementation}
        if src.gguf_file:
            kwargs["gguf_file"] = src.gguf_file
        auto = getattr(transformers, _AUTO[task])
        self.source = source
        self.model = auto.from_pretrained(src.directory, **kwargs).eval().to(options.device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            src.directory, gguf_file=src.gguf_file)
        self.pad_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id or 0
        self._torch = torch

    def info(self) -> dict[str, Any]:
        torch = self._torch
        return {"library": "torch", "source": self.source, "device": self.options.device,
                "dtype": self.options.dtype,
                "attn_implementation": self.options.attn_implementation,
                "threads": torch.get_num_threads()}

    def decode(self, prompts: list[list[int]], new_tokens: int, issued: float) -> Timing:
        torch = self._torch
        if len({len(p) for p in prompts}) != 1:
            raise InvalidInputError("the PyTorch baseline takes prompts of one length",
                                    fix="use the harness's equal-length prompts")
        ids = torch.tensor(prompts, device=self.options.device)
        clock = _StepClock()
        with torch.inference_mode():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                pad_token_id=self.pad_id, streamer=clock)
        self._sync()
        ended = time.perf_counter()
        clocks = []
        for _ in prompts:
            row = TokenClock()
            for at in clock.times:
                row.tick(at=at)
            clocks.append(row)
        return timing_from_clocks(clocks, issued, ended, sum(len(p) for p in prompts))

    def encode(self, texts: list[str], issued: float) -> Timing:
        torch = self._torch
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            self.model(**{k: v.to(self.options.device) for k, v in batch.items()})
        self._sync()
        return Timing(e2e_s=time.perf_counter() - issued, sequences=len(texts))

    def _sync(self) -> None:
        if self.options.device.startswith("cuda"):
            self._torch.cuda.synchronize()

    def memory(self) -> dict[str, Any]:
        torch = self._torch
        if self.options.device.startswith("cuda") and torch.cuda.is_available():
            peak = int(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            return {"gpu_memory_bytes": peak, "gpu_memory_scope": "torch allocator peak"}
        return {}

    def close(self) -> None:
        del self.model
