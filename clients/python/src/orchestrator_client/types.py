"""The API's JSON bodies as dataclasses (see ``docs/openapi.json`` for every field).

Each type is built with ``from_json``, which reads the fields it knows and keeps the whole
object in ``raw``: a newer coordinator may add fields, and they stay reachable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

Json = Dict[str, Any]

#: Statuses after which a task changes no more (until a send or fork reopens it).
TERMINAL_TASK_STATUSES = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_tokens: int = 0
    cache_read_tokens: int = 0

    @classmethod
    def from_json(cls, v: Optional[Json]) -> "Usage":
        v = v or {}
        return cls(
            input_tokens=v.get("input_tokens", 0),
            output_tokens=v.get("output_tokens", 0),
            cache_creation_tokens=v.get("cache_creation_tokens", 0),
            cache_read_tokens=v.get("cache_read_tokens", 0),
        )

    @property
    def total(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_creation_tokens
            + self.cache_read_tokens
        )


@dataclass(frozen=True)
class JobError:
    reason: str
    message: str

    @classmethod
    def from_json(cls, v: Optional[Json]) -> Optional["JobError"]:
        return None if v is None else cls(reason=v["reason"], message=v["message"])


@dataclass(frozen=True)
class Job:
    """One agent of a task."""

    id: str
    step: int
    role: str
    status: str
    attempt: int
    prompt: str
    depends_on: List[int]
    usage: Usage
    cost_usd: float
    output: Optional[str]
    error: Optional[JobError]
    model: Optional[str]
    worker_id: Optional[str]
    continues: Optional[str]
    forked: bool
    session_id: Optional[str]
    diff: Optional[str]
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, v: Json) -> "Job":
        return cls(
            id=v["id"],
            step=v["step"],
            role=v["role"],
            status=v["status"],
            attempt=v["attempt"],
            prompt=v["prompt"],
            depends_on=list(v.get("depends_on", [])),
            usage=Usage.from_json(v.get("usage")),
            cost_usd=v.get("cost_usd", 0.0),
            output=v.get("output"),
            error=JobError.from_json(v.get("error")),
            model=v.get("model"),
            worker_id=v.get("worker_id"),
            continues=v.get("continues"),
            forked=v.get("forked", False),
            session_id=v.get("session_id"),
            diff=v.get("diff"),
            raw=v,
        )


@dataclass(frozen=True)
class Task:
    """A task and its jobs (agents), in plan order."""

    id: str
    prompt: str
    task_type: str
    plan_source: str
    mode: str
    status: str
    backend: str
    model: Optional[str]
    jobs: List[Job]
    usage: Usage
    cost_usd: float
    created_at_ms: int
    finished_at_ms: Optional[int]
    output: Optional[str]
    error: Optional[str]
    branch: Optional[str]
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, v: Json) -> "Task":
        return cls(
            id=v["id"],
            prompt=v["prompt"],
            task_type=v["task_type"],
            plan_source=v["plan_source"],
            mode=v["mode"],
            status=v["status"],
            backend=v["backend"],
            model=v.get("model"),
            jobs=[Job.from_json(j) for j in v.get("jobs", [])],
            usage=Usage.from_json(v.get("usage")),
            cost_usd=v.get("cost_usd", 0.0),
            created_at_ms=v["created_at_ms"],
            finished_at_ms=v.get("finished_at_ms"),
            output=v.get("output"),
            error=v.get("error"),
            branch=v.get("branch"),
            raw=v,
        )

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_TASK_STATUSES


@dataclass(frozen=True)
class TaskSummary:
    """One row of a task listing."""

    id: str
    prompt: str
    task_type: str
    mode: str
    status: str
    roles: List[str]
    jobs_done: int
    usage: Usage
    cost_usd: float
    created_at_ms: int
    finished_at_ms: Optional[int]

    @classmethod
    def from_json(cls, v: Json) -> "TaskSummary":
        return cls(
            id=v["id"],
            prompt=v["prompt"],
            task_type=v["task_type"],
            mode=v["mode"],
            status=v["status"],
            roles=list(v.get("roles", [])),
            jobs_done=v.get("jobs_done", 0),
            usage=Usage.from_json(v.get("usage")),
            cost_usd=v.get("cost_usd", 0.0),
            created_at_ms=v["created_at_ms"],
            finished_at_ms=v.get("finished_at_ms"),
        )


@dataclass(frozen=True)
class TaskList:
    tasks: List[TaskSummary]
    #: Pass as ``cursor`` to get the next page; ``None`` on the last one.
    next_cursor: Optional[str]

    @classmethod
    def from_json(cls, v: Json) -> "TaskList":
        return cls(
            tasks=[TaskSummary.from_json(t) for t in v["tasks"]],
            next_cursor=v.get("next_cursor"),
        )


@dataclass(frozen=True)
class AgentSummary:
    """One row of an agent listing."""

    id: str
    task_id: str
    step: int
    role: str
    status: str
    attempt: int
    backend: str
    model: Optional[str]
    usage: Usage
    cost_usd: float
    error: Optional[JobError]
    task_prompt: str

    @classmethod
    def from_json(cls, v: Json) -> "AgentSummary":
        return cls(
            id=v["id"],
            task_id=v["task_id"],
            step=v["step"],
            role=v["role"],
            status=v["status"],
            attempt=v["attempt"],
            backend=v["backend"],
            model=v.get("model"),
            usage=Usage.from_json(v.get("usage")),
            cost_usd=v.get("cost_usd", 0.0),
            error=JobError.from_json(v.get("error")),
            task_prompt=v.get("task_prompt", ""),
        )


@dataclass(frozen=True)
class AgentList:
    agents: List[AgentSummary]
    next_cursor: Optional[str]

    @classmethod
    def from_json(cls, v: Json) -> "AgentList":
        return cls(
            agents=[AgentSummary.from_json(a) for a in v["agents"]],
            next_cursor=v.get("next_cursor"),
        )


@dataclass(frozen=True)
class AgentDetail:
    """One agent: its job record (``job``: result, ``job.output``, ``job.diff``), its task,
    its tool calls."""

    task_id: str
    task_prompt: str
    backend: str
    model: Optional[str]
    job: Job
    tool_calls: int
    tools: Dict[str, int]
    session_id: Optional[str]
    log_events: int

    @classmethod
    def from_json(cls, v: Json) -> "AgentDetail":
        return cls(
            task_id=v["task_id"],
            task_prompt=v["task_prompt"],
            backend=v["backend"],
            model=v.get("model"),
            job=Job.from_json(v["job"]),
            tool_calls=v["tool_calls"],
            tools=dict(v.get("tools", {})),
            session_id=v.get("session_id"),
            log_events=v["log_events"],
        )


@dataclass(frozen=True)
class AgentTurn:
    """The answer to a send or a fork: the new turn runs as a new agent of the same task."""

    task_id: str
    agent_id: str
    #: The agent whose conversation it continues.
    from_agent: str
    fork: bool

    @classmethod
    def from_json(cls, v: Json) -> "AgentTurn":
        return cls(
            task_id=v["task_id"], agent_id=v["agent_id"], from_agent=v["from"], fork=v["fork"]
        )


@dataclass(frozen=True)
class Estimate:
    source: str
    samples: int
    cost_usd_p50: float
    cost_usd_p90: float
    duration_ms_p50: Optional[int]
    duration_ms_p90: Optional[int]

    @classmethod
    def from_json(cls, v: Json) -> "Estimate":
        return cls(
            source=v["source"],
            samples=v.get("samples", 0),
            cost_usd_p50=v["cost_usd_p50"],
            cost_usd_p90=v["cost_usd_p90"],
            duration_ms_p50=v.get("duration_ms_p50"),
            duration_ms_p90=v.get("duration_ms_p90"),
        )


@dataclass(frozen=True)
class StepEstimate:
    step: int
    role: str
    depends_on: List[int]
    instruction: str
    estimate: Estimate

    @classmethod
    def from_json(cls, v: Json) -> "StepEstimate":
        return cls(
            step=v["step"],
            role=v["role"],
            depends_on=list(v["depends_on"]),
            instruction=v["instruction"],
            estimate=Estimate.from_json(v["estimate"]),
        )


@dataclass(frozen=True)
class DryRun:
    """The plan a submit would run and what it should cost; nothing ran."""

    plan_source: str
    mode: str
    steps: List[StepEstimate]
    total: Estimate

    @classmethod
    def from_json(cls, v: Json) -> "DryRun":
        return cls(
            plan_source=v["plan_source"],
            mode=v["mode"],
            steps=[StepEstimate.from_json(s) for s in v["steps"]],
            total=Estimate.from_json(v["total"]),
        )


@dataclass(frozen=True)
class Event:
    """One entry of a task's event log, as a server-sent event.

    ``id`` resumes a stream after this event; ``type`` is its kind (``task_created``,
    ``job_started``, ``text``, ``tool_call``, ``job_finished``, ``task_finished``, ...);
    ``data`` holds the kind's own fields (``text``, ``name``, ``usage``, ...).
    """

    id: str
    type: str
    task_id: str
    job_id: Optional[str]
    attempt: int
    at_ms: int
    data: Json

    @classmethod
    def from_json(cls, event_id: str, v: Json) -> "Event":
        kind = dict(v.get("kind", {}))
        kind_type = kind.pop("type", "")
        return cls(
            id=event_id,
            type=kind_type,
            task_id=v["task_id"],
            job_id=v.get("job_id"),
            attempt=v.get("attempt", 0),
            at_ms=v["at_ms"],
            data=kind,
        )
