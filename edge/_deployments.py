"""Model lifecycle on a device: deploy (active or shadow), promote, roll back, survive restarts.

The registry (`models.ModelRegistry`) serves models; this module decides which model a slot
serves and remembers it in `data_dir/models/state.json`, so a restarted device comes back with
the model it was running. A candidate in shadow mode lives in a slot of its own, `<name>.shadow`,
and every pipeline whose model is `<name>` asks it beside the active one.

A model is trusted where it is loaded, not only where it was deployed: a folder in the model store
(`data_dir/models`) is loaded only after `verify_deployed` has checked it against the object and
signature kept beside it, on every load (deploy, restart, `config.apply`); a folder outside the
store only when the config file names it. `state.json` lives in data_dir too, so a folder it names
that is neither is refused: the slot keeps what it had (or stays unavailable) and `status` says why.
Every warm-up is bounded by the model's `warmup_timeout_ms` (`warmup_timeout`), and `load` runs
apart from `deploy`, so a fleet can warm a model up without holding its lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import msgspec

from models import Model, ModelError, ModelRegistry, WarmupTimeout, load_model

from ._config import NUMERIC_TYPES, Config
from ._errors import CommandError, quoted
from ._files import write_atomically
from .fleet._archive import verify_deployed

log = logging.getLogger("edge.deployments")

Mode = Literal["active", "shadow"]
DEFAULT_WARMUP_TIMEOUT_MS = 5000  # a model the config does not list (ModelConfig's default)


class SlotState(msgspec.Struct, omit_defaults=True):
    """Where the models of one slot live on disk (persisted)."""

    active: str = ""
    previous: str = ""
    shadow: str = ""


class Deployments:
    """Deploys, promotes and rolls back the models a device serves, keeping the choice across restarts.

    It needs only the registry it installs into, where to keep files, the config in force (which
    pipelines use a model), and two callbacks: rebuild those pipelines, record an audit event.
    """

    def __init__(self, registry: ModelRegistry, data_dir: Path, *, config: Callable[[], Config],
                 rebuild: Callable[[set[str]], Awaitable[None]], record: Callable[[str, dict[str, Any]], None]) -> None:
        self.registry = registry
        self.data_dir = data_dir
        self._config = config
        self._rebuild = rebuild
        self._record = record
        self._state: dict[str, SlotState] = {}
        self._refused: dict[str, str] = {}  # model name -> why a version it should serve was refused at start

    @property
    def state_file(self) -> Path:
        return self.data_dir / "models" / "state.json"

    @property
    def store(self) -> Path:
        """The model store: where deploys put model folders (with their deploy record)."""
        return self.data_dir / "models"

    def in_store(self, folder: Path) -> bool:
        return folder.resolve().is_relative_to(self.store.resolve())

    def shadow_slot(self, name: str) -> str | None:
        """The slot holding `name`'s shadow candidate, if one is deployed."""
        state = self._state.get(name)
        return f"{name}.shadow" if state is not None and state.shadow else None

    def store_dir(self, name: str, version: str) -> Path:
        """Where a deployed model's files are kept on this device."""
        return self.data_dir / "models" / name / version

    # -- loading ----------------------------------------------------------------------------------

    async def load(self, name: str, folder: Path, *, warmup_timeout_ms: int | None = None) -> Model:
        """The model in `folder`, verified (a folder in the store: its deploy record and signature),
        loaded and warmed up within its warm-up timeout, off the event loop; nothing is served yet.

        Raises CommandError: `tampered` / `unsigned` / `bad_signature` (the deploy record),
        `warmup_timeout`, `bad_model`.
        """
        config = self._config()
        if warmup_timeout_ms is None:
            model_config = config.model(name)
            warmup_timeout_ms = model_config.warmup_timeout_ms if model_config else DEFAULT_WARMUP_TIMEOUT_MS
        timeout_s = warmup_timeout_ms / 1000
        trusted = list(config.fleet.trusted_keys)
        in_store = self.in_store(folder)

        def verify_and_load() -> Model:
            if in_store:
                verify_deployed(folder, trusted)
            return load_model(folder, warmup_timeout_s=timeout_s)

        try:
            return await asyncio.to_thread(verify_and_load)
        except WarmupTimeout as exc:
            raise CommandError("warmup_timeout", f"model {quoted(name)}: {exc}") from None
        except ModelError as exc:
            raise CommandError("bad_model", str(exc)) from None

    async def load_configured(self) -> None:
        """At start: every model the config lists into its slot; one that cannot load leaves its slot
        unavailable, saying why (rules decide meanwhile)."""
        config = self._config()
        for m in config.models:
            slot = self.registry.slot(m.name, max_batch=m.max_batch, max_wait_us=m.max_wait_us)
            try:
                model = await self.load(m.name, config.resolve(m.path), warmup_timeout_ms=m.warmup_timeout_ms)
                await slot.install(model)
            except CommandError as exc:
                slot.fail(exc.message)
            except ModelError as exc:  # it cannot replace the one serving: the slot stays as it was
                slot.fail(str(exc))

    async def _restored(self, name: str, folder: Path) -> Model:
        """A folder `state.json` names, loaded as at deploy: from the store (verified) or the config file's."""
        if not self.in_store(folder) and folder != Path(self._serving_folder(name)):
            raise CommandError("tampered", f"{quoted(str(folder))} is neither in the model store nor the "
                                           "config's folder for this model")
        return await self.load(name, folder)

    # -- start-up ----------------------------------------------------------------------------------

    async def restore(self) -> None:
        """Serve what the device served before it stopped (models deployed since the config was written)."""
        try:
            raw = self.state_file.read_bytes()
        except FileNotFoundError:
            return
        try:
            self._state = msgspec.json.decode(raw, type=dict[str, SlotState])
        except msgspec.DecodeError as exc:
            log.error("ignoring unreadable %s: %s", self.state_file, exc)
            return
        registry = self.registry
        for name, state in self._state.items():
            slot = registry.slot(name)
            loaded: set[str] = set()
            for key in ("previous", "active"):
                folder = getattr(state, key)
                if not folder:
                    continue
                try:
                    model = await self._restored(name, Path(folder))
                    await slot.install(model)
                except (CommandError, ModelError) as exc:
                    why = str(exc)  # "code: message" for a CommandError
                    log.error("model %s: the %s version at %s is refused: %s", name, key, quoted(folder), why)
                    self._refused[name] = f"the {key} version at {folder} was refused at start: {why}"
                    slot.fail(self._refused[name])
                    continue
                loaded.add(key)
            # What serves is what loaded: the previous version (or the config's, or nothing).
            if state.previous and "previous" not in loaded:
                state.previous = ""
            if state.active and "active" not in loaded:
                state.active, state.previous = state.previous, ""
            if state.shadow:
                try:
                    candidate = await self._restored(name, Path(state.shadow))
                except CommandError as exc:
                    log.error("model %s: shadow candidate at %s is refused: %s", name, quoted(state.shadow),
                              exc.message)
                    state.shadow = ""
                    continue
                await registry.slot(f"{name}.shadow").install(candidate)

    # -- commands -------------------------------------------------------------------------------------

    async def deploy(self, name: str, folder: Path, mode: Mode = "active", *, by: str = "",
                     model: Model | None = None) -> dict[str, Any]:
        """Serve the model in `folder` as `mode` (`model`: it, as `load` returned it; else it is loaded,
        verified and warmed up here); nothing changes on error."""
        if model is None:
            model = await self.load(name, folder)
        self._check_fits(name, model)
        registry = self.registry
        state = self._state.setdefault(name, SlotState(active=self._serving_folder(name)))
        if mode == "active":
            old = await registry.slot(name).install(model)
            state.previous = state.active if old is not None else ""
            state.active = str(folder)
            self._refused.pop(name, None)
        else:
            await registry.slot(f"{name}.shadow").install(model)
            state.shadow = str(folder)
        self._save()
        await self._rebuild(self._pipelines_using(name))
        result = {"name": name, "version": model.manifest.version, "sha256": model.sha256, "mode": mode, "by": by}
        self._record("model", {"event": "deploy", **result})
        return result

    async def promote(self, name: str, *, by: str = "") -> dict[str, Any]:
        """Make the shadow candidate the active model; the active one becomes `previous`."""
        state = self._state.get(name)
        shadow_slot = self.registry.slot(f"{name}.shadow")
        candidate = shadow_slot.model
        if state is None or not state.shadow or candidate is None:
            raise CommandError("no_shadow", f"model {name!r} has no shadow candidate to promote")
        await self.registry.slot(name).install(candidate)
        state.previous, state.active, state.shadow = state.active, state.shadow, ""
        self._save()
        await self._rebuild(self._pipelines_using(name))
        await self.registry.drop(f"{name}.shadow")  # after the rebuild: no pipeline asks it any more
        result = {"name": name, "version": candidate.manifest.version, "sha256": candidate.sha256, "by": by}
        self._record("model", {"event": "promote", **result})
        return result

    async def rollback(self, name: str, *, by: str = "") -> dict[str, Any]:
        """Drop a shadow candidate if there is one; otherwise serve the previous version again."""
        state = self._state.get(name)
        slot = self.registry.slot(name)
        if state is not None and state.shadow:
            state.shadow = ""
            event = "shadow_dropped"
            serving = slot.model
        else:
            previous = slot.previous
            if previous is None or state is None or not state.previous:
                raise CommandError("nothing_to_roll_back", f"model {name!r} has no previous version on this device")
            await slot.install(previous)
            state.active, state.previous = state.previous, state.active
            event = "rollback"
            serving = previous
        self._save()
        await self._rebuild(self._pipelines_using(name))
        if event == "shadow_dropped":
            await self.registry.drop(f"{name}.shadow")  # after the rebuild: no pipeline asks it any more
        result = {"name": name, "event": event, "by": by,
                  "version": serving.manifest.version if serving else None}
        self._record("model", result)
        return result

    def serving(self, name: str) -> tuple[str | None, str | None]:
        """The versions of `name` serving as active and as shadow (None: none)."""
        versions = []
        for slot_name in (name, f"{name}.shadow"):
            slot = self.registry.get(slot_name)
            model = slot.model if slot is not None else None
            versions.append(model.manifest.version if model is not None else None)
        return versions[0], versions[1]

    def status(self) -> dict[str, Any]:
        status = {name: msgspec.to_builtins(state) for name, state in self._state.items()}
        for name, why in self._refused.items():
            status.setdefault(name, {})["refused"] = why
        return status

    # -- helpers -----------------------------------------------------------------------------------

    def _pipelines_using(self, name: str) -> set[str]:
        return {p.name for p in self._config().pipelines if name in (p.model, p.shadow)}

    def _serving_folder(self, name: str) -> str:
        config = self._config()
        model = config.model(name)
        return str(config.resolve(model.path)) if model is not None else ""

    def _check_fits(self, name: str, model: Model) -> None:
        """Every pipeline that uses `name` must have the model's features as numeric inputs."""
        for p in self._config().pipelines:
            if name not in (p.model, p.shadow):
                continue
            for feature in model.manifest.features:
                kind = p.input.get(feature)
                if kind not in NUMERIC_TYPES:
                    raise CommandError(
                        "model_mismatch",
                        f"model {model.manifest.name} {model.manifest.version} needs numeric input {quoted(feature)}, "
                        f"but pipeline {p.name!r} has {kind or 'no such field'}",
                    )

    def _save(self) -> None:
        write_atomically(self.state_file, msgspec.json.encode(self._state))
