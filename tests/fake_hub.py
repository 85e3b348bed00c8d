"""A local stand-in for the Hugging Face Hub's upload API, for publish tests (no network here).

It answers the calls huggingface_hub makes for create_repo and create_commit, takes every file as
a "regular" (inline) upload, and keeps what arrives in memory so tests can assert on it. Reached
through HF_ENDPOINT, exactly as a mirror would be.
"""

from __future__ import annotations

import base64
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def create_fake_hub() -> FastAPI:
    app = FastAPI()
    app.state.repos = {}  # repo id -> {"private": bool, "files": {path: bytes}, "auth": [..]}

    @app.post("/api/repos/create")
    async def create(request: Request):
        body = await request.json()
        repo = f"{body.get('organization') or 'me'}/{body['name']}" if "/" not in body["name"] \
            else body["name"]
        # huggingface_hub 2.x sends "visibility"; older clients sent "private".
        private = body.get("visibility", "private" if body.get("private") else "public") == "private"
        app.state.repos.setdefault(repo, {"private": private, "files": {}, "auth": []})
        app.state.repos[repo]["auth"].append(request.headers.get("authorization"))
        return {"url": f"{request.base_url}{repo}", "name": repo}

    @app.post("/api/models/{owner}/{name}/preupload/{revision}")
    async def preupload(owner: str, name: str, revision: str, request: Request):
        files = (await request.json())["files"]
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                          for f in files]}

    @app.post("/api/models/{owner}/{name}/commit/{revision}")
    async def commit(owner: str, name: str, revision: str, request: Request):
        repo = app.state.repos.get(f"{owner}/{name}")
        if repo is None:
            return JSONResponse({"error": "Repository not found"}, status_code=404)
        repo["auth"].append(request.headers.get("authorization"))
        for line in (await request.body()).decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                value = item["value"]
                repo["files"][value["path"]] = base64.b64decode(value["content"])
        return {"commitUrl": f"{request.base_url}{owner}/{name}/commit/abc123",
                "commitOid": "abc123", "success": True}

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request):  # the client checks a README's front matter
        return {"errors": [], "warnings": []}

    @app.get("/api/agent-harnesses")
    async def harnesses():  # queried by huggingface_hub 2.x for its user agent; nothing to offer
        return {"standardEnvVars": [], "harnesses": {}}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "HEAD"])
    async def other(path: str, request: Request):
        app.state.unexpected = [*getattr(app.state, "unexpected", []), f"{request.method} /{path}"]
        return JSONResponse({"error": f"fake hub does not serve {request.method} /{path}"}, 404)

    return app
