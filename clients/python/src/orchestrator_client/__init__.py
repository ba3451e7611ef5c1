"""A typed Python client for the orchestrator coordinator's HTTP API.

    from orchestrator_client import Client

    client = Client("http://127.0.0.1:8080", token="...")
    task = client.submit("add a --verbose flag", backend="claude-code")
    for event in client.events(task.id):
        print(event.type, event.data)
"""

from .client import Client
from .errors import (
    ApiError,
    Conflict,
    InternalError,
    InvalidField,
    MalformedBody,
    NotFound,
    OrchestratorError,
    PayloadTooLarge,
    TransportError,
    Unauthorized,
    Unavailable,
)
from .types import (
    AgentDetail,
    AgentList,
    AgentSummary,
    AgentTurn,
    DryRun,
    Estimate,
    Event,
    Job,
    JobError,
    StepEstimate,
    Task,
    TaskList,
    TaskSummary,
    Usage,
)

__all__ = [
    "Client",
    "ApiError",
    "Conflict",
    "InternalError",
    "InvalidField",
    "MalformedBody",
    "NotFound",
    "OrchestratorError",
    "PayloadTooLarge",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "AgentDetail",
    "AgentList",
    "AgentSummary",
    "AgentTurn",
    "DryRun",
    "Estimate",
    "Event",
    "Job",
    "JobError",
    "StepEstimate",
    "Task",
    "TaskList",
    "TaskSummary",
    "Usage",
]
