"""A local git host over HTTP that demands Basic auth, for publish tests: git's own `http-backend`
(the smart HTTP protocol) behind a small WSGI server, plus the git-LFS batch API and object store
that git-lfs pushes weights to. It stands in for OpenXLab's git server, which takes the same
`Authorization: Basic` header the kit sends.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


class GitHost:
    """Serves bare repositories under `root` at http://127.0.0.1:PORT/OWNER/NAME.git."""

    def __init__(self, root: Path, user: str, token: str):
        self.root, self.objects = root, root / "lfs-objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.expected = "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()
        self.refused = 0  # requests turned away for missing or wrong credentials
        self.server = make_server("127.0.0.1", 0, self.app, handler_class=_Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> GitHost:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def app(self, environ, start_response):
        if environ.get("HTTP_AUTHORIZATION") != self.expected:
            self.refused += 1
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="git"'),
                                                ("Content-Type", "text/plain")])
            return [b"authentication required\n"]
        path = environ["PATH_INFO"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        if path.endswith("/info/lfs/objects/batch"):
            return self._batch(json.loads(body), start_response)
        if path.startswith("/lfs/"):
            return self._object(environ["REQUEST_METHOD"], path.rsplit("/", 1)[1], body, start_response)
        return self._git(environ, body, start_response)

    def _batch(self, request: dict, start_response):
        # The actions carry no credentials: git-lfs sends git's own (http.extraHeader) with them.
        objects = []
        for obj in request["objects"]:
            href = f"{self.url}/lfs/{obj['oid']}"
            stored = self.objects / obj["oid"]
            if request["operation"] == "upload":
                actions = {} if stored.is_file() else {"upload": {"href": href}}
            else:
                actions = {"download": {"href": href}}
            objects.append({"oid": obj["oid"], "size": obj["size"], "authenticated": True,
                            "actions": actions})
        start_response("200 OK", [("Content-Type", "application/vnd.git-lfs+json")])
        return [json.dumps({"transfer": "basic", "objects": objects}).encode()]

    def _object(self, method: str, oid: str, body: bytes, start_response):
        stored = self.objects / oid
        if method == "PUT":
            if hashlib.sha256(body).hexdigest() != oid:
                start_response("422 Unprocessable Entity", [])
                return [b""]
            stored.write_bytes(body)
            start_response("200 OK", [])
            return [b""]
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [stored.read_bytes()]

    def _git(self, environ, body: bytes, start_response):
        env = {
            "GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": environ["PATH_INFO"], "REQUEST_METHOD": environ["REQUEST_METHOD"],
            "QUERY_STRING": environ.get("QUERY_STRING", ""),
            "CONTENT_TYPE": environ.get("CONTENT_TYPE", ""), "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": "publisher", "REMOTE_ADDR": "127.0.0.1",
            "HTTP_CONTENT_ENCODING": environ.get("HTTP_CONTENT_ENCODING", ""),
            "GIT_PROTOCOL": environ.get("HTTP_GIT_PROTOCOL", ""),
        }
        run = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True)
        head, _, payload = run.stdout.partition(b"\r\n\r\n")
        status, headers = "200 OK", []
        for line in head.decode().split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = value.strip()
            elif key:
                headers.append((key, value.strip()))
        start_response(status, headers)
        return [payload]
