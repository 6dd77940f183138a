"""A local stand-in for huggingface.co's upload/download HTTP API, as huggingface_hub's client uses it (tests only).

It answers on 127.0.0.1 (a free port) the routes that `HfApi.create_repo / create_branch / create_commit /
repo_info / list_repo_tree / list_repo_refs / delete_repo / whoami`, `hf_hub_download` and
`snapshot_download` use, so a push and a download make a real HTTP round trip through the unmodified client
(point it here with HF_ENDPOINT; set HF_HUB_DISABLE_XET=1). Routes (TYPE is models, datasets or spaces):

    POST   /api/repos/create                       {name, organization, visibility|private, type}
    POST   /api/repos/delete                       {name, organization, type}
    POST   /api/validate-yaml                      {content, repoType}: parses the README front matter
    POST   /api/TYPE/REPO/preupload/REV            {files: [{path, sample, size}]}
    POST   /api/TYPE/REPO/commit/REV               application/x-ndjson: header, file, deletedFile, deletedFolder
    POST   /api/TYPE/REPO/branch/BRANCH            {startingPoint?}; DELETE removes it
    GET    /api/TYPE/REPO[/revision/REV]           {id, sha, private, siblings: [{rfilename}]}
    GET    /api/TYPE/REPO/tree/REV[/PATH]          ?recursive=true; [{type, path, size, oid}]
    GET    /api/TYPE/REPO/refs                     {branches: [{name, ref, targetCommit}], tags: []}
    GET    /api/whoami-v2                          {name, type}
    HEAD   /[TYPE/]REPO/resolve/REV/PATH           X-Repo-Commit, ETag, Content-Length; X-Error-Code on 404
    GET    /[TYPE/]REPO/resolve/REV/PATH           the bytes, same headers

Repos live in memory (`HubState.repos`) with a commit history per branch; a new repo starts with one commit
holding `.gitattributes`, as on the hub. Preupload answers `uploadMode: "regular"` for every file (so file
contents travel base64 inside the commit: no LFS, no Xet), `shouldIgnore: false`, and the stored file's git
blob sha1 as `oid`, which is what lets the client leave unchanged files out. The server itself never
skips: every commit request it accepts becomes a commit, even an empty one, so tests can see whether the
client sent one. Every request is recorded (method, path, headers, body). Optional behaviour for tests:
`fail_commits` (1-based numbers of commit requests to answer with HTTP 500), `valid_tokens` (others get
401 "Invalid credentials in Authorization header") and `read_only_tokens` (writes get 403).

Not implemented: LFS and Xet storage (an `lfsFile` commit line is a 400), pull requests (`create_pr`),
tags, `.gitignore` handling, file copies, pagination (one page), access control by visibility (private
repos are recorded, not enforced), gated repos, and any other API (404 "no route").
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

USER = "me"
GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
_API = re.compile(
    r"^/api/(models|datasets|spaces)/(.+?)(?:/(preupload|commit|branch|revision|tree|refs)(?:/(.*))?)?$"
)
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?(.+?)/resolve/([^/]+)/(.+)$")
_REPO_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")


def _metadata_problems(readme: str) -> list[str]:
    """What the hub would reject in a README's YAML front matter (a subset of its checks)."""
    if not readme.startswith("---"):
        return []
    parts = readme.split("---", 2)
    if len(parts) < 3:
        return ["front matter is not closed with ---"]
    import yaml  # the project depends on pyyaml

    try:
        meta = yaml.safe_load(parts[1])
    except yaml.YAMLError as err:
        return [f"Invalid YAML: {err}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["metadata must be a mapping"]
    problems = []
    bases = meta.get("base_model") or []
    for base in bases if isinstance(bases, list) else [bases]:
        if not isinstance(base, str) or not re.match(r"^[\w.-]+/[\w.-]+$", base):
            problems.append(f'"base_model" with value "{base}" is not a valid model id')
    for key in ("tags", "datasets"):
        if key in meta and not isinstance(meta[key], list):
            problems.append(f'"{key}" must be an array')
    return problems


def git_sha1(data: bytes) -> str:
    """The git blob id of data (what the hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=dict)  # branch → history, oldest first

    def resolve(self, rev: str) -> Commit | None:
        """A branch name or a commit id → the commit."""
        if rev in self.branches:
            return self.branches[rev][-1]
        for history in self.branches.values():
            for commit in history:
                if commit.oid == rev:
                    return commit
        return None


class HubState:
    """What the server holds and saw. Read it from tests; the server mutates it under `lock`."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}  # (repo_type, repo_id) → Repo
        self.requests: list[dict[str, Any]] = []
        self.commit_requests = 0  # commit POSTs received (including failed ones)
        self.fail_commits: set[int] = set()  # 1-based numbers of commit POSTs to answer with 500
        self.valid_tokens: set[str] | None = None  # None: any token (or none) is accepted
        self.read_only_tokens: set[str] = set()
        self.lock = threading.RLock()

    # -- helpers for tests -----------------------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def commit_count(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> int:
        """Commits made on branch through the commit API (not counting the commit it started from)."""
        repo = self.repo(repo_id, repo_type)
        if repo is None or branch not in repo.branches:
            return 0
        return len(repo.branches[branch]) - 1

    def files(self, repo_id: str, rev: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        repo = self.repo(repo_id, repo_type)
        commit = repo.resolve(rev) if repo else None
        return dict(commit.files) if commit else {}

    def fail_next_commit(self, n: int = 1) -> None:
        """Answer the next n commit POSTs with HTTP 500."""
        with self.lock:
            self.fail_commits |= set(range(self.commit_requests + 1, self.commit_requests + 1 + n))

    def requests_to(self, method: str, fragment: str = "") -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and fragment in r["path"]]


class _Handler(BaseHTTPRequestHandler):
    state: HubState
    endpoint: str
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    # -- plumbing --------------------------------------------------------------------------------------
    def _send(self, code: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        if isinstance(body, (dict, list)):
            data, ctype = json.dumps(body).encode(), "application/json"
        else:
            data, ctype = (body or b""), "application/octet-stream"
        self.send_response(code)
        headers = {"Content-Type": ctype, **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, code: int, message: str, error_code: str | None = None, **extra: str) -> None:
        headers = {"X-Error-Message": message, **extra}
        if error_code:
            headers["X-Error-Code"] = error_code
        self._send(code, {"error": message}, headers)

    def _read(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.state.lock:
            self.state.requests.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": dict(self.headers.items()),
                    "body": body,
                }
            )
        return body

    def _auth_ok(self, write: bool) -> bool:
        """Apply valid_tokens / read_only_tokens; answer 401/403 and return False if refused."""
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        st = self.state
        if st.valid_tokens is not None and token not in st.valid_tokens:
            self._error(401, "Invalid credentials in Authorization header")
            return False
        if write and token is not None and token in st.read_only_tokens:
            self._error(403, "You don't have the rights to write to this namespace")
            return False
        if write and token is None:
            self._error(401, "Invalid credentials in Authorization header")
            return False
        return True

    def _repo(self, rtype: str, repo_id: str) -> Repo | None:
        repo = self.state.repo(repo_id, rtype.rstrip("s"))
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
        return repo

    def _route(self) -> tuple[str, dict[str, list[str]]]:
        url = urlparse(self.path)
        return url.path, parse_qs(url.query)

    # -- methods ---------------------------------------------------------------------------------------
    def do_POST(self) -> None:
        body = self._read()
        path, query = self._route()
        if path == "/api/validate-yaml":
            return self._validate_yaml(body)
        if not self._auth_ok(write=True):
            return None
        if path in ("/api/repos/create", "/api/repos/delete"):
            return self._create_or_delete(path.endswith("create"), json.loads(body or b"{}"))
        m = _API.match(path)
        if not m:
            return self._error(404, f"no route POST {path}")
        rtype, repo_id, action, rest = m.group(1), unquote(m.group(2)), m.group(3), unquote(m.group(4) or "")
        if action == "preupload":
            return self._preupload(rtype, repo_id, rest, json.loads(body))
        if action == "commit":
            if "create_pr" in query:
                return self._error(400, "pull requests are not implemented by this stand-in")
            return self._commit(rtype, repo_id, rest, body)
        if action == "branch":
            return self._branch(rtype, repo_id, rest, json.loads(body or b"{}"))
        return self._error(404, f"no route POST {path}")

    def do_DELETE(self) -> None:
        self._read()
        path, _ = self._route()
        if not self._auth_ok(write=True):
            return None
        m = _API.match(path)
        if not m or m.group(3) != "branch":
            return self._error(404, f"no route DELETE {path}")
        with self.state.lock:
            repo = self._repo(m.group(1), unquote(m.group(2)))
            if repo is None:
                return None
            branch = unquote(m.group(4) or "")
            if branch == "main" or repo.branches.pop(branch, None) is None:
                return self._error(404, f"cannot delete branch {branch}", "RevisionNotFound")
        return self._send(200, {})

    def do_GET(self) -> None:
        self._read()
        path, query = self._route()
        if not self._auth_ok(write=False):
            return None
        if path == "/api/whoami-v2":
            return self._send(200, {"name": USER, "type": "user", "orgs": []})
        m = _API.match(path)
        if m:
            rtype, repo_id, action, rest = (
                m.group(1),
                unquote(m.group(2)),
                m.group(3),
                unquote(m.group(4) or ""),
            )
            with self.state.lock:
                repo = self._repo(rtype, repo_id)
                if repo is None:
                    return None
                if action is None or action == "revision":
                    return self._info(repo, rest or "main")
                if action == "tree":
                    recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                    return self._tree(repo, rest, recursive)
                if action == "refs":
                    branches = [
                        {"name": b, "ref": f"refs/heads/{b}", "targetCommit": h[-1].oid}
                        for b, h in repo.branches.items()
                    ]
                    return self._send(200, {"branches": branches, "converts": [], "tags": []})
            return self._error(404, f"no route GET {path}")
        m = _RESOLVE.match(path)
        if m:
            return self._resolve(
                m.group(1) or "models", unquote(m.group(2)), unquote(m.group(3)), unquote(m.group(4))
            )
        return self._error(404, f"no route GET {path}")

    do_HEAD = do_GET

    # -- routes ----------------------------------------------------------------------------------------
    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body or b"{}").get("content", "")
        errors = [{"message": m} for m in _metadata_problems(content)]
        return self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def _create_or_delete(self, create: bool, req: dict[str, Any]) -> None:
        name, org = req.get("name", ""), req.get("organization") or USER
        rtype = req.get("type") or "model"
        repo_id = f"{org}/{name}"
        url = f"{self.endpoint}/{'' if rtype == 'model' else rtype + 's/'}{repo_id}"
        with self.state.lock:
            key = (rtype, repo_id)
            if not create:
                if self.state.repos.pop(key, None) is None:
                    return self._error(404, "Repository not found", "RepoNotFound")
                return self._send(200, {})
            if not _REPO_NAME.match(name) or not _REPO_NAME.match(org):
                return self._error(400, f"invalid repo name {repo_id!r}")
            if key in self.state.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            private = req.get("visibility") == "private" or bool(req.get("private"))
            repo = Repo(repo_id, rtype, private)
            initial = {".gitattributes": GITATTRIBUTES}
            oid = hashlib.sha1(f"{rtype}/{repo_id}/initial".encode()).hexdigest()
            repo.branches["main"] = [Commit(oid, None, "initial commit", initial)]
            self.state.repos[key] = repo
        return self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _preupload(self, rtype: str, repo_id: str, rev: str, req: dict[str, Any]) -> None:
        with self.state.lock:
            repo = self._repo(rtype, repo_id)
            if repo is None:
                return None
            head = repo.resolve(rev)
            if head is None:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            files = []
            for f in req.get("files", []):
                entry = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                if f["path"] in head.files:
                    entry["oid"] = git_sha1(head.files[f["path"]])
                files.append(entry)
        return self._send(200, {"files": files, "commitOid": head.oid})

    def _commit(self, rtype: str, repo_id: str, rev: str, body: bytes) -> None:
        st = self.state
        with st.lock:
            st.commit_requests += 1
            if st.commit_requests in st.fail_commits:
                return self._error(
                    500, "Internal Error - We're working hard to fix this as soon as possible!"
                )
            repo = self._repo(rtype, repo_id)
            if repo is None:
                return None
            if rev not in repo.branches:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = repo.branches[rev][-1]
            files, summary = dict(head.files), ""
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value.get("summary", "")
                    if value.get("parentCommit") and value["parentCommit"] != head.oid:
                        return self._error(412, "A commit has happened since. Please refresh and try again.")
                elif key == "file":
                    path = value["path"]
                    if path.startswith("/") or ".." in path.split("/"):
                        return self._error(400, f"invalid path {path!r}")
                    if value.get("encoding", "base64") != "base64":
                        return self._error(400, "only base64 file content is implemented")
                    files[path] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(prefix)}
                else:
                    return self._error(400, f"commit operation {key!r} is not implemented by this stand-in")
            tree = hashlib.sha1(json.dumps(sorted((p, git_sha1(d)) for p, d in files.items())).encode())
            oid = hashlib.sha1(
                f"{head.oid}{tree.hexdigest()}{summary}{st.commit_requests}".encode()
            ).hexdigest()
            repo.branches[rev].append(Commit(oid, head.oid, summary, files))
        return self._send(
            200,
            {
                "commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}",
                "commitOid": oid,
                "pullRequestUrl": None,
            },
        )

    def _branch(self, rtype: str, repo_id: str, branch: str, req: dict[str, Any]) -> None:
        with self.state.lock:
            repo = self._repo(rtype, repo_id)
            if repo is None:
                return None
            if branch in repo.branches:
                return self._error(409, "Reference already exists")
            start = repo.resolve(req.get("startingPoint") or "main")
            if start is None:
                return self._error(404, "Invalid starting point", "RevisionNotFound")
            repo.branches[branch] = [start]
        return self._send(200, {})

    def _info(self, repo: Repo, rev: str) -> None:
        head = repo.resolve(rev)
        if head is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return self._send(
            200,
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": head.oid,
                "private": repo.private,
                "siblings": [{"rfilename": p} for p in sorted(head.files)],
            },
        )

    def _tree(self, repo: Repo, rest: str, recursive: bool) -> None:
        rev, _, prefix = rest.partition("/")
        head = repo.resolve(rev)
        if head is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        prefix = prefix.strip("/")
        base = prefix + "/" if prefix else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, data in sorted(head.files.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            for depth in range(1, len(parts)):  # folders on the way
                folder = base + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(
                        folder, {"type": "directory", "path": folder, "oid": git_sha1(folder.encode())}
                    )
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "size": len(data), "oid": git_sha1(data)}
        if prefix and not entries:
            return self._error(404, f"{prefix} not found", "EntryNotFound")
        return self._send(200, list(entries.values()))

    def _resolve(self, rtype: str, repo_id: str, rev: str, path: str) -> None:
        with self.state.lock:
            repo = self.state.repo(repo_id, rtype.rstrip("s"))
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            head = repo.resolve(rev)
            if head is None:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            if path not in head.files:
                return self._error(404, "Entry not found", "EntryNotFound", **{"X-Repo-Commit": head.oid})
            data = head.files[path]
        return self._send(200, data, {"X-Repo-Commit": head.oid, "ETag": f'"{git_sha1(data)}"'})


class HubServer:
    """`with HubServer() as hub:` → hub.endpoint (http://127.0.0.1:PORT), hub.state. Or start()/stop()."""

    def __init__(self) -> None:
        self.state = HubState()
        self._server: ThreadingHTTPServer | None = None
        self.endpoint = ""

    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        handler.endpoint = self.endpoint
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="hub-server"
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


if __name__ == "__main__":  # manual use: python tests/hub_server.py, then HF_ENDPOINT=<printed url>
    import time

    with HubServer() as hub:
        print(hub.endpoint, flush=True)
        while True:
            time.sleep(3600)
