"""A small HTTP server for the viewer, on localhost only.

It answers as circuit-tracer's `local_server` does, so the unmodified pages work: the frontend at
`/`, and the exported graphs at both `/data/` (graph-metadata.json) and `/graph_data/` (graphs and
feature files); `POST /save_graph/<slug>` stores the page's Save button state in that graph's
`qParams`. Unlike circuit-tracer's server it binds 127.0.0.1 by default, never serves a file
outside its two directories, and refuses (403) a save from another origin or for another Host.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from emc.viewer.errors import NoExportedGraphsError
from emc.viewer.frontend import build_frontend
from emc.viewer.layout import INDEX_FILE

DEFAULT_PORT = 8032
DATA_PREFIXES = ("/data/", "/graph_data/")
_SLUG = re.compile(r"^[A-Za-z0-9._-]+$")


class ViewerHandler(SimpleHTTPRequestHandler):
    def __init__(
        self, *args, frontend_dir: Path, graph_dir: Path, bound_host: str, **kwargs
    ) -> None:
        self.graph_dir = graph_dir
        self.bound_host = bound_host  # as given: the socket only knows the address it resolved to
        super().__init__(*args, directory=str(frontend_dir), **kwargs)

    def translate_path(self, path: str) -> str:
        for prefix in DATA_PREFIXES:
            if path.startswith(prefix):
                return str(_inside(self.graph_dir, path[len(prefix) :]))
        return super().translate_path(path)

    def end_headers(self) -> None:
        # The page fetches with cache: 'force-cache'; a re-export must show without a hard reload.
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def do_POST(self) -> None:
        # Any web page the browser has open can POST here, and a rebound DNS name can reach us
        # too: only the viewer's own page, at our own address, may write to the graph files.
        bound, port = self.server.server_address[:2]
        names = {"127.0.0.1", "localhost", self.bound_host, str(bound)}
        refusal = _foreign_request(
            self.headers.get("Host"), self.headers.get("Origin"), names, port
        )
        if refusal is not None:
            self.send_error(HTTPStatus.FORBIDDEN, explain=refusal)
            return
        path = urlsplit(self.path).path
        slug = path.removeprefix("/save_graph/")
        target = self.graph_dir / f"{slug}.json"
        if not path.startswith("/save_graph/") or not _SLUG.match(slug) or not target.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            state = json.loads(self.rfile.read(length))["qParams"]
            graph = json.loads(target.read_text(encoding="utf-8"))
        except (ValueError, KeyError, TypeError):
            self.send_error(HTTPStatus.BAD_REQUEST)
            return
        graph["qParams"] = state
        target.write_text(json.dumps(graph), encoding="utf-8")
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args) -> None:
        pass  # one line per request would bury the URL the command prints


class ViewerServer:
    """An HTTP server for one frontend directory and one directory of exported graphs."""

    def __init__(
        self, frontend_dir: Path, graph_dir: Path, port: int = DEFAULT_PORT, host: str = "127.0.0.1"
    ) -> None:
        handler = functools.partial(
            ViewerHandler,
            frontend_dir=Path(frontend_dir),
            graph_dir=Path(graph_dir),
            bound_host=host,
        )
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/index.html"

    def serve_forever(self) -> None:
        """Serve in this thread until `stop` or KeyboardInterrupt."""
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()


@contextmanager
def open_viewer(
    graph_dir: str | Path,
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    cache_dir: str | Path | None = None,
) -> Iterator[ViewerServer]:
    """Build the offline frontend in a temporary directory and make a server for `graph_dir`.

    The caller serves (`serve_forever` or `start`); leaving the block closes the server and
    deletes the frontend. Raises NoExportedGraphsError, AssetError, or OSError when the port is
    taken.
    """
    graph_dir = Path(graph_dir)
    if not (graph_dir / INDEX_FILE).is_file():
        raise NoExportedGraphsError(
            f"{graph_dir} holds no exported graphs ({INDEX_FILE} is missing): run "
            "`emc graph export PROMPT_ID` first"
        )
    frontend = Path(tempfile.mkdtemp(prefix="emc-viewer-"))
    try:
        build_frontend(frontend, cache_dir)
        server = ViewerServer(frontend, graph_dir, port, host)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(frontend, ignore_errors=True)


def _foreign_request(
    host: str | None, origin: str | None, names: set[str], port: int
) -> str | None:
    """Why a save request is refused (a short reason), or None when it comes from our own page.

    Host must be one of `names` with the bound port. An Origin, when sent, must be http:// one
    of those; old browsers and curl send none, and a cross-site browser request always does.
    """
    own = {f"{name.lower()}:{port}" for name in names}
    if (host or "").lower() not in own:
        return f"Host {host!r} is not this server"
    if origin is not None and origin.lower() not in {f"http://{h}" for h in own}:
        return f"Origin {origin!r} is not this server's page"
    return None


def _inside(root: Path, url_path: str) -> Path:
    """`url_path` under `root`; empty, '.' and '..' parts are dropped, so it cannot leave it."""
    path = unquote(url_path.split("?", 1)[0].split("#", 1)[0])
    parts = [p for p in path.split("/") if p not in ("", ".", "..")]
    return root.joinpath(*parts)
