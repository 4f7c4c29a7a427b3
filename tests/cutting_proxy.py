"""A TCP proxy for cleartext gRPC that can lose a server's response.

It reads the HTTP/2 frames going each way. It counts the calls clients start (HEADERS
frames towards the server) and, when asked to, cuts the connection at the first response
HEADERS frame of a call instead of forwarding it. gRPC sends that frame only once the
handler has returned, so a cut command has been applied by the server while its client
sees the connection fail: exactly the case that retries with the same command id are for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS = 0x1
FRAME_HEADER_BYTES = 9


class CuttingProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.calls = 0  # calls started by clients, retries included
        self.cuts = 0
        self._cuts_left = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def cut_responses(self, count: int) -> None:
        """Loses the next `count` responses, each by closing the connection that carried it."""
        self._cuts_left = count

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_writer.close()
            self._tasks.discard(task)
            return
        writers = (client_writer, server_writer)
        try:
            async with asyncio.TaskGroup() as group:  # when one direction ends, so does the other
                group.create_task(self._pipe(client_reader, server_writer, self._to_server, preface=True))
                group.create_task(self._pipe(server_reader, client_writer, self._to_client, preface=False))
        except* (ConnectionError, _Cut):
            pass
        finally:
            for writer in writers:
                writer.transport.abort()  # an RST, as when a network link or a process dies
            self._tasks.discard(task)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        inspect: Callable[[int, int], None],
        *,
        preface: bool,
    ) -> None:
        if preface:
            writer.write(await reader.readexactly(len(PREFACE)))
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                header = await reader.readexactly(FRAME_HEADER_BYTES)
                payload = await reader.readexactly(int.from_bytes(header[:3], "big"))
                frame_type, stream_id = header[3], int.from_bytes(header[5:9], "big") & 0x7FFF_FFFF
                inspect(frame_type, stream_id)
                writer.write(header + payload)
                await writer.drain()
        raise _Cut  # one side closed: close the other

    def _to_server(self, frame_type: int, stream_id: int) -> None:
        if frame_type == HEADERS and stream_id:
            self.calls += 1

    def _to_client(self, frame_type: int, stream_id: int) -> None:
        if frame_type == HEADERS and stream_id and self._cuts_left > 0:
            self._cuts_left -= 1
            self.cuts += 1
            raise _Cut


class _Cut(Exception):
    """Ends both directions of one proxied connection."""
