"""uvicorn serving the API app from a thread of its own on rank 0, so the controller's MPI loop keeps
the main thread; the socket is bound in the calling thread (a port in use is a clear error on the
rank, not a failure inside the server's thread)."""
from __future__ import annotations

import threading

from launcher.network import listening_socket


class HttpServer:
    """uvicorn on a socket bound here, served from a thread of its own."""

    def __init__(self, app, host: str, port: int):
        import uvicorn

        try:
            self.sock = listening_socket(host, port)
        except OSError as e:
            raise RuntimeError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host") from None
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="pdlaunch-http", daemon=True)

    @property
    def port(self) -> int:
        """The port listened on: the one asked for, or the one the system chose for port 0."""
        return self.sock.getsockname()[1]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
