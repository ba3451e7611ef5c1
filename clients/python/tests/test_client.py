"""The client against a real cluster running the `sim` backend."""

import pytest

from orchestrator_client import (
    AgentDetail,
    Client,
    InvalidField,
    MalformedBody,
    NotFound,
    Task,
    Unauthorized,
)


def test_submit_follow_and_show_a_task(client: Client) -> None:
    task = client.submit("write a haiku about queues", roles=["analyst", "builder"], backend="sim")
    assert isinstance(task, Task)
    assert [j.role for j in task.jobs] == ["analyst", "builder"]

    events = list(client.events(task.id))
    kinds = [e.type for e in events]
    assert kinds[0] == "task_created"
    assert kinds[-1] == "task_finished"
    assert kinds.count("job_finished") == 2
    assert all(e.task_id == task.id for e in events)
    assert events[-1].data["status"] == "completed"

    # Resuming after the second-to-last event gives only the last one.
    rest = list(client.events(task.id, last_event_id=events[-2].id))
    assert [e.id for e in rest] == [events[-1].id]

    done = client.task(task.id)
    assert done.status == "completed" and done.finished
    assert all(j.status == "succeeded" and j.output for j in done.jobs)
    assert done.usage.total > 0


def test_list_tasks_and_agents(client: Client) -> None:
    task = client.wait(client.submit("list me", roles=["tester"], backend="sim").id)
    assert task.status == "completed"

    listed = client.tasks(limit=1000, status=["completed"])
    assert task.id in [t.id for t in listed.tasks]
    row = next(t for t in listed.tasks if t.id == task.id)
    assert row.roles == ["tester"] and row.jobs_done == 1

    agents = client.agents(task=task.id)
    assert [a.id for a in agents.agents] == [task.jobs[0].id]

    agent = client.agent(task.jobs[0].id)
    assert isinstance(agent, AgentDetail)
    assert agent.task_id == task.id
    assert agent.job.output == task.jobs[0].output
    assert agent.log_events > 0


def test_send_and_fork_continue_an_agent(client: Client) -> None:
    task = client.wait(client.submit("remember 42", roles=["builder"], backend="sim").id)
    first = task.jobs[0].id

    turn = client.send(first, "what did I ask?")
    assert turn.task_id == task.id and turn.from_agent == first and not turn.fork
    forked = client.fork(first, "and again?")
    assert forked.fork and forked.from_agent == first

    done = client.wait(task.id)
    by_id = {j.id: j for j in done.jobs}
    assert by_id[turn.agent_id].continues == first
    assert by_id[forked.agent_id].forked
    assert by_id[turn.agent_id].status == "succeeded"
    assert by_id[forked.agent_id].status == "succeeded"


def test_cancel_stops_a_task(client: Client) -> None:
    task = client.submit("take your time", roles=["builder"], backend="sim", sim={"latency_ms": 600_000})
    cancelled = client.cancel(task.id)
    assert cancelled.id == task.id
    assert client.wait(task.id).status == "cancelled"


def test_dry_run_runs_nothing(client: Client) -> None:
    before = client.tasks(limit=1000).tasks
    plan = client.dry_run("plan only", roles=["analyst", "builder", "reviewer"])
    assert [s.role for s in plan.steps] == ["analyst", "builder", "reviewer"]
    assert plan.total.cost_usd_p50 >= 0
    assert [t.id for t in client.tasks(limit=1000).tasks] == [t.id for t in before]


def test_errors_are_typed_and_carry_code_and_message(client: Client, url: str) -> None:
    with pytest.raises(InvalidField) as bad:
        client.submit("   ")
    assert bad.value.status == 400
    assert bad.value.code == "invalid_field"
    assert bad.value.field == "prompt"

    with pytest.raises(InvalidField) as bad:
        client.submit("x", mode="sideways")
    assert bad.value.field == "mode"

    with pytest.raises(NotFound) as missing:
        client.task("0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9b")
    assert missing.value.status == 404 and "not found" in missing.value.message

    with pytest.raises(InvalidField) as bad_id:
        client.agent("not-an-id")
    assert bad_id.value.field == "id"

    with pytest.raises(Unauthorized) as denied:
        Client(url, token="wrong-token-abcdefghijklmnop").tasks()
    assert denied.value.status == 401 and denied.value.code == "unauthorized"

    assert issubclass(MalformedBody, Exception)
