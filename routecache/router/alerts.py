"""Soft budget alerts: when a tenant's spend in a day or month crosses its soft budget, one
structured log line, one event, one metric increment and (when configured) one webhook POST.

The ledger reports each settle's spend before and after, atomically, so exactly one request
(on one replica) sees a given crossing and the alert is raised once per period. Spend settled
while Redis was down moves nothing here until the flush adds it to Redis: that move is checked
then (CostControl.spend_flushed), as each replica alone knows only its own share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from routecache.domain import Budget
from routecache.router.budget import Movement, Period
from routecache.router.ports import EventSink
from routecache.router.telemetry import Telemetry

log = logging.getLogger(__name__)

_ADJECTIVE = {Period.DAY: "daily", Period.MONTH: "monthly"}


def soft_budget(budget: Budget, period: Period) -> float | None:
    return budget.soft_daily_usd if period is Period.DAY else budget.soft_monthly_usd


def _crossed(soft: float, before: float, after: float) -> bool:
    """Whether spend moving from `before` to `after` crosses the soft budget: the settle that
    reaches it. Every period starts at 0, so a soft budget of 0 is crossed by its first
    spend (reached by none, it would never alert)."""
    if soft == 0:
        return before <= 0 < after
    return before < soft <= after


class _HidesWebhookPaths(logging.Filter):
    """httpx's own INFO line for each request (shown with `routecache -v`) quotes the whole
    URL: this shows one webhook's URL as scheme://host. Each BudgetAlerts owns one, on
    httpx's logger from __init__ to aclose, so no secret URL outlives its service."""

    def __init__(self, url: str) -> None:
        super().__init__()
        # As given, and as httpx writes it (a lower-case host, escapes) in its line.
        self._urls = {url}
        with contextlib.suppress(httpx.InvalidURL):
            self._urls.add(str(httpx.URL(url)))

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(str(a) in self._urls for a in record.args):
            record.args = tuple(_origin(str(a)) if str(a) in self._urls else a for a in record.args)
        return True


def _origin(url: str) -> str:
    """scheme://host[:port], without the credentials, path and query a secret may be in."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _described(error: Exception, url: str) -> str:
    """What went wrong, without the URL's path or query: a webhook (Slack's, say) carries its
    secret token there, and httpx's messages quote the whole URL."""
    if isinstance(error, httpx.HTTPStatusError):
        return f"HTTP {error.response.status_code}"
    return f"{type(error).__name__} ({_origin(url)})"


class BudgetAlerts:
    def __init__(
        self,
        events: EventSink,
        telemetry: Telemetry,
        webhook_url: str | None = None,
        webhook_timeout_seconds: float = 2.0,
    ) -> None:
        self._events = events
        self._telemetry = telemetry
        self._url = webhook_url
        self._hides_path: _HidesWebhookPaths | None = None
        if webhook_url is not None:
            self._hides_path = _HidesWebhookPaths(webhook_url)
            logging.getLogger("httpx").addFilter(self._hides_path)
        self._timeout = webhook_timeout_seconds
        self._client: httpx.AsyncClient | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._closed = False
        self.delivered = 0
        self.failed_deliveries = 0

    def check(self, tenant: str, budget: Budget, moved: Movement) -> None:
        for period, (before, after) in moved.items():
            soft = soft_budget(budget, period)
            if soft is not None and _crossed(soft, before, after):
                self._raise(tenant, period, soft, after)

    def _raise(self, tenant: str, period: Period, soft: float, spent: float) -> None:
        alert = {"alert": "soft_budget_crossed", "tenant": tenant, "period": period.value,
                 "soft_budget_usd": soft, "spent_usd": spent, "at": time.time()}  # fmt: skip
        log.warning(
            "tenant %s crossed its %s soft budget of %.6g USD (spent %.6g USD)",
            tenant, _ADJECTIVE[period], soft, spent, extra={"event": "budget_alert", **alert},
        )  # fmt: skip
        self._events.emit("budget_alert", alert)
        self._telemetry.budget_alert(tenant, period.value)
        if self._url is not None and self._closed:
            # A settle finishing during shutdown: posting would open a client nobody closes,
            # or use the closed one (a RuntimeError no one awaits). Log the loss instead.
            self.failed_deliveries += 1
            log.error("budget alert webhook not sent, the alerts were closed",
                      extra={"tenant": tenant})  # fmt: skip
        elif self._url is not None:
            # The request that crossed the budget does not wait for the webhook.
            task = asyncio.create_task(self._post(alert))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    async def _post(self, alert: dict[str, Any]) -> None:
        assert self._url is not None
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        try:
            response = await self._client.post(self._url, json=alert)
            response.raise_for_status()
        except Exception as error:  # an HTTPError, or httpx raising on a URL it cannot use
            # No one awaits this task: whatever went wrong is counted and logged here.
            self.failed_deliveries += 1
            log.error("budget alert webhook failed: %s", _described(error, self._url),
                      extra={"tenant": alert["tenant"]})  # fmt: skip
            return
        self.delivered += 1

    async def drain(self) -> None:
        """Waits for the webhook deliveries under way."""
        if self._deliveries:
            await asyncio.gather(*self._deliveries, return_exceptions=True)

    async def aclose(self) -> None:
        self._closed = True  # before draining: an alert raised meanwhile cannot be missed
        await self.drain()
        if self._client is not None:
            await self._client.aclose()
        if self._hides_path is not None:  # after the last post and its log line
            logging.getLogger("httpx").removeFilter(self._hides_path)
