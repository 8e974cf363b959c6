"""The Ray dispatcher: each probe job is a Ray actor on a node of the kind of GPU it asks for.

Placement (docs/fleet.md has the operator's side):

- ``device: gpu`` with ``gpu_type`` → an actor with ``num_gpus=1`` and the custom resource that
  marks the kind: ``accelerator_type:<MODEL>`` (Ray sets it on every NVIDIA node: ``H100``,
  ``A100``) for a bare model, ``accelerator_type:<MODEL>-<N>G`` for a sized name — Ray's own
  convention for telling A100-40G from A100-80G, which the operator adds to a node
  (``ray start --resources='{"accelerator_type:A100-80G": 1}'``). The child runs on ``cuda:0``,
  the GPU Ray gave the actor.
- ``simulated`` and ``predict`` → an actor with ``MAXBATCH_RAY_PROBE_CPUS`` CPUs anywhere (on a node
  of ``gpu_type`` when the request names one); many run at once across the cluster.

The service runs one thread per job. It creates the actor and waits for Ray to place it: the
job stays ``queued`` with a ``queued_reason`` until then, and fails with ``queue-timeout`` past
the queue deadline. Then it long-polls the actor for the child's events, passes them to the
sink as they come, and reports the outcome. A worker or node that dies mid-probe is ``lost``
(the job service re-queues the job once); what the dead worker left on its node is killed by
a small task pinned to that node. Actors belong to the service's Ray driver: when the service
dies, Ray ends them, and the next start kills what they left and re-queues their jobs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.dispatch.base import (
    CancelResult,
    Dispatcher,
    DispatchJob,
    JobSink,
    Placement,
    RunOutcome,
    RunStatus,
)
from app.dispatch.child import kill_leftovers
from app.dispatch.fleet import GpuKind, fleet_spelling, known_names, matching
from app.dispatch.ray_runner import RUNNER_THREADS, PollReply, ProbeRunner
from app.errors import GpuTypeUnavailable, InvalidRequest
from probes.errors import UnknownGpu
from probes.gpu_types import GpuType, parse_gpu_type
from probes.gpus import lookup_gpu
from probes.hostmem import HostMemoryPolicy
from probes.spec import FLEET_DEVICE, ProbeEvent, ProbeSpec

log = logging.getLogger("maxbatch.dispatch.ray")

RESOURCE_PREFIX = "accelerator_type:"
"""Ray's resource for a node's accelerator type (``accelerator_type:H100``), 1 per node."""
MARKER_AMOUNT = 0.001
"""How much of the type resource an actor asks for (as Ray's own ``accelerator_type=`` option does)."""
POLL_SECONDS = 1.0
REASON_EVERY_SECONDS = 5.0
NODES_TTL_SECONDS = 2.0
STOP_GRACE_SECONDS = 20.0
CLEANUP_SECONDS = 15.0


class RayUnavailable(RuntimeError):
    """The Ray dispatcher was asked for and Ray is not installed, or the cluster cannot be reached."""


def import_ray() -> Any:
    """The ``ray`` module; :class:`RayUnavailable` says how to install it when it is missing."""
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable(
            f"MAXBATCH_DISPATCHER=ray needs Ray on the service's machine: pip install 'maxbatch[ray]' ({exc})"
        ) from exc
    return ray


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """An alive Ray node as the dispatcher sees it."""

    id: str
    kind: GpuType | None
    #: the ``accelerator_type:…`` resource that marks ``kind`` (the sized one when there is one)
    resource: str | None
    gpus: int
    free_gpus: int | None


def read_node(node_id: str, resources: dict[str, float], available: dict[str, float] | None) -> ClusterNode:
    """A node's kind from its ``accelerator_type:…`` resources (a sized one wins over the bare model)."""
    marked: list[tuple[GpuType, str]] = []
    for key in resources:
        if key.startswith(RESOURCE_PREFIX):
            try:
                marked.append((parse_gpu_type(key.removeprefix(RESOURCE_PREFIX)), key))
            except ValueError:
                continue
    marked.sort(key=lambda pair: pair[0].memory_gb is None)
    kind, resource = marked[0] if marked else (None, None)
    return ClusterNode(
        id=node_id,
        kind=kind,
        resource=resource,
        gpus=int(resources.get("GPU", 0)),
        free_gpus=int(available.get("GPU", 0)) if available is not None else None,
    )


def kinds_of(nodes: list[ClusterNode]) -> list[GpuKind]:
    """The cluster's nodes grouped by kind, with GPU totals and free counts."""
    groups: dict[str, list[ClusterNode]] = {}
    for node in nodes:
        if node.kind is not None:
            groups.setdefault(node.kind.name, []).append(node)
    kinds = []
    for name, members in sorted(groups.items()):
        free = [n.free_gpus for n in members]
        try:
            memory: int | None = lookup_gpu(name).memory_bytes
        except UnknownGpu:
            memory = None
        kind = members[0].kind
        assert kind is not None
        kinds.append(
            GpuKind(
                type=kind,
                total=sum(n.gpus for n in members),
                free=None if None in free else sum(f or 0 for f in free),
                nodes=len(members),
                memory_bytes=memory,
            )
        )
    return kinds


def _summary(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2])[:400] or type(exc).__name__


@dataclass
class _Remote:
    """One job the dispatcher holds: waiting for Ray to place its actor, or running there."""

    job: DispatchJob
    spec: ProbeSpec
    thread: threading.Thread | None = None
    actor: Any = None
    placed: bool = False
    dequeued: bool = False
    stop_sent: bool = False
    node_id: str | None = None
    pid: int | None = None


@dataclass
class _Seen:
    """How far the service has followed one job's actor."""

    cursor: int = 0
    know_started: bool = False
    queued_at: float = field(default_factory=time.monotonic)
    next_reason: float = 0.0
    last_reason: str = ""


class RayDispatcher(Dispatcher):
    """Runs each probe in a :class:`ProbeRunner` actor on a Ray cluster; see the module docstring."""

    local_gpus = False

    def __init__(
        self,
        *,
        address: str,
        namespace: str,
        command: list[str],
        workdir: str | None,
        timeout_seconds: float,
        queue_deadline_seconds: float | None,
        probe_cpus: float,
        host_memory: HostMemoryPolicy | None = None,
    ) -> None:
        self.address = address
        self.namespace = namespace
        self.command = list(command)
        self.workdir = workdir
        self.timeout_seconds = timeout_seconds
        self.queue_deadline_seconds = queue_deadline_seconds
        self.probe_cpus = probe_cpus
        #: the ceilings of the probe child and its trial children on the node (:mod:`probes.hostmem`)
        self.host_memory = host_memory
        self._ray: Any = None
        self._runner: Any = None
        self._killer: Any = None
        self._own_connection = False
        self._sink: JobSink | None = None
        self._lock = threading.Lock()
        self._jobs: dict[str, _Remote] = {}
        self._stopping = threading.Event()
        self._nodes_read: tuple[float, list[ClusterNode]] | None = None

    # --- the cluster ---------------------------------------------------------------------------

    def start(self, sink: JobSink) -> None:
        ray = import_ray()
        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.address,
                    namespace=self.namespace,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    configure_logging=False,
                )
            except ConnectionError as exc:
                raise RayUnavailable(
                    f"could not reach the Ray cluster at {self.address!r} (MAXBATCH_RAY_ADDRESS): {exc}"
                ) from exc
            self._own_connection = True
        self._ray = ray
        self._runner = ray.remote(ProbeRunner)
        self._killer = ray.remote(kill_leftovers)
        self._sink = sink
        log.info("Ray dispatcher connected to %s: %d node(s)", self.address, len(self.nodes()))

    def _ray_or_raise(self) -> Any:
        if self._ray is None:
            raise RuntimeError("dispatcher not started")
        return self._ray

    def nodes(self) -> list[ClusterNode]:
        """The alive nodes (read at most every couple of seconds)."""
        now = time.monotonic()
        with self._lock:
            cached = self._nodes_read
        if cached is not None and now - cached[0] < NODES_TTL_SECONDS:
            return cached[1]
        ray = self._ray_or_raise()
        available = self._available_per_node()
        nodes = [
            read_node(str(raw["NodeID"]), dict(raw.get("Resources") or {}), available.get(str(raw["NodeID"])))
            for raw in ray.nodes()
            if raw.get("Alive")
        ]
        with self._lock:
            self._nodes_read = (now, nodes)
        return nodes

    @staticmethod
    def _available_per_node() -> dict[str, dict[str, float]]:
        """Free resources per node; Ray offers this only through its state module (empty if it moved)."""
        try:
            from ray._private import state

            per_node: dict[Any, Any] = state.available_resources_per_node()  # type: ignore[no-untyped-call]
            return {str(k): dict(v) for k, v in per_node.items()}
        except Exception:
            log.debug("per-node free resources unavailable", exc_info=True)
            return {}

    def gpu_kinds(self) -> list[GpuKind]:
        return kinds_of(self.nodes())

    # --- placement -----------------------------------------------------------------------------

    def place(self, spec: ProbeSpec) -> Placement:
        if spec.device_kind == "cuda":
            known = known_names(self.gpu_kinds())
            raise InvalidRequest(
                f"{spec.device} names a GPU of the service's own machine, and this service runs probes on a "
                "Ray cluster: ask for device 'gpu' with gpu_type"
                + (f" (the cluster has {', '.join(known)})" if known else " (the cluster has no GPU nodes)"),
                known=known,
            )
        if spec.gpu_type is None:
            return Placement("cpu", spec)
        kinds = self.gpu_kinds()
        gpu_type = fleet_spelling(spec.gpu_type, kinds)
        spec = spec.model_copy(update={"gpu_type": gpu_type})
        if spec.device != FLEET_DEVICE:
            return Placement("cpu", spec)
        if sum(kind.total for kind in matching(gpu_type, kinds)) == 0:
            raise GpuTypeUnavailable(
                f"the nodes marked {gpu_type} offer no GPU to Ray (start them with --num-gpus)",
                known=known_names(k for k in kinds if k.total > 0),
            )
        return Placement(f"gpu:{gpu_type}", spec)

    def _resource_for(self, gpu_type: str) -> str:
        """The resource that marks nodes of ``gpu_type`` (as the cluster's nodes spell it)."""
        wanted = parse_gpu_type(gpu_type)
        for node in self.nodes():
            if node.kind is not None and node.resource is not None and wanted.matches(node.kind):
                if wanted.memory_gb is not None:
                    return node.resource
                return f"{RESOURCE_PREFIX}{node.kind.model}"
        if wanted.memory_gb is not None:
            return f"{RESOURCE_PREFIX}{wanted.model}-{wanted.memory_gb}G"
        return f"{RESOURCE_PREFIX}{wanted.model}"

    def _actor_options(self, spec: ProbeSpec) -> dict[str, Any]:
        options: dict[str, Any] = {
            "num_cpus": self.probe_cpus,
            "max_concurrency": RUNNER_THREADS,
            "max_restarts": 0,
        }
        if spec.device == FLEET_DEVICE:
            options["num_gpus"] = 1
        if spec.gpu_type is not None:
            options["resources"] = {self._resource_for(spec.gpu_type): MARKER_AMOUNT}
        return options

    def _waiting_reason(self, spec: ProbeSpec) -> str:
        if spec.gpu_type is None:
            return "waiting for a free CPU on the Ray cluster"
        try:
            kinds = matching(spec.gpu_type, self.gpu_kinds())
        except GpuTypeUnavailable:
            return f"waiting for a {spec.gpu_type} node: the cluster has none now"
        if spec.device != FLEET_DEVICE:
            return f"waiting for a free CPU on a {spec.gpu_type} node"
        total = sum(kind.total for kind in kinds)
        frees = [kind.free for kind in kinds]
        if None in frees:
            return f"waiting for a free {spec.gpu_type} ({total} in the cluster)"
        free = sum(f or 0 for f in frees)
        if free == 0:
            return f"waiting for a free {spec.gpu_type}: all {total} in the cluster are busy"
        return f"waiting for Ray to start the probe on a {spec.gpu_type} ({free} of {total} free)"

    # --- jobs ----------------------------------------------------------------------------------

    def submit(self, job: DispatchJob) -> None:
        remote = _Remote(job, ProbeSpec.model_validate_json(job.spec_json))
        remote.thread = threading.Thread(
            target=self._drive, args=(remote,), name=f"maxbatch-ray-{job.id}", daemon=True
        )
        with self._lock:
            if self._stopping.is_set() or self._sink is None:
                raise RuntimeError("dispatcher is not running")
            self._jobs[job.id] = remote
        remote.thread.start()

    def _drive(self, remote: _Remote) -> None:
        """The job's thread: follow it to its end, release its actor, report the outcome."""
        outcome: RunOutcome | None
        try:
            outcome = self._follow(remote)
        except Exception as exc:
            log.exception("job %s: following the Ray actor failed", remote.job.id)
            outcome = RunOutcome(
                RunStatus.CRASH, message=f"the Ray dispatcher lost the probe: {_summary(exc)}"
            )
        finally:
            self._release(remote)
            with self._lock:
                if self._jobs.get(remote.job.id) is remote:
                    del self._jobs[remote.job.id]
        if outcome is not None:
            self._report(remote.job.id, outcome)

    def _follow(self, remote: _Remote) -> RunOutcome | None:
        """Create the actor, wait for its placement, relay its events; ``None`` when it was dequeued."""
        ray = self._ray_or_raise()
        actor = self._create_actor(remote)
        if actor is None:
            return None
        run_ref = actor.run.remote()
        seen = _Seen(next_reason=time.monotonic() + POLL_SECONDS)
        poll_ref = actor.poll.remote(seen.cursor, POLL_SECONDS, seen.know_started)
        while True:
            if self._stopping.is_set() and remote.placed and not remote.stop_sent:
                remote.stop_sent = True
                actor.stop.remote()
            ready, _ = ray.wait([poll_ref], timeout=POLL_SECONDS)
            if not ready:
                if not remote.placed:
                    ended, waited_out = self._still_waiting(remote, seen)
                    if ended:
                        return waited_out
                continue
            try:
                reply: PollReply = ray.get(poll_ref)
            except ray.exceptions.RayActorError as exc:
                return self._actor_died(remote, exc)
            if not self._take(remote, reply, seen):
                return None
            if reply.finished:
                break
            poll_ref = actor.poll.remote(seen.cursor, POLL_SECONDS, seen.know_started)
        try:
            outcome: RunOutcome = ray.get(run_ref, timeout=60)
        except ray.exceptions.RayActorError as exc:
            return self._actor_died(remote, exc)
        except (ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError) as exc:
            return RunOutcome(RunStatus.CRASH, message=f"the probe runner failed: {_summary(exc)}")
        return outcome

    def _create_actor(self, remote: _Remote) -> Any:
        """The job's actor (Ray places it when it can); ``None`` when the job was dequeued meanwhile."""
        spec = remote.spec
        actor = self._runner.options(**self._actor_options(spec)).remote(
            remote.job,
            self.command,
            workdir_root=self.workdir,
            timeout_seconds=self.timeout_seconds,
            on_gpu=spec.device == FLEET_DEVICE,
            host_memory=self.host_memory,
        )
        with self._lock:
            remote.actor = actor
            return None if remote.dequeued else actor

    def _still_waiting(self, remote: _Remote, seen: _Seen) -> tuple[bool, RunOutcome | None]:
        """(ended, outcome) for a job Ray has not placed yet: dequeued, shut down, past the deadline;
        otherwise say why it waits (when that changed)."""
        if remote.dequeued:
            return True, None
        if self._stopping.is_set():
            return True, RunOutcome(RunStatus.SHUTDOWN, message="the service shut down")
        now = time.monotonic()
        deadline = self.queue_deadline_seconds
        if deadline is not None and now - seen.queued_at >= deadline:
            message = (
                f"not started within {deadline:g} s (MAXBATCH_QUEUE_DEADLINE_SECONDS): "
                f"{self._waiting_reason(remote.spec)}"
            )
            return True, RunOutcome(RunStatus.EXPIRED, code="queue-timeout", message=message)
        if now >= seen.next_reason:
            reason = self._waiting_reason(remote.spec)
            if reason != seen.last_reason:
                self._tell_waiting(remote.job.id, reason)
                seen.last_reason = reason
            seen.next_reason = now + REASON_EVERY_SECONDS
        return False, None

    def _take(self, remote: _Remote, reply: PollReply, seen: _Seen) -> bool:
        """Pass on what a poll brought (the start, events); False when the job was dequeued meanwhile."""
        with self._lock:
            remote.placed = True
            dequeued = remote.dequeued
        if reply.started is not None and not seen.know_started:
            seen.know_started = True
            remote.pid, remote.node_id = reply.started.pid, reply.started.node_id
            if dequeued:  # cancelled while Ray placed it: the kill may have left the child
                self._clean_node(remote)
                return False
            keep = self._sink_or_raise().job_started(
                remote.job.id,
                pid=reply.started.pid,
                workdir=Path(reply.started.workdir),
                node=reply.started.node_id,
            )
            if not keep:
                remote.actor.cancel.remote()
        for line in reply.events:
            seen.cursor += 1
            self._relay(remote.job.id, line)
        return True

    def _actor_died(self, remote: _Remote, exc: BaseException) -> RunOutcome | None:
        with self._lock:
            dequeued, placed = remote.dequeued, remote.placed
        if remote.node_id is not None:
            self._clean_node(remote)
        if dequeued:
            return None
        if self._stopping.is_set():
            return RunOutcome(RunStatus.SHUTDOWN, message="the service shut down")
        if not placed:
            return RunOutcome(
                RunStatus.CRASH, message=f"Ray could not start the probe runner: {_summary(exc)}"
            )
        where = f"node {remote.node_id}" if remote.node_id else "its node"
        return RunOutcome(
            RunStatus.LOST, message=f"the Ray worker running the probe on {where} died: {_summary(exc)}"
        )

    def _relay(self, job_id: str, line: str) -> None:
        try:
            event = ProbeEvent.model_validate_json(line)
        except ValidationError as exc:
            log.warning("job %s: unreadable event from the Ray runner: %s", job_id, str(exc)[:300])
            return
        try:
            self._sink_or_raise().job_event(job_id, event)
        except Exception:
            log.exception("job %s: handling an event failed", job_id)

    def _tell_waiting(self, job_id: str, reason: str) -> None:
        try:
            self._sink_or_raise().job_waiting(job_id, reason)
        except Exception:
            log.exception("job %s: recording why it waits failed", job_id)

    def _report(self, job_id: str, outcome: RunOutcome) -> None:
        try:
            self._sink_or_raise().job_finished(job_id, outcome)
        except Exception:
            log.exception("job %s: recording the outcome failed", job_id)

    def _release(self, remote: _Remote) -> None:
        """Free the actor's resources (its process ends; the child is already gone or being killed)."""
        if remote.actor is None or self._ray is None:
            return
        try:
            self._ray.kill(remote.actor, no_restart=True)
        except Exception:
            log.debug("job %s: killing its actor failed", remote.job.id, exc_info=True)

    def _clean_node(self, remote: _Remote) -> None:
        if remote.node_id is not None and remote.pid is not None:
            self._kill_on(remote.job.id, remote.pid, [remote.node_id])

    def _kill_on(self, job_id: str, pgid: int, node_ids: list[str]) -> int:
        """Kill what is left of ``job_id``'s process group on those nodes (pinned tasks); how many died."""
        ray = self._ray_or_raise()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        refs = [
            self._killer.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)
            ).remote(job_id, pgid)
            for node in node_ids
        ]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=CLEANUP_SECONDS)
        killed = 0
        for ref in done:
            try:
                killed += int(ray.get(ref))
            except Exception as exc:  # noqa: BLE001 — a dead node or a lost task: nothing left to kill there
                log.info("job %s: cleaning a node failed: %s", job_id, _summary(exc))
        return killed

    def _sink_or_raise(self) -> JobSink:
        if self._sink is None:
            raise RuntimeError("dispatcher not started")
        return self._sink

    # --- the seam, continued -------------------------------------------------------------------

    def cancel(self, job_id: str) -> CancelResult:
        with self._lock:
            remote = self._jobs.get(job_id)
            if remote is None:
                return CancelResult.UNKNOWN
            placed = remote.placed
            if not placed:
                remote.dequeued = True
            actor = remote.actor
        if not placed:
            if actor is not None:
                self._release(remote)
            return CancelResult.DEQUEUED
        actor.cancel.remote()
        return CancelResult.SIGNALLED

    def running(self) -> dict[str, str]:
        with self._lock:
            return {r.job.queue: r.job.id for r in self._jobs.values() if r.placed}

    def own_process_groups(self) -> set[int]:
        return set()  # the probes run on the cluster's nodes, not next to this service's NVML view

    def clean_up_after(self, job_id: str, pid: int) -> None:
        nodes = [node.id for node in self.nodes()]
        killed = self._kill_on(job_id, pid, nodes)
        if killed:
            log.warning(
                "job %s: killed %d process(es) left on the cluster by the previous service", job_id, killed
            )

    def alive(self) -> bool:
        return self._sink is not None and not self._stopping.is_set() and bool(self._ray.is_initialized())

    def stop(self) -> None:
        """Stop every probe (their jobs go back to the queue), then leave the cluster."""
        self._stopping.set()
        with self._lock:
            remotes = list(self._jobs.values())
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for remote in remotes:
            if remote.thread is not None:
                remote.thread.join(timeout=max(0.1, deadline - time.monotonic()))
                if remote.thread.is_alive():
                    log.error("job %s: its Ray actor did not stop in time", remote.job.id)
        if self._own_connection and self._ray is not None:
            self._ray.shutdown()
