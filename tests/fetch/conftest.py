import ipaddress
import socket

import pytest


@pytest.fixture(autouse=True)
def connections(monkeypatch):
    """Every address a socket connects to; anything but loopback is blocked, so a policy bug fails the
    test instead of sending traffic off the machine."""
    seen: list[str] = []
    real_connect = socket.socket.connect

    def guarded(sock, address):
        if isinstance(address, tuple):
            seen.append(address[0])
            if not ipaddress.ip_address(address[0].partition("%")[0]).is_loopback:
                raise ConnectionRefusedError(f"test guard: refused to connect to {address[0]}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return seen
