"""api.server.CoalescingTransport: an answer's writes leave in one send, in order, and nothing is
lost when the connection closes right after them."""

from __future__ import annotations

import asyncio

from api.server import CoalescingTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.sent.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def test_writes_of_one_turn_leave_in_one_send() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    assert raw.sent == []
    await asyncio.sleep(0)
    assert raw.sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    transport.write(b"next")
    await asyncio.sleep(0)
    assert raw.sent[1:] == [b"next"]
    assert transport.get_extra_info("peername") == "info:peername"


async def test_close_sends_what_is_pending_first() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"head")
    transport.write(b"body")
    transport.close()
    assert raw.sent == [b"headbody"] and raw.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing left to send
    assert raw.sent == [b"headbody"]
