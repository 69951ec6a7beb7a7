"""The stack's own checks before it starts anything."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest

from devstack.procs import StackError
from devstack.stack import Ports, Stack, StackSettings


def test_ports_in_use_are_named_with_the_way_out(tmp_path: Path) -> None:
    with socket.socket() as cmp_holder, socket.socket() as kafka_holder:
        for holder in (cmp_holder, kafka_holder):
            holder.bind(("127.0.0.1", 0))
            holder.listen()
        cmp_port, kafka_port = cmp_holder.getsockname()[1], kafka_holder.getsockname()[1]
        ports = dataclasses.replace(Ports.free(), cmp=cmp_port, kafka=kafka_port)
        stack = Stack(StackSettings(root=tmp_path, ports=ports))
        with pytest.raises(StackError) as raised:
            stack.check_ports()
    assert str(raised.value) == (
        f"port(s) already in use: cmp ({cmp_port}), kafka ({kafka_port}). Stop what uses them,"
        " or set SITEKIT_PORT_<NAME> (see the README)."
    )
    assert stack.processes == {}


def test_free_ports_pass(tmp_path: Path) -> None:
    Stack(StackSettings(root=tmp_path, ports=Ports.free())).check_ports()
