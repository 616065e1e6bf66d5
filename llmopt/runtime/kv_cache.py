"""Where a decode step's past comes from and where its present goes: the KV-cache protocol.

:meth:`llmopt.runtime.kv.DecoderModel.step` is the one decode step; it asks a :class:`KVCache`
for an IO binding with the cache inputs and outputs bound, runs the session, and hands the
outputs back. Three caches implement the protocol:

- :class:`CopyingCache`: past in, present out (past plus the new tokens), any graph;
- :class:`InPlaceCache`: a ``shared_buffer`` graph's one [batch, kv_heads, capacity, head_dim]
  buffer per cache tensor, bound as both past and present, which GroupQueryAttention updates
  in place;
- :class:`llmopt.runtime.slots.SlotCache`: the serving engine's in-place buffer whose rows
  (slots) join and leave one at a time.

Every tensor a cache allocates or binds lives on its :class:`KVPlacement` (the session's
device and device id), so on a GPU the cache never makes a round trip through the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from llmopt.runtime.session import GPU_PROVIDERS, SessionInfo

# model metadata a decoder graph sets when GroupQueryAttention's seqlens_k is each row's last
# unmasked position (llmopt.exporter.decoder_graph.kv_lengths): rows of different lengths then
# share a step without padding, each attending over its own positions only
ROW_LENGTHS = "llmopt.kv_row_lengths"


@dataclass(frozen=True)
class KVLayout:
    """The cache tensors of a decoder graph: names, and the shape [batch, kv_heads, length,
    head_dim] of each."""

    past_names: tuple[str, ...]
    present_names: tuple[str, ...]
    num_kv_heads: int
    head_dim: int
    dtype: np.dtype

    def shape(self, batch: int, length: int) -> list[int]:
        return [batch, self.num_kv_heads, length, self.head_dim]


@dataclass(frozen=True)
class KVPlacement:
    """The device that holds a session's KV cache: ``cuda`` (with its id) when the session's
    first active provider runs on a GPU, else the host."""

    device: str = "cpu"
    device_id: int = 0

    @classmethod
    def of(cls, info: SessionInfo) -> KVPlacement:
        on_gpu = bool(info.active) and info.active[0] in GPU_PROVIDERS
        return cls("cuda", info.device_id) if on_gpu else cls()

    @property
    def on_host(self) -> bool:
        return self.device == "cpu"


HOST = KVPlacement()  # the default: the cache in host memory


class KVCache(Protocol):
    """What :meth:`DecoderModel.step` needs of a cache."""

    in_place: bool
    """The graph writes the new positions into the bound buffers, so a step needs none of its
    outputs back but the logits."""

    placement: KVPlacement
    """The device of the cache, and of the session that runs on it."""

    def binding(self, restart: bool, session: Any = None) -> Any:
        """An IO binding with ``logits`` bound first and every cache input and output bound.
        ``restart``: the step runs the whole sequence, so the cache starts empty.
        ``session``: the session the step runs on, when not the cache's own (a package's
        prompt session, :attr:`DecoderModel.prompt_session`, over the same cache)."""

    def advance(self, presents: list[Any]) -> None:
        """Take the step's presents (in the order of the layout's present names)."""


class CopyingCache:
    """Past-sized cache tensors: each step's presents (past plus the new positions, allocated
    by the session on the placement's device) become the next step's past."""

    in_place = False

    def __init__(self, session: Any, layout: KVLayout, batch: int,
                 placement: KVPlacement = HOST,
                 past: list[Any] | None = None) -> None:
        self.session = session
        self.layout = layout
        self.batch = batch
        self.placement = placement
        self.past: list[Any] = self._empty() if past is None else list(past)

    def _empty(self) -> list[Any]:
        import onnxruntime as ort

        empty = np.zeros(self.layout.shape(self.batch, 0), self.layout.dtype)
        return [ort.OrtValue.ortvalue_from_numpy(empty, self.placement.device,
                                                 self.placement.device_id)
                for _ in self.layout.past_names]

    @property
    def length(self) -> int:
        """Positions cached."""
        return int(_shape(self.past[0])[2]) if self.past else 0

    def binding(self, restart: bool, session: Any = None) -> Any:
        if restart:
            self.past = self._empty()
        binding = (session or self.session).io_binding()
        binding.bind_output("logits", "cpu")
        for name, value in zip(self.layout.past_names, self.past, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.layout.present_names:
            binding.bind_output(name, self.placement.device, self.placement.device_id)
        return binding

    def advance(self, presents: list[Any]) -> None:
        self.past = list(presents)

    def arrays(self) -> list[np.ndarray]:
        """The cache as host arrays (a copy on a GPU)."""
        return [v if isinstance(v, np.ndarray) else v.numpy() for v in self.past]


class InPlaceCache:
    """The cache of a ``shared_buffer`` graph: one [batch, kv_heads, capacity, head_dim] buffer
    per cache tensor, bound once as both past and present; GroupQueryAttention writes the new
    positions into it, so a step copies nothing but its token inputs."""

    in_place = True

    def __init__(self, session: Any, layout: KVLayout, batch: int, capacity: int,
                 placement: KVPlacement = HOST) -> None:
        import onnxruntime as ort

        self.session = session
        self.layout = layout
        self.capacity = capacity
        self.placement = placement
        self.buffers = [ort.OrtValue.ortvalue_from_shape_and_type(
            layout.shape(batch, capacity), layout.dtype, placement.device, placement.device_id)
            for _ in layout.past_names]
        self._bindings: dict[int, Any] = {}  # one per session that runs on these buffers

    def binding(self, restart: bool, session: Any = None) -> Any:
        # GroupQueryAttention writes a whole sequence from position 0: nothing to reset
        session = session or self.session
        binding = self._bindings.get(id(session))
        if binding is None:
            binding = self._bindings[id(session)] = session.io_binding()
            binding.bind_output("logits", "cpu")  # first: get_outputs() keeps that order
            for past, present, buffer in zip(self.layout.past_names, self.layout.present_names,
                                             self.buffers, strict=True):
                binding.bind_ortvalue_input(past, buffer)
                binding.bind_ortvalue_output(present, buffer)
        return binding

    def advance(self, presents: list[Any]) -> None:
        pass  # the graph wrote into the bound buffers

    def arrays(self, length: int) -> list[np.ndarray]:
        """The first ``length`` positions of every cache tensor, as host arrays."""
        return [np.ascontiguousarray(b.numpy()[:, :, :length]) for b in self.buffers]

    def load(self, past: list[np.ndarray]) -> None:
        """Write ``past`` ([batch, kv_heads, positions, head_dim] per cache tensor) into the
        first positions of the buffers, in place (host buffers only): a prompt's cached prefix,
        before the rest of it runs on top."""
        if not self.placement.on_host:
            raise ValueError("only a host cache is written from numpy")
        for buffer, array in zip(self.buffers, past, strict=True):
            _host_view(buffer, self.layout.dtype)[:, :, :array.shape[2]] = array


def _host_view(value: Any, dtype: np.dtype) -> np.ndarray:
    """A writable numpy view of a host OrtValue's memory."""
    import ctypes

    shape = tuple(value.shape())
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    memory = (ctypes.c_char * size).from_address(int(value.data_ptr()))
    return np.frombuffer(memoryview(memory).cast("B"), dtype).reshape(shape)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, np.ndarray) else tuple(value.shape())
