"""A dispatch mode that counts the bytes of live tensor storages, keeps the peak, and enforces a cap.

How it counts (why: ``docs/architecture.md``, "Measuring memory"):

- Every op that runs under the mode is looked at after it ran. Outputs of ops whose schema says they
  alias an input (views, ``detach``, in-place ops) are not new memory and are skipped, with two
  exceptions: ``aten.lift_fresh`` (a constant made by ``torch.tensor`` enters the mode through it), and
  ops that *write* an aliased output (``resize_``, ``out=``), whose storage may have grown.
- A storage seen for the first time is counted with its ``nbytes`` rounded up to ``granularity_bytes``
  and watched with a weak reference; when the storage dies the reference's callback subtracts exactly
  what was added. (torch keeps a storage's Python object alive as long as its C++ storage lives, so the
  callback fires when the memory is released, not when a Python wrapper goes away.)
- Tensors that exist before the mode is entered (parameters, buffers, the batch) are counted by
  :meth:`CountingMode.register`.
- A wrapper subclass (FSDP2's ``DTensor``) holds no memory itself: its inner tensors (the local
  shard) are what is counted.
- ``UntypedStorage.resize_`` is not an op (it never reaches the dispatcher), yet FSDP2 frees and
  re-allocates every unsharded parameter with it. While a mode is entered, ``resize_`` is wrapped
  (as torch's own ``MemTracker`` does) so that a counted storage is re-charged at its new size, and
  growing past the cap raises the same out-of-memory error before the storage grows.
- When an op's new storages would take the live total past the cap, every reference the mode holds to
  the op's outputs is dropped (so they are freed at once and a handler can allocate again), and
  ``torch.OutOfMemoryError`` is raised with the CUDA caching allocator's wording, which the usual
  out-of-memory matchers (Accelerate, Lightning, torch-max-mem) recognise.
- A custom op is one dispatch: what its kernel allocates and frees inside is invisible to the mode.
  Where that transient matters (bitsandbytes' ``gemm_4bit`` dequantises a whole weight), a
  composite of visible ops can be registered with :func:`count_inside`; the mode then runs the
  composite in place of the op, under itself, so its intermediates are counted too.
- :meth:`CountingMode.recording` records, on request, the timeline of a window: every allocation's
  raw ``nbytes`` and every release, in order (:class:`probes.timeline.Timeline`). The window opens
  at :meth:`~CountingMode.reset_peak` and closes when the peak is read (:meth:`CountedMemory.peak`),
  so the timeline replays to exactly the peak the trial reports.
- Real tensors are allocated before they are counted. Where the host itself cannot allocate an op's
  output and that output would not fit under the cap either, the host's error becomes the same
  ``torch.OutOfMemoryError``; a host failure below the cap stays what it is (the host is too small
  for the cap being simulated). Simulate caps well below the host's free memory.

Only sizes are read, never data, so the same mode counts fake tensors (``FakeTensorMode``) too.
Counting is deterministic: the same program gives the same peak to the byte.
"""

from __future__ import annotations

import gc
import re
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from probes.timeline import ALLOC, LIVE_AT_START, Timeline
from probes.units import format_bytes

CUDA_ALLOCATOR_GRANULARITY_BYTES = 512
"""The CUDA caching allocator rounds every block up to a multiple of 512 bytes (``kMinBlockSize``)."""

_NEW, _VIEW, _WRITE = 0, 1, 2
_HOST_ALLOCATION_FAILED = re.compile(r"DefaultCPUAllocator: .*?you tried to allocate (\d+) bytes")
_LIFT_FRESH = torch.ops.aten.lift_fresh.default
_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter, FakeTensor})
REGISTERED = "(registered)"
"""The op name a recording gives tensors counted by :meth:`CountingMode.register`."""
RESIZED = "(UntypedStorage.resize_)"
"""The op name a recording gives a storage's resize outside the dispatcher (FSDP2's unshard, reshard)."""

_LABELS: list[str] = []
"""The labels of :func:`labelled_allocations` in force, innermost last."""


@contextmanager
def labelled_allocations(label: str) -> Iterator[None]:
    """Storages a :class:`CountingMode` counts inside are named ``label`` in its recordings.

    In place of the op that made them, and also when they are live at the start of a window: so
    a caller can find its own allocations in a timeline (DDP's Reducer, whose buckets are sized
    by the whole model: ``probes.depth``'s whole-model groups).
    """
    _LABELS.append(label)
    try:
        yield
    finally:
        _LABELS.pop()


def _op_kind(func: torch._ops.OpOverload) -> int:
    """``_VIEW`` when every output aliases an input read-only, ``_WRITE`` when one is written in place."""
    if func is _LIFT_FRESH:
        return _NEW
    returns = func._schema.returns
    aliases = [ret.alias_info for ret in returns]
    if any(info is not None and info.is_write for info in aliases):
        return _WRITE
    if returns and all(info is not None for info in aliases):
        return _VIEW
    return _NEW


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    for leaf in tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            yield from _storage_holders(leaf)


def _storage_holders(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The tensors whose storages hold ``tensor``'s memory.

    A wrapper subclass (a ``DTensor`` of FSDP2, say) has no memory of its own: its storage is a
    placeholder sized like the *global* tensor. What it holds is its inner tensors (the local
    shard), so those are what is counted.
    """
    if type(tensor) in _PLAIN:  # the common case, per op output: skip the subclass test
        if tensor.layout == torch.strided:
            yield tensor
    elif is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            inner = getattr(tensor, name)
            if isinstance(inner, torch.Tensor):
                yield from _storage_holders(inner)
    elif tensor.layout == torch.strided:
        yield tensor


_COUNTED_INSIDE: dict[torch._ops.OpOverload, Callable[..., Any]] = {}


def count_inside(op: torch._ops.OpOverload, composite: Callable[..., Any]) -> None:
    """Have every :class:`CountingMode` run ``composite`` in place of ``op``, counting its intermediates.

    ``composite`` takes the op's arguments and returns what the op returns, built from ops the mode
    sees (the op's own decomposition, as the kernel allocates it). Registering again replaces it.
    """
    _COUNTED_INSIDE[op] = composite


def out_of_memory_message(request: int, live: int, limit: int, *, device_label: str = "GPU 0") -> str:
    """The CUDA caching allocator's OOM wording, filled with the counted numbers."""
    free = max(limit - live, 0)
    return (
        f"CUDA out of memory. Tried to allocate {format_bytes(request)}. {device_label} has a total capacity "
        f"of {format_bytes(limit)} of which {format_bytes(free)} is free. Of the allocated memory "
        f"{format_bytes(live)} is allocated by PyTorch, and 0 B is reserved by PyTorch but unallocated. "
        f"(simulated: live tensor bytes counted at dispatch against a cap of {limit} bytes)"
    )


_ORIGINAL_RESIZE = torch.UntypedStorage.resize_
_RESIZE_WATCHERS: list[CountingMode] = []
"""The modes entered now: each hears of every storage resize while it is entered."""


def _watched_resize(storage: torch.UntypedStorage, size: int) -> Any:
    for mode in _RESIZE_WATCHERS:
        mode._before_resize(storage, size)
    result = _ORIGINAL_RESIZE(storage, size)
    for mode in _RESIZE_WATCHERS:
        mode._after_resize(storage)
    return result


def _watch_resizes(mode: CountingMode) -> None:
    if not _RESIZE_WATCHERS:
        torch.UntypedStorage.resize_ = _watched_resize  # type: ignore[method-assign, assignment]
    _RESIZE_WATCHERS.append(mode)


def _unwatch_resizes(mode: CountingMode) -> None:
    if mode in _RESIZE_WATCHERS:
        _RESIZE_WATCHERS.remove(mode)
    if not _RESIZE_WATCHERS:
        torch.UntypedStorage.resize_ = _ORIGINAL_RESIZE  # type: ignore[method-assign]


class TimelineRecording:
    """The allocations and releases a :class:`CountingMode` saw in one window (see ``recording``)."""

    def __init__(self, granularity_bytes: int) -> None:
        self.granularity_bytes = granularity_bytes
        self.sizes: list[int] = []
        self.events: list[int] = []
        self.ops: list[int] = []
        self.op_names: list[str] = [LIVE_AT_START]
        self._op_index: dict[object, int] = {}
        self.open = True

    def op_index(self, op: object) -> int:
        """The index of ``op``'s name (an ``OpOverload`` or a label) in :attr:`op_names`."""
        index = self._op_index.get(op)
        if index is None:
            index = self._op_index[op] = len(self.op_names)
            self.op_names.append(str(op))
        return index

    def timeline(self, batch_size: int) -> Timeline:
        """What was recorded, as the timeline of a trial at ``batch_size``."""
        return Timeline(
            batch_size=batch_size,
            granularity_bytes=self.granularity_bytes,
            sizes=tuple(self.sizes),
            events=tuple(self.events),
            ops=tuple(self.ops),
            op_names=tuple(self.op_names),
        )


class CountingMode(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves the hook untyped
    """Counts live storage bytes under the mode; raises ``torch.OutOfMemoryError`` past ``limit_bytes``.

    One instance lives as long as its device: enter it (``with mode:``) around the work to count, and
    read :attr:`live_bytes` and :attr:`peak_bytes` at any time. Storages counted once stay counted until
    they die, across entries.
    """

    def __init__(
        self,
        *,
        limit_bytes: int | None = None,
        granularity_bytes: int = CUDA_ALLOCATOR_GRANULARITY_BYTES,
        device_label: str = "GPU 0",
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if granularity_bytes < 1:
            raise ValueError("granularity_bytes must be at least 1")
        self.limit_bytes = limit_bytes
        self.granularity_bytes = granularity_bytes
        self.device_label = device_label
        self._live = 0
        self._peak = 0
        # id(storage) -> (counted bytes, weak reference whose callback un-counts them, raw nbytes,
        # index of its allocation in the active recording)
        self._counted: dict[int, tuple[int, weakref.ref[torch.UntypedStorage], int, int]] = {}
        self._kinds: dict[torch._ops.OpOverload, int] = {}
        #: id(storage) -> the label it was counted under (:func:`labelled_allocations`)
        self._labels: dict[int, str] = {}
        self._recording: TimelineRecording | None = None
        #: (live bytes, requested bytes) of the last allocation refused for the cap
        self.last_refusal: tuple[int, int] | None = None

    def __enter__(self) -> CountingMode:
        entered: CountingMode = super().__enter__()  # type: ignore[no-untyped-call]
        _watch_resizes(self)
        return entered

    def __exit__(self, *exc_info: object) -> None:
        _unwatch_resizes(self)
        super().__exit__(*exc_info)  # type: ignore[no-untyped-call]

    def _before_resize(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        entry = self._counted.get(id(storage))
        if entry is not None:
            self._check(max(self.size_of(nbytes) - entry[0], 0))

    def _after_resize(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._counted:
            self._resize(key, storage.nbytes(), RESIZED)  # raw bytes: _resize rounds, and records them

    @property
    def live_bytes(self) -> int:
        """Bytes of the storages counted and still alive."""
        return self._live

    @property
    def peak_bytes(self) -> int:
        """The largest :attr:`live_bytes` since the last :meth:`reset_peak` (or since creation)."""
        return self._peak

    @property
    def tracked_storages(self) -> int:
        return len(self._counted)

    def reset_peak(self) -> None:
        """Start a new peak from what is live now (as ``torch.cuda.reset_peak_memory_stats`` does).

        During :meth:`recording`, the timeline restarts here too: the window is the peak's.
        """
        self._peak = self._live
        if self._recording is not None:
            self._open_window(self._recording)

    @contextmanager
    def recording(self) -> Iterator[TimelineRecording]:
        """Record the allocations and releases from here (or the next :meth:`reset_peak`) on.

        The recording starts with one allocation per storage already live (their raw sizes), so
        replaying it from zero reaches the live bytes. It stops at :meth:`end_window` or on exit.
        """
        if self._recording is not None:
            raise RuntimeError("this CountingMode is already recording")
        recording = TimelineRecording(self.granularity_bytes)
        self._open_window(recording)
        self._recording = recording
        try:
            yield recording
        finally:
            recording.open = False
            self._recording = None

    def end_window(self) -> None:
        """Stop the active recording here (the peak was read: later events are not the trial's)."""
        if self._recording is not None:
            self._recording.open = False

    def _open_window(self, recording: TimelineRecording) -> None:
        recording.sizes.clear()
        recording.events.clear()
        recording.ops.clear()
        recording.open = True
        for index, (key, (size, reference, raw, _)) in enumerate(list(self._counted.items())):
            self._counted[key] = (size, reference, raw, index)
            recording.sizes.append(raw)
            recording.events.append(ALLOC)
            label = self._labels.get(key)
            recording.ops.append(0 if label is None else recording.op_index(label))

    def size_of(self, nbytes: int) -> int:
        """``nbytes`` as the counter charges it: rounded up to the granularity."""
        granularity = self.granularity_bytes
        return -(-nbytes // granularity) * granularity

    def register(self, tensors: Iterable[torch.Tensor]) -> int:
        """Count the storages of tensors made outside the mode; return the bytes newly counted.

        Raises ``torch.OutOfMemoryError`` (counting nothing) when they would not fit under the cap.
        """
        fresh: dict[int, torch.UntypedStorage] = {}
        for tensor in _tensors(list(tensors)):
            storage = tensor.untyped_storage()
            if id(storage) not in self._counted:
                fresh[id(storage)] = storage
        request = sum(self.size_of(storage.nbytes()) for storage in fresh.values())
        self._check(request)
        for storage in fresh.values():
            self._track(storage, storage.nbytes(), REGISTERED)
        return request

    def _check(self, request: int) -> None:
        if self.limit_bytes is not None and request > 0 and self._live + request > self.limit_bytes:
            self.last_refusal = (self._live, request)
            raise torch.OutOfMemoryError(
                out_of_memory_message(request, self._live, self.limit_bytes, device_label=self.device_label)
            )

    def _raise_if_over_cap(self, exc: RuntimeError) -> None:
        """A host allocation failure for a request that would not fit under the cap is a simulated OOM."""
        match = _HOST_ALLOCATION_FAILED.search(str(exc))
        if match is None or self.limit_bytes is None:
            return
        request = self.size_of(int(match.group(1)))
        if self._live + request > self.limit_bytes:
            self.last_refusal = (self._live, request)
            raise torch.OutOfMemoryError(
                out_of_memory_message(request, self._live, self.limit_bytes, device_label=self.device_label)
            ) from None

    def _track(self, storage: torch.UntypedStorage, raw: int, op: object) -> None:
        key = id(storage)
        size = self.size_of(raw)
        if _LABELS:
            op = self._labels[key] = _LABELS[-1]
        index = -1
        recording = self._recording
        if recording is not None and recording.open:
            index = len(recording.sizes)
            recording.sizes.append(raw)
            recording.events.append(ALLOC)
            recording.ops.append(recording.op_index(op))
        self._counted[key] = (size, weakref.ref(storage, self._forget(key)), raw, index)
        self._live += size
        self._peak = max(self._peak, self._live)

    def _forget(self, key: int) -> Callable[[object], None]:
        def callback(_: object) -> None:
            entry = self._counted.pop(key, None)
            self._labels.pop(key, None)
            if entry is not None:
                self._live -= entry[0]
                recording = self._recording
                if recording is not None and recording.open and entry[3] >= 0:
                    recording.events.append(entry[3])

        return callback

    def _resize(self, key: int, raw: int, func: object) -> None:
        old, reference, _, old_index = self._counted[key]
        size = self.size_of(raw)
        index = -1
        recording = self._recording
        if recording is not None and recording.open and old_index >= 0:
            index = len(recording.sizes)
            recording.sizes.append(raw)
            recording.events.append(-old_index - 2)
            recording.ops.append(recording.op_index(func))
        self._counted[key] = (size, reference, raw, index)
        self._live += size - old
        self._peak = max(self._peak, self._live)

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        composite = _COUNTED_INSIDE.get(func)
        if composite is not None:
            with self:  # the mode is off while it dispatches: back on, so the composite's ops count
                return composite(*args, **(kwargs or {}))
        try:
            out = func(*args, **(kwargs or {}))
        except RuntimeError as exc:
            self._raise_if_over_cap(exc)
            raise
        kind = self._kinds.get(func)
        if kind is None:
            kind = self._kinds[func] = _op_kind(func)
        if kind == _VIEW:
            return out
        # id(storage) -> (storage, raw nbytes)
        fresh: dict[int, tuple[torch.UntypedStorage, int]] = {}
        grown: dict[int, tuple[torch.UntypedStorage, int]] = {}
        for tensor in _tensors(out):
            storage = tensor.untyped_storage()
            key = id(storage)
            entry = self._counted.get(key)
            if entry is None:
                fresh[key] = (storage, storage.nbytes())
            elif kind == _WRITE:
                raw = storage.nbytes()
                if raw != entry[2]:
                    grown[key] = (storage, raw)
        if not fresh and not grown:
            return out
        request = sum(self.size_of(raw) for _, raw in fresh.values())
        request += sum(max(self.size_of(raw) - self._counted[key][0], 0) for key, (_, raw) in grown.items())
        if self.limit_bytes is not None and self._live + request > self.limit_bytes:
            # Drop every reference to the outputs before raising, so they are freed now: a handler that
            # allocates (logging, a smaller retry) must not meet a second OOM caused by this op.
            del out, tensor, storage, fresh, grown
            self._check(request)
        for storage, raw in fresh.values():
            self._track(storage, raw, func)
        for key, (_, raw) in grown.items():
            self._resize(key, raw, func)
        return out


class CountedMemory:
    """Peak bookkeeping of the devices whose memory is a :class:`CountingMode`'s (simulated, predict).

    There is no allocator cache to empty and no stream to wait for: the peak is the mode's, and
    releasing memory between trials is collecting the garbage that holds storages alive.
    """

    mode: CountingMode

    def needed_bytes(self, exc: BaseException) -> int | None:
        refusal = self.mode.last_refusal
        self.mode.last_refusal = None
        if refusal is None or not isinstance(exc, torch.OutOfMemoryError):
            return None
        return refusal[0] + refusal[1]

    def reset_peak(self) -> None:
        self.mode.reset_peak()

    def peak(self) -> tuple[int, int]:
        self.mode.end_window()
        peak = self.mode.peak_bytes
        return peak, peak

    def synchronize(self) -> None:
        return None

    def release(self) -> None:
        gc.collect()

    def close(self) -> None:
        return None  # nothing held beyond Python objects
