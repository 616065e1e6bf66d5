"""The serving engine's KV store: rows that join and leave a running batch one at a time.

A running batch's cache rows are *slots*. On a ``shared_buffer`` graph (GroupQueryAttention)
:class:`SlotCache` preallocates one [slots, kv_heads, capacity, head_dim] buffer per cache
tensor on the session's device and binds its first ``rows`` slots (a contiguous view: the slot
is the leading axis) as both past and present, so the graph appends each step's keys and values
in place and inactive slots are never computed. A joining row's prefilled cache is written into
the next free slot and a leaving row's slot is overwritten by the last one: a join or leave
writes its own slots only, never the whole batch. All copies run on the device through
:class:`SlotCopier` (Slice + Pad in a tiny ONNX Runtime session), so on a GPU the cache never
travels through the host.

Graphs without a shared buffer run on :class:`PastRows`: past-sized tensors that the session
re-allocates every step anyway, joined and dropped with numpy (correct, not copy-free).

Both stores keep a row's cache right-aligned at the batch's ``width``: rows shorter than the
widest are left-padded (masked). Only the shared mode (``batch_invariant=False``) ever pads;
there a longer row joining or the longest leaving moves every row (:meth:`SlotCache.moved`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmopt.runtime.kv_cache import CopyingCache, KVLayout, KVPlacement


class SlotCopier:
    """Copies a range of cache positions of some rows into other rows, on the cache's device:
    ``y = Pad(Slice(x, [start], [stop], axes=[2]), pads)`` for every cache tensor in one run.
    Sources and destinations are bound by device pointer, so a slot of a larger buffer is a
    plain view."""

    def __init__(self, layout: KVLayout, placement: KVPlacement) -> None:
        import onnxruntime as ort

        self.layout = layout
        self.placement = placement
        self.tensors = len(layout.past_names)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers: list[Any] = ["CPUExecutionProvider"]
        if not placement.on_host:
            providers = [("CUDAExecutionProvider", {"device_id": placement.device_id})]
        self.session = ort.InferenceSession(_copy_graph(self.tensors, layout.dtype),
                                            options, providers=providers)

    def copy(self, sources: list[tuple[int, list[int]]], start: int, stop: int,
             destinations: list[tuple[int, list[int]]], before: int) -> None:
        """Positions ``[start, stop)`` of every source (``(pointer, shape)``, one per cache
        tensor) into each destination at position ``before``; the destination's other positions
        become zeros."""
        device, device_id = self.placement.device, self.placement.device_id
        binding = self.session.io_binding()
        after = destinations[0][1][2] - before - (stop - start)
        binding.bind_cpu_input("starts", np.array([start], np.int64))
        binding.bind_cpu_input("ends", np.array([stop], np.int64))
        binding.bind_cpu_input("pads", np.array([0, 0, before, 0, 0, 0, after, 0], np.int64))
        for i, ((src, src_shape), (dst, dst_shape)) in enumerate(
                zip(sources, destinations, strict=True)):
            binding.bind_input(f"x{i}", device, device_id, self.layout.dtype, src_shape, src)
            binding.bind_output(f"y{i}", device, device_id, self.layout.dtype, dst_shape, dst)
        self.session.run_with_iobinding(binding)


def _copy_graph(tensors: int, dtype: np.dtype) -> bytes:
    from onnx import TensorProto, helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    dims = ["rows", "heads", "length", "dim"]
    nodes, inputs, outputs = [], [], []
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [2])
    for i in range(tensors):
        inputs.append(helper.make_tensor_value_info(f"x{i}", elem, dims))
        outputs.append(helper.make_tensor_value_info(f"y{i}", elem, dims))
        nodes.append(helper.make_node("Slice", [f"x{i}", "starts", "ends", "axes"], [f"s{i}"]))
        nodes.append(helper.make_node("Pad", [f"s{i}", "pads"], [f"y{i}"]))
    scalars = [helper.make_tensor_value_info(name, TensorProto.INT64, [size])
               for name, size in (("starts", 1), ("ends", 1), ("pads", 8))]
    graph = helper.make_graph(nodes, "slot_copy", inputs + scalars, outputs, [axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


class SlotCache:
    """A running batch's in-place cache: ``slots`` preallocated rows of ``capacity`` positions
    per cache tensor, of which the first ``rows`` are bound (see the module docstring)."""

    in_place = True

    def __init__(self, session: Any, layout: KVLayout, slots: int, capacity: int,
                 placement: KVPlacement, copier: SlotCopier) -> None:
        import onnxruntime as ort

        self.session = session
        self.layout = layout
        self.slots = slots
        self.capacity = capacity
        self.placement = placement
        self.copier = copier
        self.rows = 0
        self.buffers = [ort.OrtValue.ortvalue_from_shape_and_type(
            layout.shape(slots, capacity), layout.dtype, placement.device, placement.device_id)
            for _ in layout.past_names]
        self._slot_bytes = int(np.prod(layout.shape(1, capacity))) * layout.dtype.itemsize
        self._binding: Any = None
        self._bound_rows = -1

    def _view(self, slot: int, rows: int) -> list[tuple[int, list[int]]]:
        """Slots ``[slot, slot + rows)`` of every buffer, as (pointer, shape)."""
        return [(int(b.data_ptr()) + slot * self._slot_bytes,
                 self.layout.shape(rows, self.capacity)) for b in self.buffers]

    # -- the KVCache protocol --------------------------------------------------------------------

    def binding(self, restart: bool, session: Any = None) -> Any:
        # decode steps only (prompts are prefilled on a copying cache): the cache's session
        if self._bound_rows != self.rows:  # rebind only when rows joined or left
            device, device_id = self.placement.device, self.placement.device_id
            self._binding = self.session.io_binding()
            self._binding.bind_output("logits", "cpu")
            for past, present, (pointer, shape) in zip(
                    self.layout.past_names, self.layout.present_names,
                    self._view(0, self.rows), strict=True):
                self._binding.bind_input(past, device, device_id, self.layout.dtype, shape,
                                         pointer)
                self._binding.bind_output(present, device, device_id, self.layout.dtype, shape,
                                          pointer)
            self._bound_rows = self.rows
        return self._binding

    def advance(self, presents: list[Any]) -> None:
        pass  # the graph wrote into the bound slots

    # -- rows joining and leaving ----------------------------------------------------------------

    def join(self, presents: list[Any], before: int) -> None:
        """Write a prefill's presents ([n, kv_heads, length, head_dim] OrtValues) into the next
        ``n`` free slots, starting at position ``before`` (left padding)."""
        shape = list(presents[0].shape())
        rows, length = shape[0], shape[2]
        if self.rows + rows > self.slots or before + length > self.capacity:
            raise ValueError(f"{rows} rows of {before + length} positions do not fit "
                             f"{self.slots - self.rows} free slots of {self.capacity}")
        sources = [(int(p.data_ptr()), list(p.shape())) for p in presents]
        self.copier.copy(sources, 0, length, self._view(self.rows, rows), before)
        self.rows += rows

    def leave(self, slot: int) -> None:
        """Free ``slot``: the last row moves into it (the caller mirrors that move)."""
        last = self.rows - 1
        if slot != last:
            self.copier.copy(self._view(last, 1), 0, self.capacity, self._view(slot, 1), 0)
        self.rows = last

    def moved(self, slots: int, capacity: int, start: int, stop: int, before: int
              ) -> SlotCache:
        """A new store of ``slots`` x ``capacity`` holding every row's positions
        ``[start, stop)`` at ``before``: a regrowth, or the shared mode's shift when a longer
        row joins (``before`` > 0) or the widest leaves (``start`` > 0)."""
        store = SlotCache(self.session, self.layout, slots, capacity, self.placement,
                          self.copier)
        if self.rows:
            self.copier.copy(self._view(0, self.rows), start, stop,
                             store._view(0, self.rows), before)
        store.rows = self.rows
        return store

    def row(self, slot: int, start: int, stop: int) -> list[np.ndarray]:
        """Positions ``[start, stop)`` of one slot, as host arrays ([1, kv_heads, stop - start,
        head_dim] per cache tensor): what the prefix cache keeps of a finished row."""
        import onnxruntime as ort

        placement, layout = self.placement, self.layout
        copies = [ort.OrtValue.ortvalue_from_shape_and_type(
            layout.shape(1, stop - start), layout.dtype, placement.device, placement.device_id)
            for _ in self.buffers]
        self.copier.copy(self._view(slot, 1), start, stop,
                         [(int(c.data_ptr()), list(c.shape())) for c in copies], 0)
        return [np.array(c.numpy()) for c in copies]  # owned: the OrtValues go away

    def arrays(self, length: int) -> list[np.ndarray]:
        """The bound rows' first ``length`` positions, as host arrays (tests, debugging)."""
        return [np.ascontiguousarray(b.numpy()[:self.rows, :, :length]) for b in self.buffers]


class PastRows:
    """The copying fallback of :class:`SlotCache` for graphs without a shared buffer: the
    batch's past-sized cache tensors, joined, dropped and shifted as host arrays."""

    in_place = False

    def __init__(self, session: Any, layout: KVLayout, placement: KVPlacement) -> None:
        self.placement = placement
        self.cache = CopyingCache(session, layout, 0, placement, past=[
            np.zeros(layout.shape(0, 0), layout.dtype) for _ in layout.past_names])

    @property
    def rows(self) -> int:
        return int(self.arrays()[0].shape[0])

    def binding(self, restart: bool, session: Any = None) -> Any:
        return self.cache.binding(restart=False, session=session)

    def advance(self, presents: list[Any]) -> None:
        self.cache.advance(presents)

    def join(self, presents: list[Any], before: int, width: int) -> None:
        """Append rows, left-padded to ``width`` positions; a wider row pads the others."""
        width = max(width, before + int(presents[0].shape()[2]))
        self.cache.past = [np.concatenate([_left_pad(a, width), _left_pad(_host(b), width)])
                           for a, b in zip(self.arrays(), presents, strict=True)]

    def leave(self, slot: int) -> None:
        keep = np.arange(self.rows)
        keep[slot] = keep[-1]
        self.cache.past = [a[keep[:-1]] for a in self.arrays()]

    def row(self, slot: int, start: int, stop: int) -> list[np.ndarray]:
        """Positions ``[start, stop)`` of one row, as host arrays (see :meth:`SlotCache.row`)."""
        return [np.ascontiguousarray(a[slot:slot + 1, :, start:stop]) for a in self.arrays()]

    def trim(self, start: int) -> None:
        """Drop the first ``start`` positions (padding in every row)."""
        self.cache.past = [np.ascontiguousarray(a[:, :, start:]) for a in self.arrays()]

    def arrays(self, length: int | None = None) -> list[np.ndarray]:
        return [a[:, :, :length] if length is not None else a for a in self.cache.arrays()]


def _host(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


def _left_pad(array: np.ndarray, width: int) -> np.ndarray:
    missing = width - array.shape[2]
    if missing <= 0:
        return array
    return np.pad(array, [(0, 0), (0, 0), (missing, 0), (0, 0)])
