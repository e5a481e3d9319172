"""The control actor: reload requests from replicas to the driver, pins, replica reports."""

from __future__ import annotations

import asyncio
import time

CONTROL_NAMESPACE = "mpt-export"


class Control:
    """A named actor the driver owns (it dies with the driver). Replicas fetch pins and report the digest they serve
    here, and ask for reloads, which the driver takes (:meth:`take`), performs and answers (:meth:`answer`)."""

    def __init__(self):
        self.pins: dict[str, dict] = {}
        self.reports: dict[str, dict] = {}
        self.waiting: list = []  # futures of reload requests not taken yet
        self.taken: list = []  # futures of requests the reload in progress answers
        self.wake = None

    def _event(self) -> asyncio.Event:
        if self.wake is None:
            self.wake = asyncio.Event()
        return self.wake

    async def pin(self, pin: dict) -> None:
        self.pins[pin["digest"]] = pin

    async def keep_only(self, digests: list[str]) -> None:
        for d in [d for d in self.pins if d not in digests]:
            del self.pins[d]

    async def pinned(self, digest: str) -> dict | None:
        return self.pins.get(digest)

    async def report(self, replica: str, digest: str, pid: int) -> None:
        self.reports[replica] = {"digest": digest, "pid": pid, "time": time.time()}

    async def replica_reports(self) -> dict:
        return dict(self.reports)

    async def request_reload(self, timeout: float) -> dict:
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self._event().set()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            return {"error": {"status": 504, "code": "reload_timeout",
                              "message": f"the service did not finish the reload within {timeout:g} s"}}

    async def take(self, timeout: float) -> int:
        """(driver) Wait up to ``timeout`` s for reload requests; -> how many the next :meth:`answer` answers."""
        if not self.waiting:
            self._event().clear()
            try:
                await asyncio.wait_for(self._event().wait(), timeout)
            except asyncio.TimeoutError:
                pass
        self.taken, self.waiting = self.taken + self.waiting, []
        return len(self.taken)

    async def answer(self, result: dict) -> None:
        for fut in self.taken:
            if not fut.done():
                fut.set_result(result)
        self.taken = []
