"""The model repository: which model versions this worker serves, and how that set changes.

Layout (Triton's): ``DIR/NAME/VERSION/`` holds an exported artifact (manifest, model, tokenizer);
an optional ``DIR/NAME/model.json`` says which versions to serve and which answers by default::

    {"versions": "latest" | "all" | ["1", "2"],   # default "latest": the highest version alone
     "default_version": "2"}                       # default: the highest version loaded

Versions order as ``dataplane.version_key`` says: text versions first, then numbers by value. ``--model-dir`` is a repository
of one: the artifact's manifest names it. Every artifact is verified at load as at start-up; one
that fails is reported (``index``, the log) and skipped, and what served before serves on.

Changes: ``load(name)`` / ``unload(name)`` (the repository API) and ``poll()`` (``--poll-repository``)
load the new version(s) in a thread while the old ones serve, then swap the version table in one
assignment on the event loop: a request resolves its model once, before its rows are admitted,
and keeps that version to the end. A replaced version leaves the table at once and is closed when
its last in-flight request has been answered.

Several worker processes: each holds its own repository. Explicit loads and unloads are operations
in a log the supervisor gives every worker (``WorkerContext.control_dir``/ops): one file per
operation, numbered by an atomic sequence (a hard link cannot replace an existing name, so two calls
at once get two numbers and neither is lost). Every worker applies every operation in sequence order
(the one that took the API call too, before it answers), so all reach the same state whatever the
interleaving; a load reloads in every worker. Each worker records the last number it applied, and
the API answers once every live worker has applied the call's, or says which have not. Folder polls
run in every worker on its own clock: during a version switch, for up to the poll interval, some
workers answer with the old version and some with the new one (each answer names its version);
none fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from classifier_core.artifact import ArtifactError, load_manifest

from ..codes import ModelNotFound, NotReady, ServiceError, truncate
from ..dataplane import version_key
from ..metrics import Metrics
from ..settings import Settings
from .base import Backend, ModelInfo, ProviderError, RowSink, WorkerContext

log = logging.getLogger(__name__)

POLICY_FILE = "model.json"
OPS_FOLDER = "ops"  # in WorkerContext.control_dir: one file per load/unload, named by its sequence number
CONTROL_POLL_S = 0.25
OP_NAME = re.compile(r"(\d{12})\.json")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # folder names served as model names and versions


class LoadFailed(ServiceError):
    code = "model_load_failed"


@dataclass(frozen=True)
class Candidate:
    """A version folder of the repository."""

    name: str
    version: str
    directory: Path


@dataclass
class Loaded:
    """A model version that is loaded and serves: its description, its engine, its row sink."""

    info: ModelInfo
    backend: Backend
    sink: RowSink  # where its rows go: a Batcher before a session, or the owner client (the owner batches)
    files: tuple[tuple[str, int, int], ...] = ()  # its folder's signature when it was loaded: a change reloads it
    inflight: int = 0  # leases: requests that resolved to it and have not been answered
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ready(self) -> bool:
        return self.backend.ready


def read_policy(model_folder: Path) -> tuple[Any, str | None]:
    """(versions: "latest" | "all" | list, default_version) from ``model.json``; ArtifactError if malformed."""
    path = model_folder / POLICY_FILE
    if not path.is_file():
        return "latest", None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    versions = raw.get("versions", "latest") if isinstance(raw, dict) else None
    default = raw.get("default_version") if isinstance(raw, dict) else None
    ok = versions in ("latest", "all") or (isinstance(versions, list) and all(isinstance(v, str) for v in versions))
    if not ok or (default is not None and not isinstance(default, str)):
        raise ArtifactError(f'{path}: expected {{"versions": "latest" | "all" | [names], "default_version": name}}')
    return versions, default


def scan_repository(settings: Settings) -> dict[str, list[Candidate]]:
    """name -> its version folders, oldest first (a single ``--model-dir``: the manifest's name and version)."""
    root = settings.model_repository
    if root is None:
        model_dir = Path(settings.model_dir).resolve()
        try:
            m = load_manifest(model_dir, verify_checksums=False)
            return {m.name: [Candidate(m.name, m.version, model_dir)]}
        except ArtifactError:  # reported when it is loaded, with the full check
            return {model_dir.name: [Candidate(model_dir.name, "", model_dir)]}
    found: dict[str, list[Candidate]] = {}
    try:
        # resolved once here, so that a relative, symlinked or slash-ended spelling names the same folders
        models = sorted(p for p in Path(root).resolve().iterdir() if p.is_dir() and NAME.fullmatch(p.name))
    except OSError as exc:
        log.error("model repository %s: %s", root, exc.strerror or exc)
        return {}
    for folder in models:
        with contextlib.suppress(OSError):
            versions = [p for p in folder.iterdir() if p.is_dir() and NAME.fullmatch(p.name)]
            found[folder.name] = [Candidate(folder.name, p.name, p.resolve())
                                  for p in sorted(versions, key=lambda p: version_key(p.name))]
    return found


def signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """The folder's files (name, size, mtime): a loaded version is reloaded, a failed one retried, once this changes."""
    out = []
    with contextlib.suppress(OSError):
        for p in sorted(folder.iterdir()):
            with contextlib.suppress(OSError):
                st = p.stat()
                out.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def wanted(settings: Settings, versions: list[Candidate]) -> list[Candidate]:
    """The versions of one model its policy serves (ArtifactError when model.json is malformed)."""
    if not versions:
        return []
    if settings.model_repository is None:
        return versions
    policy, _ = read_policy(versions[0].directory.parent)
    if policy == "all":
        return versions
    if policy == "latest":
        return versions[-1:]
    return [c for c in versions if c.version in policy]


def initial_versions(settings: Settings) -> list[Candidate]:
    """What a worker loads at start: every model's wanted versions (the owner process preloads these)."""
    out: list[Candidate] = []
    for versions in scan_repository(settings).values():
        with contextlib.suppress(ArtifactError):
            out.extend(wanted(settings, versions))
    return out


class Repository:
    """The versions this worker serves, by name; see the module's docstring for how the set changes."""

    def __init__(self, settings: Settings, metrics: Metrics, context: WorkerContext,
                 make_backend: Callable[[Candidate], Backend], make_sink: Callable[[Backend, ModelInfo], RowSink]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.context = context
        self.make_backend = make_backend
        self.make_sink = make_sink
        self.models: dict[str, dict[str, Loaded]] = {}  # replaced whole on every change, never edited in place
        self.failed: dict[str, str] = {}  # "name/version" (or "name") -> why it is not served
        self.unloaded: set[str] = set()  # unloaded through the API: polls leave them alone until loaded again
        self.state = "not_loaded"  # not_loaded -> loading -> ready
        self.default_model: str | None = settings.default_model
        self._change = asyncio.Lock()  # one change at a time (API calls, polls, the operations log)
        self.applied_seq = 0  # the last operation of the log applied here
        self._tasks: list[asyncio.Task[None]] = []
        self._signatures: dict[str, tuple[tuple[str, int, int], ...]] = {}  # failed versions: their files then
        self.pinned: dict[str, str | None] = {}  # name -> default_version from its model.json
        self._default: Loaded | None = None  # the default model's default version, worked out at every swap
        self._retiring: dict[int, Loaded] = {}  # replaced versions still draining their leases

    # --- reading -----------------------------------------------------------------------
    def loaded(self) -> Iterator[Loaded]:
        for versions in self.models.values():
            yield from versions.values()

    def default_version(self, name: str) -> Loaded | None:
        versions = self.models.get(name)
        if not versions:
            return None
        pinned = self.pinned.get(name)  # read from model.json when the model was (re)loaded, never per request
        if pinned in versions:
            return versions[pinned]
        return versions[max(versions, key=version_key)]

    def default_name(self) -> str | None:
        if self.default_model:
            return self.default_model
        return next(iter(sorted(self.models)), None)

    def resolve(self, name: str | None = None, version: str | None = None) -> Loaded:
        """The version a request is served by: ModelNotFound for unknown names, NotReady while loading."""
        loaded = self._default if name is None and version is None and self._default is not None else self.find(name, version)
        if not loaded.ready:
            raise NotReady(f"model {loaded.info.key} is not ready (state: {loaded.backend.state})")
        return loaded

    def find(self, name: str | None = None, version: str | None = None) -> Loaded:
        """As ``resolve``, ready or not (a readiness probe asks about a model that is not ready)."""
        if self.state != "ready":
            raise NotReady(f"the model is not ready (state: {self.state})")
        name = name or self.default_name()
        if name is None:
            raise NotReady("no model is loaded (see GET /v2/repository/index)")
        versions = self.models.get(name)
        if not versions:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"unknown model '{truncate(name)}' (loaded: {truncate(known, 200)})")
        if version is None:
            loaded = self.default_version(name)
            assert loaded is not None  # versions is not empty
        elif version in versions:
            loaded = versions[version]
        else:
            raise ModelNotFound(f"unknown version '{truncate(version)}' of model '{truncate(name)}' "
                           f"(loaded: {truncate(', '.join(sorted(versions, key=version_key)), 200)})")
        return loaded

    @staticmethod
    def release(loaded: Loaded) -> None:
        """A request that resolved to ``loaded`` is answered (the pipeline counts ``loaded.inflight`` up)."""
        loaded.inflight -= 1
        if loaded.inflight == 0:
            loaded.drained.set()

    def index(self) -> list[dict[str, Any]]:
        """Triton's repository index: every version found or loaded, with its state."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for name, versions in scan_repository(self.settings).items():
            for c in versions:
                rows[(name, c.version)] = {"name": name, "version": c.version, "state": "UNAVAILABLE", "reason": "not loaded"}
        for key, reason in self.failed.items():
            name, _, version = key.partition("/")
            rows[(name, version)] = {"name": name, "version": version, "state": "UNAVAILABLE", "reason": reason}
        for lo in self.loaded():
            rows[(lo.info.name, lo.info.version)] = {"name": lo.info.name, "version": lo.info.version,
                                                     "state": "READY" if lo.ready else "UNAVAILABLE", "reason": ""}
        return [rows[k] for k in sorted(rows, key=lambda k: (k[0], version_key(k[1])))]

    # --- changing ----------------------------------------------------------------------
    async def start(self) -> None:
        """Load every model's wanted versions; the broken ones are reported and skipped."""
        self.state = "loading"
        self._replay_unloaded()
        self._write_applied()  # what it will serve reflects the log so far: no API call waits for its loading
        async with self._change:
            for name, versions in scan_repository(self.settings).items():
                if name not in self.unloaded:
                    await self._apply(name, versions, strict=False)
            await self._catch_up()  # operations logged while it loaded, before it serves
        self.state = "ready"
        if self.default_model and self.default_model not in self.models:
            log.warning("the default model %r is not loaded (loaded: %s): requests that name no model get 404",
                        self.default_model, ", ".join(sorted(self.models)) or "none")
        if self.context.control_dir:
            self._tasks.append(asyncio.create_task(self._watch_control(), name="repository-control"))
        if self.settings.poll_repository_s and self.settings.model_repository is not None:
            self._tasks.append(asyncio.create_task(self._poll_loop(), name="repository-poll"))

    async def stop(self) -> None:
        if self.context.control_dir:  # a stopping worker applies nothing more: no API call waits for it
            with contextlib.suppress(OSError):
                (Path(self.context.control_dir) / f"applied.{os.getpid()}").unlink()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        old, self.models = list(self.loaded()), {}
        for lo in [*old, *self._retiring.values()]:  # those still draining too: their tasks were cancelled
            await self._close(lo)

    async def load(self, name: str) -> tuple[list[ModelInfo], list[int]]:
        """The repository API's load: (re)load ``name``'s wanted versions from its folder, in every worker.
        LoadFailed if none loads here; returns what serves and the workers that have not applied it yet."""
        async with self._change:
            versions = scan_repository(self.settings).get(name)
            if not versions:
                raise ModelNotFound(f"the repository has no model folder '{truncate(name)}' with a version in it")
            seq = await self._run_op("load", name)
            infos = [lo.info for lo in self.models.get(name, {}).values()]
        return infos, await self._wait_for_workers(seq)

    async def unload(self, name: str) -> list[int]:
        """Stop serving ``name`` in every worker; returns the workers that have not applied it yet."""
        async with self._change:
            if name not in self.models and name not in {k.partition("/")[0] for k in self.failed}:
                raise ModelNotFound(f"model '{truncate(name)}' is not loaded")
            seq = await self._run_op("unload", name)
        return await self._wait_for_workers(seq)

    async def _run_op(self, op: str, name: str) -> int:
        """An API call's operation: into the log, then every operation up to it applied here, in order
        (so this worker ends where every other will). Its sequence number; 0 for a single process."""
        if self._ops_dir() is None:
            await self._do(op, name, strict=True)
            return 0
        seq = self._append_op(op, name)
        await self._catch_up(strict_seq=seq)
        return seq

    async def _do(self, op: str, name: str, strict: bool) -> None:
        """One operation, here (the caller holds ``_change``)."""
        if op == "unload":
            self.unloaded.add(name)
            self._swap(name, {})
            return
        self.unloaded.discard(name)
        versions = scan_repository(self.settings).get(name)
        if not versions:
            if strict:
                raise ModelNotFound(f"the repository has no model folder '{truncate(name)}' with a version in it")
            return
        await self._apply(name, versions, strict=strict, reload=True)

    async def poll(self) -> None:
        """One folder scan (``--poll-repository``): new versions in, retired ones out, new models loaded."""
        async with self._change:
            found = scan_repository(self.settings)
            for name, versions in found.items():
                if name not in self.unloaded:
                    await self._apply(name, versions, strict=False)
            for name in set(self.models) - set(found):  # its folder went away
                log.info("model %s: its folder is gone; unloading it", name)
                self._swap(name, {})

    async def _apply(self, name: str, versions: list[Candidate], strict: bool, reload: bool = False) -> None:
        """Bring ``name`` to its policy's versions: load what is missing (old versions serve meanwhile), then swap."""
        try:
            want = wanted(self.settings, versions)
            if self.settings.model_repository is not None:
                self.pinned[name] = read_policy(Path(self.settings.model_repository) / name)[1]
        except ArtifactError as exc:
            self.failed[name] = self.public(str(exc))
            if strict:
                raise LoadFailed(self.failed[name]) from None
            return
        current = dict(self.models.get(name, {}))
        new: dict[str, Loaded] = {}
        problems = []
        waiting = False  # a wanted version skipped: it failed, and its files have not changed since
        for c in want:
            have = current.get(c.version)  # loaded from the same resolved folder, or replaced: compared by content
            key = f"{name}/{c.version}"
            files = signature(c.directory)
            if have is not None and have.info.directory == c.directory and not reload and have.files == files:
                new[c.version] = have  # the same folder, its files unchanged: nothing to do
                continue
            if key in self.failed and not reload and not strict and self._signatures.get(key) == files:
                # a broken version is tried again once its files change (a copy still arriving) or on a load;
                # meanwhile the version that served before serves on
                if have is not None:
                    new[c.version] = have
                waiting = True
                continue
            others = sum(1 for lo in self.loaded() if lo.info.name != name) + len(new)
            if others >= self.settings.max_loaded_models:
                problems.append(f"{key}: {self.settings.max_loaded_models} model versions are loaded; the limit is "
                                f"CLASSIFIER_MAX_LOADED_MODELS={self.settings.max_loaded_models}")
                self.failed[key] = problems[-1]
                continue
            try:
                new[c.version] = await self._load_one(c, files)
                self.failed.pop(key, None)
            except (ArtifactError, ProviderError, OSError) as exc:
                log.error("model %s: cannot load (%s); %s", key, exc,
                          "the previous version serves on" if current else "not served")
                reason = self.public(str(exc))
                self.failed[key] = reason
                self._signatures[key] = files
                problems.append(f"{key}: {reason}")
                if c.version in current:
                    new[c.version] = current[c.version]  # a failed reload leaves the running one in place
        if not new and current and (problems or waiting):
            new = current  # nothing of the new set loads (now, or since its files last changed): the old set serves on
        self._swap(name, new)
        if strict and problems:
            raise LoadFailed("; ".join(problems))

    def public(self, text: str) -> str:
        """A message for clients: paths inside the repository as a client names them (``NAME/VERSION/file``),
        never the server's absolute paths."""
        root = self.settings.model_repository
        if root is None:  # a single --model-dir: its folder's name
            model_dir = Path(self.settings.model_dir)
            for spelling in {str(model_dir.resolve()), str(model_dir)}:
                text = text.replace(spelling, model_dir.name)
            return text
        for spelling in sorted({str(Path(root).resolve()), str(root).rstrip("/")}, key=len, reverse=True):
            text = text.replace(spelling + "/", "")
        return text

    async def _load_one(self, c: Candidate, files: tuple[tuple[str, int, int], ...] = ()) -> Loaded:
        backend = self.make_backend(c)
        info = await anyio.to_thread.run_sync(backend.load)
        if not backend.ready and self.state == "ready":
            # a version that comes later must be ready before it takes over (the owner process could not
            # load it, say); at start a worker keeps it and becomes ready when its owner is back
            backend.close()
            raise ArtifactError(f"{c.directory}: loaded but not ready ({backend.state}: {backend.error or 'see the log'})")
        sink = self.make_sink(backend, info)
        await sink.start()
        self.metrics.model_info.labels(info.name, info.version, info.provider).set(1)
        log.info("model %s loaded in %.2f s (%s)", info.key, info.load_seconds,
                 f"{info.memory_bytes / 1e6:.0f} MB" if info.memory_bytes else "memory not measured")
        return Loaded(info, backend, sink, files)

    def _swap(self, name: str, versions: dict[str, Loaded]) -> None:
        """Replace ``name``'s version table in one assignment; what left it closes once drained."""
        old = self.models.get(name, {})
        models = {k: v for k, v in self.models.items() if k != name}
        if versions:
            models[name] = versions
        self.models = models
        default = self.default_name()
        self._default = self.default_version(default) if default else None
        self._tasks = [t for t in self._tasks if not t.done()]
        kept = {id(v) for v in versions.values()}
        for lo in old.values():
            if id(lo) not in kept:
                self._retiring[id(lo)] = lo
                self._tasks.append(asyncio.create_task(self._retire(lo), name=f"retire-{lo.info.key}"))

    @property
    def retire_wait_s(self) -> float:
        """How long a replaced version waits for its leases: the longest a request may take (its body,
        then its rows). Past it the version closes and its row sink answers what is left with 503."""
        return self.settings.body_timeout_s + self.settings.request_timeout_ms / 1000

    async def _retire(self, lo: Loaded) -> None:
        t0 = time.perf_counter()
        if lo.inflight:
            lo.drained.clear()
            try:
                await asyncio.wait_for(lo.drained.wait(), self.retire_wait_s)
            except TimeoutError:
                log.warning("model %s: %d requests still hold it %.0f s after it was replaced; they get 503 not_ready",
                            lo.info.key, lo.inflight, self.retire_wait_s)
        await self._close(lo)
        log.info("model %s unloaded (%.2f s after it was replaced)", lo.info.key, time.perf_counter() - t0)

    async def _close(self, lo: Loaded) -> None:
        await lo.sink.stop()
        lo.backend.close()
        self._retiring.pop(id(lo), None)
        labels = (lo.info.name, lo.info.version, lo.info.provider)
        if not any((o.info.name, o.info.version, o.info.provider) == labels for o in self.loaded()):
            # 0, not removed: prometheus_client cannot remove labels across worker processes; and not
            # when a reload of the same version (the same labels) serves in its place
            self.metrics.model_info.labels(*labels).set(0)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_repository_s)
            try:
                await self.poll()
            except Exception as exc:  # a poll must never end the worker
                log.error("repository poll failed: %s", exc, exc_info=exc)

    # --- agreeing with the other workers: the operations log ------------------------------
    def _ops_dir(self) -> Path | None:
        return Path(self.context.control_dir) / OPS_FOLDER if self.context.control_dir else None

    def _ops(self, after: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """The log's operations numbered above ``after``, in order."""
        folder = self._ops_dir()
        if folder is None:
            return []
        out = []
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                m = OP_NAME.fullmatch(entry.name)
                if m and int(m.group(1)) > after:
                    with contextlib.suppress(OSError, ValueError):  # unreadable: a gap, waited for
                        out.append((int(m.group(1)), json.loads(Path(entry.path).read_text())))
        return sorted(out, key=lambda o: o[0])

    def _latest_seq(self) -> int:
        folder = self._ops_dir()
        best = 0
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder) if folder else ():
                m = OP_NAME.fullmatch(entry.name)
                if m:
                    best = max(best, int(m.group(1)))
        return best

    def _append_op(self, op: str, name: str) -> int:
        """Add one operation to the log; its sequence number."""
        folder = self._ops_dir()
        assert folder is not None
        folder.mkdir(exist_ok=True)
        tmp = folder / f".{os.getpid()}.tmp"
        seq = self._latest_seq() + 1
        try:
            while True:
                tmp.write_text(json.dumps({"op": op, "name": name, "pid": os.getpid()}))
                try:
                    os.link(tmp, folder / f"{seq:012d}.json")  # atomic, and never replaces: no number is given twice
                    return seq
                except FileExistsError:
                    seq += 1  # another worker took this number a moment ago
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    async def _catch_up(self, strict_seq: int | None = None) -> None:
        """Apply the log's new operations in order (the caller holds ``_change``); the one numbered
        ``strict_seq`` (this worker's API call) raises its errors, the others are logged."""
        for _ in range(100):
            for seq, op in self._ops(self.applied_seq):
                if seq != self.applied_seq + 1:
                    # numbers are given without gaps: one not seen yet (a listing taken while it was
                    # linked) is waited for, never skipped
                    break
                strict = seq == strict_seq
                try:
                    await self._do(str(op.get("op")), str(op.get("name")), strict)
                except Exception as exc:
                    if strict:
                        self.applied_seq = seq
                        self._write_applied()
                        raise
                    log.error("repository operation %d (%s %s) failed here: %s", seq, op.get("op"), op.get("name"), exc)
                self.applied_seq = seq
            if strict_seq is None or self.applied_seq >= strict_seq:
                break
            await asyncio.sleep(0.01)  # this call's own operation is behind one not visible yet
        self._write_applied()

    def _replay_unloaded(self) -> None:
        """At start: the models the log leaves unloaded (the last operation on each name wins)."""
        for seq, op in self._ops():
            name = str(op.get("name"))
            if op.get("op") == "unload":
                self.unloaded.add(name)
            else:
                self.unloaded.discard(name)
            self.applied_seq = seq

    async def _watch_control(self) -> None:
        while True:
            await asyncio.sleep(CONTROL_POLL_S)
            if self._latest_seq() <= self.applied_seq:
                continue
            try:
                async with self._change:
                    await self._catch_up()
            except Exception as exc:
                log.error("applying the repository operations failed: %s", exc, exc_info=exc)

    async def _wait_for_workers(self, seq: int) -> list[int]:
        """Until every live worker has applied operation ``seq`` (bounded by the request timeout):
        the pids of those that have not."""
        if self._ops_dir() is None:
            return []
        deadline = time.monotonic() + self.settings.request_timeout_ms / 1000
        while (behind := self._behind(seq)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if behind:
            log.warning("repository operation %d: workers %s have not applied it within %.0f s", seq, behind,
                        self.settings.request_timeout_ms / 1000)
        return behind

    def _write_applied(self) -> None:
        if self.context.control_dir:
            with contextlib.suppress(OSError):
                path = Path(self.context.control_dir) / f"applied.{os.getpid()}"
                tmp = Path(self.context.control_dir) / f".applied.{os.getpid()}.tmp"
                tmp.write_text(str(self.applied_seq))
                os.replace(tmp, path)  # a reader never sees it empty

    def _behind(self, seq: int) -> list[int]:
        """Live workers that have not applied operation ``seq`` yet."""
        behind = []
        for f in Path(str(self.context.control_dir)).glob("applied.*"):
            if not f.suffix[1:].isdigit():
                continue
            try:
                pid, applied = int(f.suffix[1:]), int(f.read_text() or 0)
                os.kill(pid, 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    f.unlink()  # a worker that has gone
                continue
            except (OSError, ValueError):
                continue
            if applied < seq:
                behind.append(pid)
        return sorted(behind)
