"""Every message that crosses a process boundary, and the exit codes of ``python -m probes``.

Three exchanges, each a typed message per JSON document (``docs/protocols.md`` draws them):

- **trial server**, :mod:`probes.isolate` (parent) ↔ :mod:`probes.worker` (child), one JSON
  document per pipe message: :data:`TrialServerRequest` (tag ``op``) one way,
  :data:`TrialServerReply` (tag ``reply``) the other;
- **probe child**, ``python -m probes run`` → :mod:`app.dispatch.child`: one :data:`ChildLine`
  (tag ``type``) per stdout line; the result file holds a ``ProbeResult`` or an
  :class:`ErrorDocument`; the exit status is an :class:`ExitCode`;
- **inspect server**, :mod:`app.dispatch.inspector` ↔ ``python -m probes inspect-server``: one
  :class:`InspectRequest` per stdin line, one :data:`InspectReply` (tag ``ok``) per stdout line.

Readers call the ``parse_*`` functions: one call each, and anything that is not a well-formed
message (not JSON, a missing field, an unknown tag) raises :class:`MalformedMessage` carrying the
text. This module imports no torch: the service reads these messages too.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from probes.errors import INPUT_ERRORS, ProbeError, ProbeFailed
from probes.finetuning_spec import FinetuningFacts
from probes.recipe.support import RecipeSupport
from probes.recommend import TrainingArgumentsSupport
from probes.spec import DeviceInfo, ModelFacts, ModelSpec, ProbeEvent, TrialRecord, Versions


class ExitCode(IntEnum):
    """How ``python -m probes run`` (and the ``maxbatch probe`` CLI) ended; any other status is a crash."""

    #: the result file holds a ``ProbeResult`` (the CLI printed it)
    OK = 0
    #: bad input: the request cannot be probed as written; the result file holds an ``ErrorDocument``
    INPUT = 2
    #: the probe ran and could not finish; the result file holds an ``ErrorDocument``
    FAILED = 3
    #: cancelled by SIGTERM; the result file holds an ``ErrorDocument`` with code ``cancelled``
    CANCELLED = 4


class Message(BaseModel):
    """Base of every message: immutable, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class MalformedMessage(ProbeFailed):
    """A child (or parent) sent something that is not the message the protocol expects."""

    code = "malformed-message"

    def __init__(self, what: str, text: str | bytes, problem: str) -> None:
        line = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        super().__init__(f"unreadable {what}: {problem}; it was: {line[:300]!r}")
        #: which exchange the text came from, e.g. "trial server reply"
        self.what = what
        #: the text exactly as received
        self.line = line


class ErrorInfo(Message):
    """An error reported across a boundary: the :mod:`probes.errors` code, a sentence, accepted values."""

    code: str
    message: str
    known: list[str] = Field(default_factory=list)

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        """A :class:`ProbeError` as it is; anything else as ``probe-error`` with its first line."""
        if isinstance(exc, ProbeError):
            return cls(code=exc.code, message=exc.message, known=exc.known)
        return cls(code=ProbeError.code, message=f"{type(exc).__name__}: {exc}".splitlines()[0])

    def to_exception(self, default: type[ProbeError] = ProbeFailed) -> ProbeError:
        """The matching input-error class for an input code, else ``default``, with message and known."""
        cls: type[ProbeError] = INPUT_ERRORS.get(self.code, default)
        return cls(self.message, known=list(self.known))


class ErrorDocument(Message):
    """The result file of a probe child that exited ``INPUT``, ``FAILED`` or ``CANCELLED``."""

    error: ErrorInfo


# --- trial server --------------------------------------------------------------------------------


class InfoRequest(Message):
    """Build the config and say what the device, the versions, the model and transformers are."""

    op: Literal["info"] = "info"


class TrialRequest(Message):
    """Run one trial at ``batch_size``."""

    op: Literal["trial"] = "trial"
    batch_size: int = Field(gt=0)
    accumulation_steps: int = Field(gt=0)
    optimizer_steps: int = Field(gt=0)
    #: each micro-batch's padded length (dynamic padding, ``probes.confirmation``); none: ``seq_len``
    lengths: tuple[int, ...] | None = None
    #: tests only: the trial raises the device's out-of-memory error before this micro-batch (0-based)
    oom_at_micro_step: int | None = Field(default=None, ge=0)


class CurveRequest(Message):
    """Measure the config's whole peak curve on a counting device (``probes.curve``): no model is kept."""

    op: Literal["curve"] = "curve"
    accumulation_steps: int = Field(gt=0)
    optimizer_steps: int = Field(gt=0)
    #: the request's ``max_batch_size_limit``: the bracket stays within it
    upper_limit: int | None = Field(default=None, gt=0)
    #: answer only through depth extrapolation: where it does not apply, no trial runs (``reason`` says why)
    require_depth_extrapolation: bool = False


class StopRequest(Message):
    """End the child (no reply)."""

    op: Literal["stop"] = "stop"


TrialServerRequest = Annotated[
    InfoRequest | TrialRequest | CurveRequest | StopRequest, Field(discriminator="op")
]


class InfoReply(Message):
    reply: Literal["info"] = "info"
    device: DeviceInfo
    versions: Versions
    model: ModelFacts
    training_args: TrainingArgumentsSupport
    recipe: RecipeSupport = Field(default_factory=RecipeSupport)
    #: LoRA/QLoRA requests whose method runs here: the adapters' config and the parameter counts
    finetuning: FinetuningFacts | None = None


class TrialReply(Message):
    reply: Literal["trial"] = "trial"
    trial: TrialRecord
    #: the CUDA context is unusable after this trial: the parent discards the child
    poisoned: bool = False


class CurveReply(Message):
    """The curve's answer for the child's device: a ladder bracket, or why there is none."""

    reply: Literal["curve"] = "curve"
    #: the ladder bracket for ``capacity_bytes`` (``None``: no curve, ``reason`` says why)
    max_batch_size: int | None = None
    first_failing_batch_size: int | None = None
    #: weights, gradients and optimizer state alone exceed the capacity: no trial ran
    nothing_fits: bool = False
    capacity_bytes: int | None = None
    reason: str | None = None
    #: trials run (at the base depths), wall seconds, the depths measured
    trials: int = 0
    seconds: float = 0.0
    depths: tuple[int, ...] = ()
    #: ``probes.timeline.PeakCurve.to_wire()``: any other capacity's bracket, in the parent
    curve: dict[str, Any] | None = None
    #: the trials themselves (``layers`` set where the model was cut), and the model's own depth
    trial_records: tuple[TrialRecord, ...] = ()
    layers: int | None = None

    @property
    def has_bracket(self) -> bool:
        return self.max_batch_size is not None or self.first_failing_batch_size is not None


class ErrorReply(Message):
    """The request failed (a bad config is an input error, anything else ``probe-error``)."""

    reply: Literal["error"] = "error"
    error: ErrorInfo


TrialServerReply = Annotated[InfoReply | TrialReply | CurveReply | ErrorReply, Field(discriminator="reply")]


# --- probe child ---------------------------------------------------------------------------------


class EventLine(Message):
    """Progress of the running probe."""

    type: Literal["event"] = "event"
    event: ProbeEvent


ChildLine = Annotated[EventLine, Field(discriminator="type")]
"""One stdout line of ``python -m probes run`` (a union of one kind, so that new kinds stay one parse)."""


# --- inspect server ------------------------------------------------------------------------------


class InspectRequest(Message):
    model: ModelSpec
    seq_len: int = Field(gt=0)
    allow_remote_code: bool = False


class InspectOk(Message):
    ok: Literal[True] = True
    model: ModelFacts


class InspectFailed(Message):
    ok: Literal[False] = False
    error: ErrorInfo


InspectReply = Annotated[InspectOk | InspectFailed, Field(discriminator="ok")]


# --- parsing -------------------------------------------------------------------------------------

_T = TypeVar("_T")


class Reader(Generic[_T]):
    """Parses one message of a given type from its JSON text; see the module docstring."""

    def __init__(self, message_type: Any, what: str) -> None:
        self._adapter: TypeAdapter[_T] = TypeAdapter(message_type)
        #: what the text is, for the error: "trial server reply", ...
        self.what = what

    def __call__(self, text: str | bytes) -> _T:
        try:
            return self._adapter.validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise MalformedMessage(self.what, text, f"{where + ': ' if where else ''}{first['msg']}") from exc


parse_trial_request: Reader[TrialServerRequest] = Reader(TrialServerRequest, "trial server request")
parse_trial_reply: Reader[TrialServerReply] = Reader(TrialServerReply, "trial server reply")
parse_child_line: Reader[ChildLine] = Reader(ChildLine, "probe child line")
parse_inspect_request: Reader[InspectRequest] = Reader(InspectRequest, "inspect request")
parse_inspect_reply: Reader[InspectReply] = Reader(InspectReply, "inspect server reply")
parse_error_document: Reader[ErrorDocument] = Reader(ErrorDocument, "probe child error document")
