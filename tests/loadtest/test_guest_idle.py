"""loadtest.guest_idle: what the benchmarks hold of the guest's halt polling, and that they put
the machine's value back; on files laid out as the kernel's sysfs lays them out."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.guest_idle import KERNEL_DEFAULT_NS, HaltPolling, parse_setting


def sysfs(tmp_path: Path, value: str = "0", driver: str = "haltpoll") -> tuple[Path, Path]:
    param, current = tmp_path / "guest_halt_poll_ns", tmp_path / "current_driver"
    param.write_text(value + "\n")
    current.write_text(driver + "\n")
    return param, current


def test_holds_the_value_while_it_runs_and_puts_the_machines_back(tmp_path: Path) -> None:
    param, driver = sysfs(tmp_path)
    with HaltPolling(KERNEL_DEFAULT_NS, param=param, driver=driver) as halt:
        assert param.read_text() == str(KERNEL_DEFAULT_NS)
        with halt.as_found() as differs:
            assert differs
            assert param.read_text() == "0"
        assert param.read_text() == str(KERNEL_DEFAULT_NS)
    assert param.read_text() == "0"
    assert halt.report() == {"cpuidle_driver": "haltpoll", "guest_halt_poll_ns_found": 0,
                             "guest_halt_poll_ns_held": KERNEL_DEFAULT_NS, "left_because": None}


def test_the_machines_value_comes_back_when_the_bench_fails(tmp_path: Path) -> None:
    param, driver = sysfs(tmp_path)
    with pytest.raises(KeyboardInterrupt), \
            HaltPolling(5000, param=param, driver=driver) as halt, halt.as_found():
        raise KeyboardInterrupt
    assert param.read_text() == "0"


def test_the_value_already_there_is_left_alone(tmp_path: Path) -> None:
    param, driver = sysfs(tmp_path, str(KERNEL_DEFAULT_NS))
    with HaltPolling(KERNEL_DEFAULT_NS, param=param, driver=driver) as halt, \
            halt.as_found() as differs:
        assert not differs  # nothing to measure twice
    assert halt.held is None and halt.found == KERNEL_DEFAULT_NS


@pytest.mark.parametrize(("want", "value", "driver", "because"), [
    (None, "0", "haltpoll", "left as found"),
    (KERNEL_DEFAULT_NS, "0", "acpi_idle", "the cpuidle driver is 'acpi_idle', not haltpoll"),
])
def test_says_why_it_left_the_machines_value(
    tmp_path: Path, want: int | None, value: str, driver: str, because: str
) -> None:
    param, current = sysfs(tmp_path, value, driver)
    with HaltPolling(want, param=param, driver=current) as halt:
        assert param.read_text().strip() == value
    assert halt.held is None
    assert halt.why_not is not None and halt.why_not.startswith(because)


def test_a_machine_without_the_parameter(tmp_path: Path) -> None:
    with HaltPolling(KERNEL_DEFAULT_NS, param=tmp_path / "missing",
                     driver=tmp_path / "missing-too") as halt:
        pass
    assert halt.found is None and halt.held is None
    assert halt.why_not == f"no guest halt polling here ({tmp_path / 'missing'}: FileNotFoundError)"


def test_a_parameter_it_cannot_write(tmp_path: Path) -> None:
    param, driver = sysfs(tmp_path)
    blocked = HaltPolling(KERNEL_DEFAULT_NS, param=param, driver=driver)
    blocked._write = _refuse  # type: ignore[method-assign]  # as sysfs answers without root
    with blocked:
        pass
    assert blocked.held is None and param.read_text() == "0\n"
    assert blocked.why_not == (f"cannot write {param} (Permission denied); needs root")


def test_a_value_the_kernel_refuses(tmp_path: Path) -> None:
    param, driver = sysfs(tmp_path)
    refused = HaltPolling(KERNEL_DEFAULT_NS, param=param, driver=driver)
    refused._write = _invalid  # type: ignore[method-assign]
    with refused:
        pass
    assert refused.held is None and param.read_text() == "0\n"
    assert refused.why_not == f"cannot write {KERNEL_DEFAULT_NS} to {param} (Invalid argument)"


def _invalid(value: int) -> None:
    raise OSError(22, "Invalid argument")


def _refuse(value: int) -> None:
    raise PermissionError(13, "Permission denied")


@pytest.mark.parametrize("text", ["-1", "fast", "1.5", "10000000001", "1000000001", ""])
def test_a_bad_setting_is_named(text: str) -> None:
    with pytest.raises(ValueError, match=f"--guest-halt-poll-ns {text!r}: expected nanoseconds"):
        parse_setting(text)


def test_settings() -> None:
    assert parse_setting("found") is None
    assert parse_setting("0") == 0
    assert parse_setting("200000") == KERNEL_DEFAULT_NS
