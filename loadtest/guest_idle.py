"""The guest kernel's halt polling, held at a chosen value while a benchmark runs.

On a KVM guest, cpuidle's haltpoll driver lets an idle vCPU poll for up to
`guest_halt_poll_ns` before it halts, and a halted vCPU leaves the guest: waking it again goes
through the host's scheduler. The kernel's default is 200 µs. A host may boot its guests with 0
(this machine's does, on the kernel command line), and then every pause of a few microseconds
between two events of a worker costs an exit to the host and a wake-up. On this machine, in
paired 5-s rounds at 2,000 chats/s, that roughly doubled the gateway's median overhead and
added about a millisecond to its p99, and the wake-ups showed up as the worker's own CPU time.

The benchmarks hold the kernel's default while they run, when the machine lets them (root, and
the haltpoll driver in use), put the machine's value back when they end, and say in their JSON
what they found and what they held; `make bench` also measures the overhead once more with the
value it found.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

PARAM = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
DRIVER = Path("/sys/devices/system/cpu/cpuidle/current_driver")
KERNEL_DEFAULT_NS = 200_000
MAX_NS = 1_000_000_000  # the kernel takes up to 2**32 - 1; a second is already far past any use
AS_FOUND = "found"
OPTION = "--guest-halt-poll-ns"
OPTION_HELP = (f"the guest's halt polling held while the bench runs (loadtest/guest_idle.py), "
               f"{KERNEL_DEFAULT_NS} ns (the kernel's default) unless given; '{AS_FOUND}' leaves "
               "the machine's value")


def parse_setting(text: str) -> int | None:
    """`--guest-halt-poll-ns`: nanoseconds to hold (0 to 1 s), or `found` to leave it."""
    if text == AS_FOUND:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_NS:
        raise ValueError(f"{OPTION} {text!r}: expected nanoseconds (0 to {MAX_NS}) "
                         f"or {AS_FOUND!r}")
    return value


class HaltPolling:
    """`with HaltPolling(want):` holds `want` ns (None: leaves the machine's value) and puts
    the value it found back on the way out; `as_found()` puts it back for a while."""

    def __init__(self, want: int | None, *, param: Path = PARAM, driver: Path = DRIVER) -> None:
        self._want = want
        self._param = param
        self._driver = driver
        self.found: int | None = None
        self.held: int | None = None  # what it wrote in place of `found`
        self._holding = False
        self.why_not: str | None = None  # why the machine's value was left as it is
        self.driver_name: str | None = None

    def __enter__(self) -> HaltPolling:
        try:
            self.driver_name = self._driver.read_text().strip()
        except OSError:
            self.driver_name = None
        try:
            self.found = int(self._param.read_text().strip())
        except (OSError, ValueError) as exc:
            self.why_not = f"no guest halt polling here ({self._param}: {exc.__class__.__name__})"
            return self
        if self._want is None:
            self.why_not = f"left as found ({OPTION} {AS_FOUND})"
        elif self.driver_name != "haltpoll":
            self.why_not = f"the cpuidle driver is {self.driver_name!r}, not haltpoll"
        elif self._want != self.found:
            try:
                self._write(self._want)
            except PermissionError as exc:
                self.why_not = f"cannot write {self._param} ({exc.strerror or exc}); needs root"
            except OSError as exc:
                self.why_not = f"cannot write {self._want} to {self._param} ({exc.strerror or exc})"
            else:
                self.held, self._holding = self._want, True
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._holding and self.found is not None:
            self._write(self.found)
            self._holding = False

    @contextlib.contextmanager
    def as_found(self) -> Iterator[bool]:
        """The machine's own value for the duration; yields whether it differs from the held
        one (if not, there is nothing to measure twice)."""
        held = self.held
        if not self._holding or held is None or self.found is None:
            yield False
            return
        self._write(self.found)
        try:
            yield True
        finally:
            self._write(held)

    def report(self) -> dict[str, Any]:
        return {"cpuidle_driver": self.driver_name, "guest_halt_poll_ns_found": self.found,
                "guest_halt_poll_ns_held": self.held, "left_because": self.why_not}

    def _write(self, value: int) -> None:
        self._param.write_text(str(value))
