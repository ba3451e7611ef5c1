"""The client: one method per API call, typed answers, typed errors."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Iterator, List, Optional, Sequence

from .errors import ApiError, TransportError, error_for
from .types import (
    AgentDetail,
    AgentList,
    AgentTurn,
    DryRun,
    Event,
    Json,
    Task,
    TaskList,
)


class Client:
    """A client of one coordinator.

    ``url`` is the coordinator's base URL (``http://127.0.0.1:8080``); ``token`` the bearer
    token (``ORCH_TOKEN``), if the coordinator has tokens configured. ``timeout`` bounds each
    request in seconds (an event stream waits that long for its next event or keep-alive).
    """

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    # ---- tasks -------------------------------------------------------------------------------

    def submit(
        self,
        prompt: str,
        *,
        task_type: Optional[str] = None,
        mode: Optional[str] = None,
        roles: Optional[Sequence[str]] = None,
        backend: Optional[str] = None,
        model: Optional[str] = None,
        workspace: Optional[str] = None,
        repo: Optional[str] = None,
        ref: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        **options: Any,
    ) -> Task:
        """Submits a task and returns it as created (its jobs planned, the first ones queued).

        Further options (``budget_usd``, ``max_attempts``, ``on_failure``, ``plan``, ``sim``,
        ...) are passed as they are; see ``SubmitTask`` in ``docs/openapi.json``.
        """
        body = _submit_body(
            prompt, task_type, mode, roles, backend, model, workspace, repo, ref,
            idempotency_key, options,
        )
        return Task.from_json(self._request("POST", "/v1/tasks", body))

    def dry_run(self, prompt: str, **options: Any) -> DryRun:
        """The plan a submit with these arguments would run and its estimated cost; nothing
        runs."""
        body = _submit_body(prompt, None, None, None, None, None, None, None, None, None, options)
        return DryRun.from_json(self._request("POST", "/v1/tasks/dry-run", body))

    def task(self, task_id: str) -> Task:
        return Task.from_json(self._request("GET", f"/v1/tasks/{_seg(task_id)}"))

    def tasks(
        self,
        *,
        limit: Optional[int] = None,
        status: Optional[Sequence[str]] = None,
        search: Optional[str] = None,
        sort: Optional[str] = None,
        order: Optional[str] = None,
        cursor: Optional[str] = None,
    ) -> TaskList:
        """One page of the task history, newest first (``next_cursor`` leads on)."""
        query = {
            "limit": limit,
            "status": ",".join(status) if status else None,
            "search": search,
            "sort": sort,
            "order": order,
            "cursor": cursor,
        }
        return TaskList.from_json(self._request("GET", "/v1/tasks", query=query))

    def cancel(self, task_id: str) -> Task:
        return Task.from_json(self._request("POST", f"/v1/tasks/{_seg(task_id)}/cancel"))

    def events(self, task_id: str, *, last_event_id: Optional[str] = None) -> Iterator[Event]:
        """Follows a task's events as they happen (replaying what happened before) until the
        task ends. Pass the ``id`` of the last event seen as ``last_event_id`` to resume."""
        return self._sse(f"/v1/tasks/{_seg(task_id)}/events", {}, last_event_id)

    def wait(self, task_id: str) -> Task:
        """Follows the task's events until it ends, then returns it."""
        for _ in self.events(task_id):
            pass
        return self.task(task_id)

    # ---- agents ------------------------------------------------------------------------------

    def agents(
        self,
        *,
        task: Optional[str] = None,
        role: Optional[Sequence[str]] = None,
        status: Optional[Sequence[str]] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> AgentList:
        query = {
            "task": task,
            "role": ",".join(role) if role else None,
            "status": ",".join(status) if status else None,
            "limit": limit,
            "cursor": cursor,
        }
        return AgentList.from_json(self._request("GET", "/v1/agents", query=query))

    def agent(self, agent_id: str) -> AgentDetail:
        """One agent: its result (``job.output``), its diff (``job.diff``), its tool calls."""
        return AgentDetail.from_json(self._request("GET", f"/v1/agents/{_seg(agent_id)}"))

    def agent_logs(self, agent_id: str, *, follow: bool = False) -> Iterator[Event]:
        """The agent's transcript; with ``follow``, until the agent ends."""
        query = {"follow": "true"} if follow else {}
        return self._sse(f"/v1/agents/{_seg(agent_id)}/logs", query, None)

    def send(self, agent_id: str, message: str) -> AgentTurn:
        """Continues the agent's conversation with ``message`` (as a new agent of its task)."""
        path = f"/v1/agents/{_seg(agent_id)}/send"
        return AgentTurn.from_json(self._request("POST", path, {"message": message}))

    def fork(self, agent_id: str, message: str) -> AgentTurn:
        """Forks the agent's conversation at this agent and continues it with ``message``."""
        path = f"/v1/agents/{_seg(agent_id)}/fork"
        return AgentTurn.from_json(self._request("POST", path, {"message": message}))

    def kill(self, agent_id: str) -> Task:
        return Task.from_json(self._request("POST", f"/v1/agents/{_seg(agent_id)}/kill"))

    # ---- the wire ----------------------------------------------------------------------------

    def _open(
        self,
        method: str,
        path: str,
        body: Optional[Json],
        query: Optional[Dict[str, Any]],
        headers: Dict[str, str],
    ):
        url = self.url + path
        params = {k: _query_value(v) for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = None
        if method == "POST":
            data = json.dumps(body if body is not None else {}).encode()
            headers = {**headers, "Content-Type": "application/json"}
        if self.token:
            headers = {**headers, "Authorization": f"Bearer {self.token}"}
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise _api_error(e) from None
        except (urllib.error.URLError, socket.timeout, ConnectionError) as e:
            raise TransportError(f"{method} {url}: {e}") from e

    def _request(
        self,
        method: str,
        path: str,
        body: Optional[Json] = None,
        query: Optional[Dict[str, Any]] = None,
    ) -> Json:
        with self._open(method, path, body, query, {"Accept": "application/json"}) as r:
            raw = r.read()
        try:
            return json.loads(raw)
        except ValueError as e:
            raise TransportError(f"{method} {path}: the answer is not JSON: {raw[:200]!r}") from e

    def _sse(
        self, path: str, query: Dict[str, Any], last_event_id: Optional[str]
    ) -> Iterator[Event]:
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        r = self._open("GET", path, None, query, headers)
        return _read_events(r)


def _read_events(r) -> Iterator[Event]:
    """Parses a server-sent event stream (https://html.spec.whatwg.org/#event-stream-interpretation)
    into events; comments (the keep-alives) and events without data are skipped."""
    with r:
        event_id, data = "", []  # type: str, List[str]
        for line in r:
            line = line.decode("utf-8").rstrip("\r\n")
            if not line:
                if data:
                    yield Event.from_json(event_id, json.loads("\n".join(data)))
                data = []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                event_id = value
            elif name == "data":
                data.append(value)
        if data:
            yield Event.from_json(event_id, json.loads("\n".join(data)))


def _api_error(e: urllib.error.HTTPError) -> Exception:
    raw = e.read()
    try:
        body = json.loads(raw)
        return error_for(e.code, str(body["code"]), str(body["message"]))
    except (ValueError, KeyError, TypeError):
        text = raw[:200].decode("utf-8", "replace")
        return ApiError(e.code, "http_error", f"HTTP {e.code}: {text}")


def _submit_body(
    prompt: str,
    task_type: Optional[str],
    mode: Optional[str],
    roles: Optional[Sequence[str]],
    backend: Optional[str],
    model: Optional[str],
    workspace: Optional[str],
    repo: Optional[str],
    ref: Optional[str],
    idempotency_key: Optional[str],
    options: Dict[str, Any],
) -> Json:
    body: Json = {
        "prompt": prompt,
        "task_type": task_type,
        "mode": mode,
        "roles": list(roles) if roles is not None else None,
        "backend": backend,
        "model": model,
        "workspace": workspace,
        "repo": repo,
        "ref": ref,
        "idempotency_key": idempotency_key,
    }
    body.update(options)
    return {k: v for k, v in body.items() if v is not None}


def _seg(value: str) -> str:
    """An id as one path segment (a stray `/` cannot reach another route)."""
    return urllib.parse.quote(str(value), safe="")


def _query_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
