"""A TCP relay in front of a test server on 127.0.0.1, for breaking connections on purpose."""

from __future__ import annotations

import select
import socket
import ssl
import threading


class Relay:
    """Relays connections to ``127.0.0.1:port`` (optionally terminating TLS). A test can
    cut every connection, hold back what the server sends (``hold``: RabbitMQ's confirms),
    or lose one reply: ``drop_reply`` closes the connection that carries the server's next
    bytes instead of passing them on (the command ran; its reply never arrives)."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None) -> None:
        self.target = ("127.0.0.1", port)
        self.context = context
        self.hold = threading.Event()
        self.drop_reply = threading.Event()
        self.dropped = 0
        self.connections: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        # One thread per connection, so that a TLS socket is never used by two threads.
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        with client, upstream:
            try:
                down = self.context.wrap_socket(client, server_side=True) if self.context else client
            except OSError:
                return
            self.connections.append(down)
            with down:
                self._pump(down, upstream)

    def _pump(self, down: socket.socket, upstream: socket.socket) -> None:
        held = b""
        try:
            while True:
                pending = isinstance(down, ssl.SSLSocket) and down.pending()
                ready = [down] if pending else select.select([down, upstream], [], [], 0.05)[0]
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return
                    if source is down:
                        upstream.sendall(data)
                    elif self.drop_reply.is_set():
                        self.drop_reply.clear()
                        self.dropped += 1
                        return
                    else:
                        held += data
                if held and not self.hold.is_set():
                    down.sendall(held)
                    held = b""
        except OSError:
            return

    def cut(self) -> None:
        for connection in self.connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.connections.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()
