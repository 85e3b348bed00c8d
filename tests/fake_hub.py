"""A local stand-in for the Hugging Face Hub's API, for publish tests (no network here).

It answers the calls huggingface_hub makes to publish: model_info (files, card tags, head),
list_repo_commits, create_repo, preupload (weights and files of 1 MiB or more go the LFS way, as the
hub sends them), the git-LFS batch API with its upload and verify actions, and create_commit, which
checks the parent commit as the hub does. It keeps what arrives in memory so tests can assert on it,
and records any call it does not serve in `app.state.unexpected`. Reached through HF_ENDPOINT,
exactly as a mirror would be. huggingface_hub's Xet transfer is not served: tests switch it off
(HF_HUB_DISABLE_XET), so large files take the LFS protocol.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

LFS_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _front_matter_tags(text: str) -> list[str]:
    if not text.startswith("---") or text.count("---") < 2:
        return []
    return (yaml.safe_load(text.split("---", 2)[1]) or {}).get("tags") or []


def create_fake_hub() -> FastAPI:
    app = FastAPI()
    # repo id -> {"private", "files": {path: bytes}, "lfs": set of LFS paths, "auth": [...],
    #             "commits": [{"id", "title"}] newest first}
    app.state.repos = {}
    app.state.objects = {}  # LFS oid -> bytes, as uploaded
    app.state.unexpected = []

    def new_repo(private: bool) -> dict:
        return {"private": private, "files": {}, "lfs": set(), "auth": [], "commits": []}

    def head(repo: dict) -> str | None:
        return repo["commits"][0]["id"] if repo["commits"] else None

    def not_found() -> JSONResponse:
        return JSONResponse({"error": "Repository not found"}, status_code=404,
                            headers={"X-Error-Code": "RepoNotFound"})

    @app.post("/api/repos/create")
    async def create(request: Request):
        body = await request.json()
        repo = f"{body.get('organization') or 'me'}/{body['name']}" if "/" not in body["name"] \
            else body["name"]
        # huggingface_hub 2.x sends "visibility"; older clients sent "private".
        private = body.get("visibility", "private" if body.get("private") else "public") == "private"
        app.state.repos.setdefault(repo, new_repo(private))
        app.state.repos[repo]["auth"].append(request.headers.get("authorization"))
        return {"url": f"{request.base_url}{repo}", "name": repo}

    @app.get("/api/models/{owner}/{name}")
    async def model_info(owner: str, name: str, request: Request):
        repo = app.state.repos.get(f"{owner}/{name}")
        if repo is None:
            return not_found()
        repo["auth"].append(request.headers.get("authorization"))
        readme = repo["files"].get("README.md", b"").decode(errors="replace")
        return {"id": f"{owner}/{name}", "_id": "0", "modelId": f"{owner}/{name}", "sha": head(repo),
                "private": repo["private"], "siblings": [{"rfilename": f} for f in sorted(repo["files"])],
                "cardData": {"tags": _front_matter_tags(readme)}, "tags": []}

    @app.get("/api/models/{owner}/{name}/commits/{revision}")
    async def commits(owner: str, name: str, revision: str):
        repo = app.state.repos.get(f"{owner}/{name}")
        if repo is None:
            return not_found()
        return [{"id": c["id"], "title": c["title"], "message": "", "authors": [],
                 "date": "2026-11-25T00:00:00.000Z"} for c in repo["commits"]]

    @app.post("/api/models/{owner}/{name}/preupload/{revision}")
    async def preupload(owner: str, name: str, revision: str, request: Request):
        files = (await request.json())["files"]
        return {"files": [{"path": f["path"], "shouldIgnore": False,
                           "uploadMode": "lfs" if f["path"].endswith(LFS_EXTENSIONS)
                           or f["size"] >= 2**20 else "regular"} for f in files]}

    @app.post("/{owner}/{name}.git/info/lfs/objects/batch")
    async def lfs_batch(owner: str, name: str, request: Request):
        body = await request.json()
        assert body["operation"] == "upload", body
        auth = request.headers.get("authorization")
        app.state.repos.get(f"{owner}/{name}", new_repo(True))["auth"].append(auth)
        base = str(request.base_url).rstrip("/")
        return {"transfer": "basic", "objects": [
            {"oid": o["oid"], "size": o["size"], "authenticated": True, "actions": {
                "upload": {"href": f"{base}/lfs-objects/{o['oid']}", "header": {}},
                "verify": {"href": f"{base}/lfs-verify", "header": {}}}}
            for o in body["objects"] if o["oid"] not in app.state.objects]}

    @app.put("/lfs-objects/{oid}")
    async def lfs_put(oid: str, request: Request):
        data = await request.body()
        if hashlib.sha256(data).hexdigest() != oid:
            return JSONResponse({"message": "content does not match its oid"}, status_code=422)
        app.state.objects[oid] = data
        return Response(status_code=200)

    @app.post("/lfs-verify")
    async def lfs_verify(request: Request):
        body = await request.json()
        stored = app.state.objects.get(body["oid"])
        if stored is None or len(stored) != body["size"]:
            return JSONResponse({"message": "object not uploaded"}, status_code=404)
        return {"message": "ok"}

    @app.post("/api/models/{owner}/{name}/commit/{revision}")
    async def commit(owner: str, name: str, revision: str, request: Request):
        repo = app.state.repos.get(f"{owner}/{name}")
        if repo is None:
            return not_found()
        repo["auth"].append(request.headers.get("authorization"))
        lines = [json.loads(line) for line in (await request.body()).decode().splitlines()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        parent = header.get("parentCommit")
        if parent is not None and parent != head(repo):
            return JSONResponse({"error": "A commit has happened since. Please refresh and try "
                                 "again."}, status_code=412)
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                repo["files"][value["path"]] = base64.b64decode(value["content"])
                repo["lfs"].discard(value["path"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in app.state.objects:
                    return JSONResponse({"error": f"LFS object {value['oid']} is missing"}, 400)
                repo["files"][value["path"]] = app.state.objects[value["oid"]]
                repo["lfs"].add(value["path"])
        oid = secrets.token_hex(20)
        repo["commits"].insert(0, {"id": oid, "title": header["summary"]})
        return {"commitUrl": f"{request.base_url}{owner}/{name}/commit/{oid}",
                "commitOid": oid, "success": True}

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request):  # the client checks a README's front matter
        return {"errors": [], "warnings": []}

    @app.get("/api/agent-harnesses")
    async def harnesses():  # queried by huggingface_hub 2.x for its user agent; nothing to offer
        return {"standardEnvVars": [], "harnesses": {}}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "HEAD", "DELETE"])
    async def other(path: str, request: Request):
        app.state.unexpected.append(f"{request.method} /{path}")
        return JSONResponse({"error": f"fake hub does not serve {request.method} /{path}"}, 404)

    return app


def seed_repo(app: FastAPI, repo_id: str, files: dict[str, bytes], title: str = "initial") -> str:
    """A repo that already holds `files` in one commit by someone else; returns its head."""
    repo = app.state.repos.setdefault(repo_id, {"private": True, "files": {}, "lfs": set(),
                                                "auth": [], "commits": []})
    repo["files"].update(files)
    oid = secrets.token_hex(20)
    repo["commits"].insert(0, {"id": oid, "title": title})
    return oid
