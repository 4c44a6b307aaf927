"""The model repository: which model versions this worker serves, and how that set changes.

Layout (Triton's): ``DIR/NAME/VERSION/`` holds an exported artifact (manifest, model, tokenizer);
an optional ``DIR/NAME/model.json`` says which versions to serve and which answers by default::

    {"versions": "latest" | "all" | ["1", "2"],   # default "latest": the highest version alone
     "default_version": "2"}                       # default: the highest version loaded

Versions order as numbers when both are numbers, else as text. ``--model-dir`` is a repository
of one: the artifact's manifest names it. Every artifact is verified at load as at start-up; one
that fails is reported (``index``, the log) and skipped, and what served before serves on.

Changes: ``load(name)`` / ``unload(name)`` (the repository API) and ``poll()`` (``--poll-repository``)
load the new version(s) in a thread while the old ones serve, then swap the version table in one
assignment on the event loop: a request resolves its model once, before its rows are admitted,
and keeps that version to the end. A replaced version leaves the table at once and is closed when
its last in-flight request has been answered.

Several worker processes: each holds its own repository. Explicit loads and unloads are written to
a control file the supervisor gives every worker (``WorkerContext.control_dir``); each worker applies
the latest one within ``CONTROL_POLL_S`` and records the generation it applied, and the worker that
took the API call answers once every live worker has applied it. Folder polls run in every worker
on its own clock: during a version switch, for up to the poll interval, some workers answer with the
old version and some with the new one (each answer names its version); none fails.
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
from ..metrics import Metrics
from ..settings import Settings
from .base import Backend, ModelInfo, ProviderError, RowSink, WorkerContext

log = logging.getLogger(__name__)

POLICY_FILE = "model.json"
CONTROL_FILE = "repository.json"
CONTROL_POLL_S = 0.25
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
    """A model version that is loaded and serves: its description, its engine, its batcher."""

    info: ModelInfo
    backend: Backend
    batcher: RowSink  # a Batcher before a session, or the owner client (the owner batches)
    inflight: int = 0  # requests that resolved to it and have not been answered
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ready(self) -> bool:
        return self.backend.ready


def _version_key(v: str) -> tuple[int, int, str]:
    return (1, int(v), "") if v.isdigit() else (0, 0, v)


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


def scan(settings: Settings) -> dict[str, list[Candidate]]:
    """name -> its version folders, oldest first (a single ``--model-dir``: the manifest's name and version)."""
    root = settings.model_repository
    if root is None:
        model_dir = Path(settings.model_dir)
        try:
            m = load_manifest(model_dir, verify_checksums=False)
            return {m.name: [Candidate(m.name, m.version, model_dir)]}
        except ArtifactError:  # reported when it is loaded, with the full check
            return {model_dir.name: [Candidate(model_dir.name, "", model_dir)]}
    found: dict[str, list[Candidate]] = {}
    try:
        models = sorted(p for p in Path(root).iterdir() if p.is_dir() and NAME.fullmatch(p.name))
    except OSError as exc:
        log.error("model repository %s: %s", root, exc.strerror or exc)
        return {}
    for folder in models:
        with contextlib.suppress(OSError):
            versions = [p for p in folder.iterdir() if p.is_dir() and NAME.fullmatch(p.name)]
            found[folder.name] = [Candidate(folder.name, p.name, p) for p in sorted(versions, key=lambda p: _version_key(p.name))]
    return found


def signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """The folder's files (name, size, mtime): a failed version is retried once this changes."""
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
    for versions in scan(settings).values():
        with contextlib.suppress(ArtifactError):
            out.extend(wanted(settings, versions))
    return out


class Repository:
    """The versions this worker serves, by name; see the module's docstring for how the set changes."""

    def __init__(self, settings: Settings, metrics: Metrics, context: WorkerContext,
                 make_backend: Callable[[Candidate], Backend], make_batcher: Callable[[Backend, ModelInfo], RowSink]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.context = context
        self.make_backend = make_backend
        self.make_batcher = make_batcher
        self.models: dict[str, dict[str, Loaded]] = {}  # replaced whole on every change, never edited in place
        self.failed: dict[str, str] = {}  # "name/version" (or "name") -> why it is not served
        self.unloaded: set[str] = set()  # unloaded through the API: polls leave them alone until loaded again
        self.state = "not_loaded"  # not_loaded -> loading -> ready
        self.default_model: str | None = settings.default_model
        self._change = asyncio.Lock()  # one change at a time (API calls, polls, control file)
        self._control_seen: tuple[int, int] | None = None
        self.generation = 0  # of the control file, as applied here
        self._tasks: list[asyncio.Task[None]] = []
        self._signatures: dict[str, tuple[tuple[str, int, int], ...]] = {}  # failed versions: their files then
        self.pinned: dict[str, str | None] = {}  # name -> default_version from its model.json
        self._default: Loaded | None = None  # the default model's default version, worked out at every swap

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
        return versions[max(versions, key=_version_key)]

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
                           f"(loaded: {truncate(', '.join(sorted(versions, key=_version_key)), 200)})")
        return loaded

    @property
    def ready(self) -> bool:
        """Overall readiness: the default model has a ready version (docs/operations.md)."""
        if self.state != "ready":
            return False
        name = self.default_name()
        default = self.default_version(name) if name else None
        return default is not None and default.ready

    @staticmethod
    def release(loaded: Loaded) -> None:
        """A request that resolved to ``loaded`` is answered (the pipeline counts ``loaded.inflight`` up)."""
        loaded.inflight -= 1
        if loaded.inflight == 0:
            loaded.drained.set()

    def index(self) -> list[dict[str, Any]]:
        """Triton's repository index: every version found or loaded, with its state."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for name, versions in scan(self.settings).items():
            for c in versions:
                rows[(name, c.version)] = {"name": name, "version": c.version, "state": "UNAVAILABLE", "reason": "not loaded"}
        for key, reason in self.failed.items():
            name, _, version = key.partition("/")
            rows[(name, version)] = {"name": name, "version": version, "state": "UNAVAILABLE", "reason": reason}
        for lo in self.loaded():
            rows[(lo.info.name, lo.info.version)] = {"name": lo.info.name, "version": lo.info.version,
                                                     "state": "READY" if lo.ready else "UNAVAILABLE", "reason": ""}
        return [rows[k] for k in sorted(rows, key=lambda k: (k[0], _version_key(k[1])))]

    # --- changing ----------------------------------------------------------------------
    async def start(self) -> None:
        """Load every model's wanted versions; the broken ones are reported and skipped."""
        self.state = "loading"
        self._read_control()
        async with self._change:
            for name, versions in scan(self.settings).items():
                if name not in self.unloaded:
                    await self._apply(name, versions, strict=False)
        self.state = "ready"
        if self.default_model and self.default_model not in self.models:
            log.warning("the default model %r is not loaded (loaded: %s): requests that name no model get 404",
                        self.default_model, ", ".join(sorted(self.models)) or "none")
        if self.context.control_dir:
            self._write_applied()
            self._tasks.append(asyncio.create_task(self._watch_control(), name="repository-control"))
        if self.settings.poll_repository_s and self.settings.model_repository is not None:
            self._tasks.append(asyncio.create_task(self._poll_loop(), name="repository-poll"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        old, self.models = list(self.loaded()), {}
        for lo in old:
            await self._close(lo)

    async def load(self, name: str) -> list[ModelInfo]:
        """The repository API's load: (re)load ``name``'s wanted versions from its folder; LoadFailed if none loads."""
        async with self._change:
            versions = scan(self.settings).get(name)
            if not versions:
                raise ModelNotFound(f"the repository has no model folder '{truncate(name)}' with a version in it")
            self.unloaded.discard(name)
            await self._apply(name, versions, strict=True, reload=True)
            await self._publish()
            return [lo.info for lo in self.models.get(name, {}).values()]

    async def unload(self, name: str) -> None:
        async with self._change:
            if name not in self.models and name not in {k.partition("/")[0] for k in self.failed}:
                raise ModelNotFound(f"model '{truncate(name)}' is not loaded")
            self.unloaded.add(name)
            self._swap(name, {})
            await self._publish()

    async def poll(self) -> None:
        """One folder scan (``--poll-repository``): new versions in, retired ones out, new models loaded."""
        async with self._change:
            found = scan(self.settings)
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
            self.failed[name] = str(exc)
            if strict:
                raise LoadFailed(str(exc)) from None
            return
        current = dict(self.models.get(name, {}))
        new: dict[str, Loaded] = {}
        problems = []
        for c in want:
            have = current.get(c.version)
            if have is not None and have.info.directory == c.directory.resolve() and not reload:
                new[c.version] = have
                continue
            key = f"{name}/{c.version}"
            if key in self.failed and not reload and not strict and self._signatures.get(key) == signature(c.directory):
                continue  # a broken version is tried again once its files change (a copy still arriving) or on a load
            others = sum(1 for lo in self.loaded() if lo.info.name != name) + len(new)
            if others >= self.settings.max_loaded_models:
                problems.append(f"{key}: {self.settings.max_loaded_models} model versions are loaded; the limit is "
                                f"CLASSIFIER_MAX_LOADED_MODELS={self.settings.max_loaded_models}")
                self.failed[key] = problems[-1]
                continue
            try:
                new[c.version] = await self._load_one(c)
                self.failed.pop(key, None)
            except (ArtifactError, ProviderError, OSError) as exc:
                log.error("model %s: cannot load (%s); %s", key, exc,
                          "the previous version serves on" if current else "not served")
                # paths inside the repository, as a client names them (no absolute server paths in answers)
                reason = str(exc).replace(f"{self.settings.model_repository}/", "")
                self.failed[key] = reason
                self._signatures[key] = signature(c.directory)
                problems.append(f"{key}: {reason}")
                if c.version in current:
                    new[c.version] = current[c.version]  # a failed reload leaves the running one in place
        if not new and current and problems:
            new = current  # nothing of the new set loads: the old set serves on
        self._swap(name, new)
        if strict and problems:
            raise LoadFailed("; ".join(problems))

    async def _load_one(self, c: Candidate) -> Loaded:
        backend = self.make_backend(c)
        info = await anyio.to_thread.run_sync(backend.load)
        if not backend.ready and self.state == "ready":
            # a version that comes later must be ready before it takes over (the owner process could not
            # load it, say); at start a worker keeps it and becomes ready when its owner is back
            backend.close()
            raise ArtifactError(f"{c.directory}: loaded but not ready ({backend.state}: {backend.error or 'see the log'})")
        batcher = self.make_batcher(backend, info)
        await batcher.start()
        self.metrics.model_info.labels(info.name, info.version, info.provider).set(1)
        log.info("model %s loaded in %.2f s (%s)", info.key, info.load_seconds,
                 f"{info.memory_bytes / 1e6:.0f} MB" if info.memory_bytes else "memory not measured")
        return Loaded(info, backend, batcher)

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
                self._tasks.append(asyncio.create_task(self._retire(lo), name=f"retire-{lo.info.key}"))

    async def _retire(self, lo: Loaded) -> None:
        t0 = time.perf_counter()
        if lo.inflight:
            lo.drained.clear()
            with contextlib.suppress(TimeoutError):  # a request never outlives its own timeout by much
                await asyncio.wait_for(lo.drained.wait(), 2 * self.settings.request_timeout_ms / 1000)
        await self._close(lo)
        log.info("model %s unloaded (%.2f s after it was replaced)", lo.info.key, time.perf_counter() - t0)

    async def _close(self, lo: Loaded) -> None:
        await lo.batcher.stop()
        lo.backend.close()
        # 0, not removed: prometheus_client cannot remove labels across worker processes
        self.metrics.model_info.labels(lo.info.name, lo.info.version, lo.info.provider).set(0)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_repository_s)
            try:
                await self.poll()
            except Exception as exc:  # a poll must never end the worker
                log.error("repository poll failed: %s", exc, exc_info=exc)

    # --- agreeing with the other workers -----------------------------------------------
    def _control_path(self) -> Path | None:
        return Path(self.context.control_dir) / CONTROL_FILE if self.context.control_dir else None

    def _read_control(self) -> dict[str, Any] | None:
        path = self._control_path()
        if path is None:
            return None
        try:
            st = path.stat()
            if (st.st_mtime_ns, st.st_size) == self._control_seen:
                return None
            data = json.loads(path.read_text())
            self._control_seen = (st.st_mtime_ns, st.st_size)
        except (OSError, ValueError):
            return None
        if int(data.get("generation", 0)) <= self.generation:
            return None
        self.generation = int(data["generation"])
        self.unloaded = set(data.get("unloaded", []))
        return data

    async def _watch_control(self) -> None:
        while True:
            await asyncio.sleep(CONTROL_POLL_S)
            data = self._read_control()
            if data is None:
                continue
            try:
                async with self._change:
                    found = scan(self.settings)
                    for name in data.get("reload", []):
                        if name in found:
                            await self._apply(name, found[name], strict=False, reload=name not in self.models)
                    for name in self.unloaded:
                        if name in self.models:
                            self._swap(name, {})
            except Exception as exc:
                log.error("applying the repository control file failed: %s", exc, exc_info=exc)
            self._write_applied()

    async def _publish(self) -> None:
        """Tell the other workers (control file), then wait until every live one has applied it."""
        path = self._control_path()
        if path is None:
            return
        self.generation = max(self.generation, self._latest_generation()) + 1
        body = json.dumps({"generation": self.generation, "unloaded": sorted(self.unloaded),
                           "reload": sorted(set(self.models))})
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(body)
        os.replace(tmp, path)  # atomic: a reader sees the old or the new file
        with contextlib.suppress(OSError):
            st = path.stat()
            self._control_seen = (st.st_mtime_ns, st.st_size)
        self._write_applied()
        deadline = time.monotonic() + self.settings.request_timeout_ms / 1000
        while time.monotonic() < deadline and self._behind():
            await asyncio.sleep(0.05)

    def _latest_generation(self) -> int:
        path = self._control_path()
        try:
            return int(json.loads(path.read_text()).get("generation", 0)) if path else 0
        except (OSError, ValueError):
            return 0

    def _write_applied(self) -> None:
        if self.context.control_dir:
            with contextlib.suppress(OSError):
                (Path(self.context.control_dir) / f"applied.{os.getpid()}").write_text(str(self.generation))

    def _behind(self) -> list[int]:
        """Live workers that have not applied this generation yet."""
        behind = []
        for f in Path(str(self.context.control_dir)).glob("applied.*"):
            try:
                pid, generation = int(f.suffix[1:]), int(f.read_text() or 0)
                os.kill(pid, 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    f.unlink()  # a worker that has gone
                continue
            except (OSError, ValueError):
                continue
            if generation < self.generation:
                behind.append(pid)
        return behind
