"""A small HTTP server on 127.0.0.1 (aiohttp, in a background thread) for the demo, tests and
benchmarks: static bodies, custom handlers and an optional per-request latency."""
from __future__ import annotations

import asyncio
import threading
from typing import Awaitable, Callable, Optional

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LocalServer:
    """Serve ``files`` (path -> bytes) and ``handlers`` (path -> coroutine) on 127.0.0.1.

    ``latency()`` returns seconds to wait before answering each request (e.g. a lognormal draw).
    Use as a context manager; ``url(path)`` gives the full URL.
    """

    def __init__(self, files: Optional[dict[str, bytes]] = None, handlers: Optional[dict[str, Handler]] = None,
                 latency: Optional[Callable[[], float]] = None, content_type: str = "application/octet-stream"):
        self.files = dict(files or {})
        self.handlers = dict(handlers or {})
        self.latency = latency
        self.content_type = content_type
        self.port: Optional[int] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._runner: Optional[web.AppRunner] = None
        self._ready = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if self.latency is not None:
            await asyncio.sleep(self.latency())
        path = request.path.lstrip("/")
        if path in self.handlers:
            return await self.handlers[path](request)
        body = self.files.get(path)
        if body is None:
            return web.Response(status=404, text="not found")
        return web.Response(body=body, content_type=self.content_type)

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=4096)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def start(self) -> "LocalServer":
        self._thread = threading.Thread(target=self._serve, name="mmcurate-local-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("local server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
