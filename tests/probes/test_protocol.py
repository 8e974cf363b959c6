"""The process protocols: every message round-trips, and every reader turns a malformed line into
:class:`probes.protocol.MalformedMessage` (carrying the line), never a ``KeyError``."""

from __future__ import annotations

import io
import logging
import threading
from multiprocessing import Pipe
from pathlib import Path

import pytest

from probes.__main__ import _inspect_server
from probes.errors import ProbeFailed, ProbeInputError, SequenceTooLong
from probes.isolate import ChildDied, curve_from_reply, info_from_reply, trial_child, trial_from_reply
from probes.protocol import (
    CurveReply,
    CurveRequest,
    ErrorDocument,
    ErrorInfo,
    ErrorReply,
    EventLine,
    ExitCode,
    InfoReply,
    InfoRequest,
    InspectFailed,
    InspectOk,
    InspectRequest,
    MalformedMessage,
    StopRequest,
    TrialReply,
    TrialRequest,
    parse_child_line,
    parse_error_document,
    parse_inspect_reply,
    parse_inspect_request,
    parse_trial_reply,
    parse_trial_request,
)
from probes.recommend import TrainingArgumentsSupport
from probes.spec import (
    ConfigTask,
    DeviceInfo,
    EventKind,
    ModelFacts,
    ModelSpec,
    Outcome,
    Precision,
    ProbeEvent,
    TrialRecord,
    Versions,
)

MiB = 2**20
FACTS = ModelFacts(
    model_type="gpt2", architecture_class="GPT2LMHeadModel", parameter_count=1, max_positions=8, vocab_size=9
)
TRIAL = TrialRecord(batch_size=4, outcome=Outcome.FIT, peak_allocated_bytes=123, optimizer_steps=2)
EVENT = ProbeEvent(
    kind=EventKind.TRIAL,
    precision=Precision.FP32,
    gradient_checkpointing=False,
    config_index=0,
    config_count=1,
    trial=TRIAL,
    phase="search",
)
INFO = InfoReply(
    device=DeviceInfo(kind="simulated", name="s", total_memory_bytes=MiB, bf16_supported=True),
    versions=Versions(maxbatch="0", python="3"),
    model=FACTS,
    training_args=TrainingArgumentsSupport(
        transformers_version="5.0",
        has_activation_checkpointing=False,
        has_warmup_ratio=True,
        warmup_steps_accepts_ratio=False,
    ),
)

MALFORMED = [
    "",
    "not json",
    "{",
    "[1, 2]",
    "null",
    "{}",
    '{"op": "dance"}',
    '{"reply": "dance"}',
    '{"type": "something-new", "x": 1}',
    '{"type": "event", "event": {"kind": "nonsense"}}',
    '{"ok": "maybe"}',
    '{"ok": true}',
    '{"ok": false, "error": {"message": "no code"}}',
    '{"error": "a string"}',
    '{"op": "trial", "batch_size": "lots", "accumulation_steps": 2, "optimizer_steps": 2}',
    '{"op": "trial", "batch_size": 0, "accumulation_steps": 2, "optimizer_steps": 2}',
    '{"reply": "trial", "trial": {"batch_size": 1}}',
]

READERS = [
    parse_trial_request,
    parse_trial_reply,
    parse_child_line,
    parse_inspect_request,
    parse_inspect_reply,
    parse_error_document,
]


def test_exit_codes_keep_their_numbers() -> None:
    assert [int(c) for c in ExitCode] == [0, 2, 3, 4]


@pytest.mark.parametrize(
    ("message", "parse"),
    [
        (InfoRequest(), parse_trial_request),
        (TrialRequest(batch_size=8, accumulation_steps=2, optimizer_steps=4), parse_trial_request),
        (
            TrialRequest(batch_size=8, accumulation_steps=2, optimizer_steps=2, lengths=(64, 64, 16, 64)),
            parse_trial_request,
        ),
        (CurveRequest(accumulation_steps=2, optimizer_steps=2, upper_limit=64), parse_trial_request),
        (
            CurveReply(
                max_batch_size=8,
                first_failing_batch_size=16,
                capacity_bytes=64 * MiB,
                trials=6,
                seconds=1.5,
                depths=(3, 4, 5),
                curve={"affine": {"packed": "eJw"}, "peak_at_one": None},
            ),
            parse_trial_reply,
        ),
        (CurveReply(nothing_fits=True, first_failing_batch_size=1, reason="too big"), parse_trial_reply),
        (StopRequest(), parse_trial_request),
        (INFO, parse_trial_reply),
        (TrialReply(trial=TRIAL, poisoned=True), parse_trial_reply),
        (ErrorReply(error=ErrorInfo(code="unknown-gpu", message="no", known=["A100"])), parse_trial_reply),
        (EventLine(event=EVENT), parse_child_line),
        (InspectRequest(model=ModelSpec(architecture="gpt2"), seq_len=16), parse_inspect_request),
        (InspectOk(model=FACTS), parse_inspect_reply),
        (InspectFailed(error=ErrorInfo(code="model-not-found", message="gone")), parse_inspect_reply),
        (
            ErrorDocument(error=ErrorInfo(code="probe-failed", message="every trial crashed")),
            parse_error_document,
        ),
    ],
)
def test_every_message_round_trips_as_one_json_line(message: object, parse: object) -> None:
    assert callable(parse)
    text = message.model_dump_json()  # type: ignore[attr-defined]
    assert "\n" not in text
    assert parse(text) == message
    assert parse(text.encode()) == message


@pytest.mark.parametrize("parse", READERS, ids=lambda reader: reader.what)
@pytest.mark.parametrize("line", MALFORMED)
def test_a_malformed_line_is_a_typed_error_that_carries_it(parse: object, line: str) -> None:
    assert callable(parse)
    with pytest.raises(MalformedMessage) as raised:
        parse(line)
    assert raised.value.line == line
    assert raised.value.code == "malformed-message"
    assert isinstance(raised.value, ProbeFailed)
    assert repr(line[:300]) in raised.value.message


def test_the_wire_format_is_unchanged_where_the_service_reads_it() -> None:
    """The tags the parent and the child agreed on before the typed module keep their spelling."""
    assert EventLine(event=EVENT).model_dump(mode="json")["type"] == "event"
    assert InspectOk(model=FACTS).model_dump(mode="json") == {"ok": True, "model": FACTS.model_dump()}
    assert parse_error_document('{"error": {"code": "x", "message": "y"}}').error.known == []


def test_error_info_maps_codes_to_the_engine_errors() -> None:
    error = ErrorInfo.from_exception(SequenceTooLong("too long", known=["1024"]))
    assert error == ErrorInfo(code="sequence-too-long", message="too long", known=["1024"])
    raised = error.to_exception()
    assert type(raised) is SequenceTooLong
    assert raised.known == ["1024"]
    assert type(ErrorInfo(code="probe-failed", message="m").to_exception()) is ProbeFailed
    assert type(ErrorInfo(code="new-code", message="m").to_exception(ProbeInputError)) is ProbeInputError
    other = ErrorInfo.from_exception(KeyError("batch_size"))
    assert other == ErrorInfo(code="probe-error", message="KeyError: 'batch_size'")


def test_replies_become_trials_or_errors() -> None:
    assert trial_from_reply(4, TrialReply(trial=TRIAL)) == (TRIAL, False)
    assert trial_from_reply(4, TrialReply(trial=TRIAL, poisoned=True)) == (TRIAL, True)
    failed, discard = trial_from_reply(4, ErrorReply(error=ErrorInfo(code="probe-error", message="boom")))
    assert (failed.outcome, failed.message, discard) == (Outcome.ERROR, "boom", True)
    died, _ = trial_from_reply(4, ChildDied(Outcome.CRASH, "killed by SIGKILL"))
    assert died.outcome is Outcome.CRASH
    assert info_from_reply(INFO) == INFO
    with pytest.raises(SequenceTooLong, match="long"):
        info_from_reply(ErrorReply(error=ErrorInfo(code="sequence-too-long", message="long")))
    with pytest.raises(ProbeFailed, match="crash: gone"):
        info_from_reply(ChildDied(Outcome.CRASH, "gone"))


# --- each reader, fed malformed lines ----------------------------------------------------------


def test_the_inspect_server_answers_every_malformed_request() -> None:
    lines = [
        "not json\n",
        "[1]\n",
        '{"seq_len": 8}\n',
        '{"model": {"architecture": "gpt2"}, "seq_len": -1}\n',
    ]
    stdout = io.StringIO()
    assert _inspect_server(io.StringIO("".join(lines) + "\n"), stdout) == ExitCode.OK
    replies = [parse_inspect_reply(line) for line in stdout.getvalue().splitlines()]
    assert len(replies) == len(lines)
    for reply in replies:
        assert isinstance(reply, InspectFailed)
        assert reply.error.code == "invalid-probe"
        assert "unreadable inspect request" in reply.error.message


def test_the_event_reader_logs_malformed_lines_and_keeps_reading(caplog: pytest.LogCaptureFixture) -> None:
    from app.dispatch.child import _EventReader

    seen: list[ProbeEvent] = []
    good = EventLine(event=EVENT).model_dump_json()
    stream = [f"{line}\n".encode() for line in ("chatter from a library", *MALFORMED[2:], good)]
    with caplog.at_level(logging.INFO, logger="maxbatch.dispatch"):
        reader = _EventReader(stream, "job1", seen.append)
        reader.run()
    assert seen == [EVENT]
    assert "child said: chatter from a library" in caplog.text
    assert "unreadable probe child line" in caplog.text
    assert '{"type": "something-new", "x": 1}' in caplog.text


@pytest.mark.parametrize("text", ["", "not json", '{"error": {"code": "x"}}', '{"result": 1}'])
def test_an_unreadable_error_document_is_a_crash_with_the_stderr_tail(tmp_path: Path, text: str) -> None:
    from app.dispatch.base import RunStatus
    from app.dispatch.child import _classify

    result, stderr = tmp_path / "result.json", tmp_path / "stderr.log"
    result.write_text(text)
    stderr.write_text("Traceback: the last words\n")
    outcome = _classify(ExitCode.FAILED, result, stderr)
    assert outcome.status is RunStatus.CRASH
    assert "the last words" in (outcome.message or "")


def test_a_readable_error_document_is_the_jobs_error(tmp_path: Path) -> None:
    from app.dispatch.base import RunStatus
    from app.dispatch.child import _classify

    result = tmp_path / "result.json"
    result.write_text(
        ErrorDocument(error=ErrorInfo(code="unknown-gpu", message="m", known=["T4"])).model_dump_json()
    )
    outcome = _classify(ExitCode.INPUT, result, tmp_path / "stderr.log")
    assert (outcome.status, outcome.code, outcome.message, outcome.known) == (
        RunStatus.INPUT_ERROR,
        "unknown-gpu",
        "m",
        ("T4",),
    )


@pytest.mark.parametrize("line", MALFORMED)
def test_the_inspector_turns_a_malformed_reply_into_503_with_the_line(line: str) -> None:
    from app.dispatch.inspector import ModelInspector
    from app.errors import ServiceUnavailable

    with pytest.raises(ServiceUnavailable, match="unreadable inspect server reply") as raised:
        ModelInspector._answer(line)
    assert repr(line[:300])[1:-1] in str(raised.value.detail)


def test_the_inspector_raises_the_engines_input_error() -> None:
    from app.dispatch.inspector import ModelInspector

    reply = InspectFailed(error=ErrorInfo(code="unknown-architecture", message="nope", known=["gpt2"]))
    with pytest.raises(ProbeInputError, match="nope") as raised:
        ModelInspector._answer(reply.model_dump_json())
    assert raised.value.code == "unknown-architecture"
    assert raised.value.known == ["gpt2"]


def _task() -> ConfigTask:
    return ConfigTask(
        model=ModelSpec(
            architecture="gpt2", config={"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 100}
        ),
        seq_len=16,
        precision=Precision.FP32,
        gradient_checkpointing=False,
        device="simulated",
        memory_limit_bytes=64 * MiB,
    )


def test_the_trial_server_answers_a_malformed_request_with_an_error_reply() -> None:
    with trial_child(_task()) as child:
        conn = child._conn  # the raw pipe: a request the typed API cannot send
        for raw in (b"not json", b'{"op": "dance"}', b'{"op": "trial", "batch_size": 1}'):
            conn.send_bytes(raw)
            assert conn.poll(120)
            reply = parse_trial_reply(conn.recv_bytes())
            assert isinstance(reply, ErrorReply)
            assert reply.error.code == "malformed-message"
            assert raw.decode() in reply.error.message
        served = child.request(InfoRequest(), timeout_seconds=120)
        assert isinstance(served, InfoReply)  # the child survived every bad request


def test_a_malformed_trial_reply_is_raised_with_the_line_and_the_child_is_ended() -> None:
    with trial_child(_task()) as child:
        ours, theirs = Pipe()
        real, child._conn = child._conn, ours

        def answer_badly() -> None:
            theirs.recv_bytes()
            theirs.send_bytes(b'{"reply": "trial", "trial": {"batch_size": 1}}')

        thread = threading.Thread(target=answer_badly)
        thread.start()
        with pytest.raises(MalformedMessage, match="trial server reply") as raised:
            child.request(
                TrialRequest(batch_size=1, accumulation_steps=2, optimizer_steps=2), timeout_seconds=60
            )
        thread.join()
        assert raised.value.line == '{"reply": "trial", "trial": {"batch_size": 1}}'
        assert child.spent
        real.close()
        theirs.close()


def test_a_curve_request_that_died_or_failed_is_a_curve_without_a_bracket() -> None:
    died = curve_from_reply(ChildDied(Outcome.CRASH, "killed by SIGKILL"))
    assert died.reason == "crash: killed by SIGKILL"
    assert not died.has_bracket
    failed = curve_from_reply(ErrorReply(error=ErrorInfo(code="probe-error", message="boom")))
    assert failed.reason == "boom"
    assert "trial" in (curve_from_reply(TrialReply(trial=TRIAL)).reason or "")
    assert curve_from_reply(CurveReply(max_batch_size=1, first_failing_batch_size=2)).has_bracket
