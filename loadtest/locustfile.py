"""Locust users that chat like the widget, against the `make up` stack (`python -m loadtest.load`).

Each user picks a demo tenant and keeps one session id. Browser users (a share of them, set by
SITEKIT_LOAD_BROWSER_SHARE) load the agent's config and chat with the publishable key and the
tenant's Origin, as the widget does; the others are server clients with the secret key. Every
chat is streamed (Accept: text/event-stream) and read to its `end` event; users think between
turns. A 429 is an expected answer of the rate limiter, not a failure: it is counted and
reported at the end. Besides the request itself (time to the response head), the statistics get
"first token" and "whole answer" entries.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from locust import HttpUser, between, events, task
from locust.env import Environment

DEMO = Path(os.environ.get("SITEKIT_DEMO", Path(os.environ.get("SITEKIT_DATA_DIR", ".stack"))
                           / "demo.json"))
THINK_MIN_S = float(os.environ.get("SITEKIT_LOAD_THINK_MIN_S", "1"))
THINK_MAX_S = float(os.environ.get("SITEKIT_LOAD_THINK_MAX_S", "5"))
BROWSER_SHARE = float(os.environ.get("SITEKIT_LOAD_BROWSER_SHARE", "0.5"))
QUESTIONS = (
    "Hello there", "What can you do?", "Tell me about your products",
    "Do you ship abroad?", "How do I return an item?", "What are your opening hours?",
)
OUTCOMES: Counter[str] = Counter()  # rate limited answers and the like, reported at the end


def demo_tenants() -> list[dict[str, Any]]:
    tenants: list[dict[str, Any]] = orjson.loads(DEMO.read_bytes())["tenants"]
    return tenants


class WidgetUser(HttpUser):
    wait_time = between(THINK_MIN_S, THINK_MAX_S)

    def on_start(self) -> None:
        tenant = random.choice(demo_tenants())
        self.agent_id: str = tenant["agent_id"]
        self.session_id = uuid.uuid4().hex
        self.browser = random.random() < BROWSER_SHARE
        if self.browser:
            self.headers = {"authorization": f"Bearer {tenant['publishable_key']}",
                            "origin": tenant["allowed_origin"]}
            self.client.get(f"/v1/agents/{self.agent_id}/config", headers=self.headers,
                            name="config (publishable key)", timeout=10)
        else:
            self.headers = {"authorization": f"Bearer {tenant['secret_key']}"}

    @task
    def chat(self) -> None:
        kind = "publishable key" if self.browser else "secret key"
        started = time.perf_counter()
        with self.client.post(
            f"/v1/agents/{self.agent_id}/chat", name=f"chat ({kind})", stream=True,
            catch_response=True, timeout=60,
            headers={**self.headers, "accept": "text/event-stream"},
            json={"message": random.choice(QUESTIONS), "session_id": self.session_id},
        ) as response:
            if response.status_code == 429:
                OUTCOMES["429 rate limited (expected)"] += 1
                response.success()
                return
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            problem = self.read_stream(response, started)
            if problem:
                response.failure(problem)
            else:
                OUTCOMES["200 streamed to the end"] += 1
                response.success()

    def read_stream(self, response: Any, started: float) -> str | None:
        """Read the SSE answer to its end; report its first token and its end as timings."""
        first_token = False
        for line in response.iter_lines():
            if line == b"event: token" and not first_token:
                first_token = True
                self.timing("first token", started)
            elif line == b"event: error":
                return "the answer ended in an error event"
            elif line == b"event: end":
                self.timing("whole answer", started)
                return None
        return "the stream ended without an end event"

    def timing(self, name: str, started: float) -> None:
        self.environment.events.request.fire(
            request_type="SSE", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=0, exception=None, context={})


def report_outcomes(environment: Environment, **kwargs: Any) -> None:
    chats = sum(OUTCOMES.values())
    print("\nChat outcomes (429s are expected answers, not failures):")
    for outcome, count in sorted(OUTCOMES.items()):
        print(f"  {outcome:<32} {count:>7}  ({100 * count / max(chats, 1):.1f}%)")


events.test_stop.add_listener(report_outcomes)  # type: ignore[no-untyped-call]
