"""Model lifecycle on a device: deploy (active or shadow), promote, roll back, survive restarts.

The registry (`models.ModelRegistry`) serves models; this module decides which model a slot
serves and remembers it in `data_dir/models/state.json`, so a restarted device comes back with
the model it was running. A candidate in shadow mode lives in a slot of its own, `<name>.shadow`,
and every pipeline whose model is `<name>` asks it beside the active one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import msgspec

from models import Model, ModelError, ModelRegistry, load_model

from ._config import NUMERIC_TYPES, Config
from ._errors import CommandError
from ._files import write_atomically

log = logging.getLogger("edge.deployments")

Mode = Literal["active", "shadow"]


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

    @property
    def state_file(self) -> Path:
        return self.data_dir / "models" / "state.json"

    def shadow_slot(self, name: str) -> str | None:
        """The slot holding `name`'s shadow candidate, if one is deployed."""
        state = self._state.get(name)
        return f"{name}.shadow" if state is not None and state.shadow else None

    def store_dir(self, name: str, version: str) -> Path:
        """Where a deployed model's files are kept on this device."""
        return self.data_dir / "models" / name / version

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
            for key in ("previous", "active"):
                folder = getattr(state, key)
                if not folder:
                    continue
                try:
                    model = await asyncio.to_thread(load_model, Path(folder))
                except ModelError as exc:
                    log.error("model %s: the %s version at %s cannot be loaded: %s", name, key, folder, exc)
                    continue
                await slot.install(model)
            if state.shadow:
                try:
                    candidate = await asyncio.to_thread(load_model, Path(state.shadow))
                except ModelError as exc:
                    log.error("model %s: shadow candidate at %s cannot be loaded: %s", name, state.shadow, exc)
                    state.shadow = ""
                    continue
                await registry.slot(f"{name}.shadow").install(candidate)

    # -- commands -------------------------------------------------------------------------------------

    async def deploy(self, name: str, folder: Path, mode: Mode = "active", *, by: str = "") -> dict[str, Any]:
        """Load, verify and warm up the model in `folder`, then serve it as `mode`; nothing changes on error."""
        try:
            model = await asyncio.to_thread(load_model, folder)
        except ModelError as exc:
            raise CommandError("bad_model", str(exc)) from None
        self._check_fits(name, model)
        registry = self.registry
        state = self._state.setdefault(name, SlotState(active=self._serving_folder(name)))
        if mode == "active":
            old = await registry.slot(name).install(model)
            state.previous = state.active if old is not None else ""
            state.active = str(folder)
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
        return {name: msgspec.to_builtins(state) for name, state in self._state.items()}

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
                        f"model {model.manifest.name} {model.manifest.version} needs numeric input {feature!r}, "
                        f"but pipeline {p.name!r} has {kind or 'no such field'}",
                    )

    def _save(self) -> None:
        write_atomically(self.state_file, msgspec.json.encode(self._state))
