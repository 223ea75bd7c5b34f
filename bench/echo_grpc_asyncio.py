"""The gRPC echo of ../shared/tools/transport-echo (``asgi_grpc_echo:app``) on an HTTP/2 server
written in Python, for bench_transport.py's echo ceilings. Run from that directory:

    python bench/echo_grpc_asyncio.py kernelport PORT   # protocols/grpc/http2.py (the default)
    python bench/echo_grpc_asyncio.py h2 PORT           # the sans-IO h2 package, for comparison
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

sys.path.insert(0, os.getcwd())  # the echo app lives in the working directory

import uvloop
from asgi_grpc_echo import app  # type: ignore[import-not-found]


async def kernelport(port: int) -> None:
    from kernelport.protocols.grpc.http2 import Http2Server

    await Http2Server(app).start("127.0.0.1", port)
    await asyncio.Event().wait()


class H2Echo(asyncio.Protocol):
    """The same ASGI app over h2's connection state machine: one task per request."""

    def connection_made(self, transport: Any) -> None:
        import h2.config
        import h2.connection

        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.transport = transport
        self.requests: dict[int, tuple[list[tuple[bytes, bytes]], list[bytes]]] = {}
        self.answering: set[asyncio.Task[None]] = set()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        import h2.events

        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.requests[event.stream_id] = (list(event.headers), [])
            elif isinstance(event, h2.events.DataReceived):
                self.requests[event.stream_id][1].append(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                headers, body = self.requests.pop(event.stream_id)
                task = asyncio.ensure_future(self.answer(event.stream_id, headers, b"".join(body)))
                self.answering.add(task)
                task.add_done_callback(self.answering.discard)
        self.transport.write(self.conn.data_to_send())

    async def answer(self, sid: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        path = dict(headers)[b":path"].decode()
        scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        for message in sent:
            if message["type"] == "http.response.start":
                self.conn.send_headers(sid, [(b":status", b"200"), *message["headers"]])
            elif message["type"] == "http.response.body":
                self.conn.send_data(sid, message["body"])
            else:
                self.conn.send_headers(sid, message["headers"], end_stream=True)
        self.transport.write(self.conn.data_to_send())


async def h2_server(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(H2Echo, "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    which, port = sys.argv[1], int(sys.argv[2])
    uvloop.run(kernelport(port) if which == "kernelport" else h2_server(port))
