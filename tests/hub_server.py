"""A local stand-in for the model hub's HTTP API, as huggingface_hub's client uses it (tests only).

It stands in for huggingface.co's repo creation, preupload, commit, branch, repo-info and file-download
routes, enough for `HfApi.create_repo / create_branch / create_commit` and `snapshot_download` to make a real
round trip on 127.0.0.1. Repos live in memory with a commit history per branch. Every file travels inside the
commit as base64 ("regular" upload mode), so no LFS or Xet storage is involved; preupload returns each stored
file's git blob sha1, which lets the client skip unchanged files. Not implemented: LFS/Xet, pull requests,
deletions beyond single files, auth checks (the Authorization header is only recorded), spaces and datasets.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, list[dict]]] = {}  # repo -> branch -> commits [{oid, files}]
        self.requests: list[dict] = []
        self.fail_commits = 0  # answer the next N commits with HTTP 500
        self.lock = threading.Lock()

    def head(self, repo: str, rev: str) -> dict | None:
        """The commit a branch name or a commit id points at."""
        branches = self.repos.get(repo, {})
        if rev in branches:
            return branches[rev][-1] if branches[rev] else None
        for commits in branches.values():
            for commit in commits:
                if commit["oid"] == rev:
                    return commit
        return None

    def commit_count(self, repo: str, rev: str = "main") -> int:
        return len(self.repos.get(repo, {}).get(rev, [])) - 1  # minus the initial empty commit


class Handler(BaseHTTPRequestHandler):
    state: HubState
    endpoint: str

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes | dict | None = None, headers: dict | None = None) -> None:
        data = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if isinstance(body, dict):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _record(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.state.lock:
            self.state.requests.append(
                {"method": self.command, "path": self.path, "headers": dict(self.headers)}
            )
        return body

    def _split(self, rest: str, marker: str) -> tuple[str, str]:
        repo, _, tail = rest.partition(f"/{marker}/")
        return unquote(repo), unquote(tail)

    def do_POST(self) -> None:
        body = self._record()
        path = urlparse(self.path).path
        st = self.state
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            url = {"url": f"{self.endpoint}/{repo}", "name": repo}
            with st.lock:
                if repo in st.repos:
                    return self._send(409, {"error": "You already created this model repo", **url})
                st.repos[repo] = {"main": [{"oid": hashlib.sha1(repo.encode()).hexdigest(), "files": {}}]}
            return self._send(200, url)
        if path == "/api/validate-yaml":
            return self._send(200, {})
        if path.startswith("/api/models/") and "/preupload/" in path:
            repo, rev = self._split(path[len("/api/models/") :], "preupload")
            head = st.head(repo, rev)
            if head is None:
                return self._send(404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_sha1(head["files"][f["path"]]) if f["path"] in head["files"] else None,
                }
                for f in json.loads(body)["files"]
            ]
            return self._send(200, {"files": files, "commitOid": head["oid"]})
        if path.startswith("/api/models/") and "/commit/" in path:
            repo, rev = self._split(path[len("/api/models/") :], "commit")
            with st.lock:
                if st.fail_commits > 0:
                    st.fail_commits -= 1
                    return self._send(500, {"error": "injected failure"})
                head = st.head(repo, rev)
                if head is None:
                    return self._send(404, {"error": "not found"}, {"X-Error-Code": "RevisionNotFound"})
                files = dict(head["files"])
                summary = ""
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        summary = item["value"].get("summary", "")
                    elif item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(item["value"]["path"], None)
                    else:
                        return self._send(400, {"error": f"unsupported operation {item['key']}"})
                oid = hashlib.sha1(f"{repo}{rev}{len(st.repos[repo][rev])}{summary}".encode()).hexdigest()
                st.repos[repo][rev].append({"oid": oid, "files": files})
            return self._send(
                200,
                {
                    "commitUrl": f"{self.endpoint}/{repo}/commit/{oid}",
                    "commitOid": oid,
                    "pullRequestUrl": None,
                },
            )
        if path.startswith("/api/models/") and "/branch/" in path:
            repo, branch = self._split(path[len("/api/models/") :], "branch")
            with st.lock:
                if branch in st.repos.get(repo, {}):
                    return self._send(409, {"error": "Reference already exists"})
                st.repos[repo][branch] = [dict(st.repos[repo]["main"][-1])]
            return self._send(200, {})
        return self._send(404, {"error": f"no route {path}"})

    def do_GET(self) -> None:
        self._record()
        path = urlparse(self.path).path
        st = self.state
        if path.startswith("/api/models/") and "/tree/" in path:
            repo, tail = self._split(path[len("/api/models/") :], "tree")
            rev, _, prefix = tail.partition("/")
            head = st.head(repo, rev)
            if head is None:
                return self._send(404, {"error": "not found"}, {"X-Error-Code": "RevisionNotFound"})
            entries = [
                {"type": "file", "path": f, "size": len(d), "oid": git_sha1(d)}
                for f, d in sorted(head["files"].items())
                if f.startswith(prefix)
            ]
            data = json.dumps(entries).encode()
            return self._send(200, data, {"Content-Type": "application/json"})
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/") :]
            repo, rev = self._split(rest, "revision") if "/revision/" in rest else (unquote(rest), "main")
            head = st.head(repo, rev)
            if head is None:
                return self._send(404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})
            return self._send(
                200,
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": head["oid"],
                    "private": True,
                    "siblings": [{"rfilename": f} for f in sorted(head["files"])],
                },
            )
        if "/resolve/" in path:
            repo, tail = self._split(path.lstrip("/"), "resolve")
            rev, _, file = tail.partition("/")
            head = st.head(repo, rev)
            if head is None:
                return self._send(404, b"", {"X-Error-Code": "RevisionNotFound"})
            if file not in head["files"]:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": head["oid"]})
            data = head["files"][file]
            return self._send(
                200,
                data,
                {
                    "X-Repo-Commit": head["oid"],
                    "ETag": f'"{git_sha1(data)}"',
                    "Content-Type": "application/octet-stream",
                },
            )
        return self._send(404, {"error": f"no route {path}"})

    do_HEAD = do_GET


def start_server() -> tuple[ThreadingHTTPServer, HubState, str]:
    """Start on a free port of 127.0.0.1; returns (server, state, endpoint URL). Call server.shutdown()."""
    state = HubState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    Handler.state, Handler.endpoint = state, endpoint
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, endpoint
