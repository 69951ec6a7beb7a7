"""The components installed in this runtime: the only code a deployed flow may run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

# Our own lfx components (lfx_components/<bundle>/*.py), added to lfx's components path so the
# catalogue holds their code like any installed component's, in every process that loads it
# (the runtime, and the CMP when it checks a seller's flow).
COMPONENTS_DIR = Path(__file__).with_name("lfx_components")


@dataclass(frozen=True, slots=True)
class ComponentCatalogue:
    """Component type (and its legacy aliases) to the source of the installed component."""

    code_by_type: Mapping[str, str]

    @classmethod
    async def load(cls) -> ComponentCatalogue:
        """Ask lfx for its component index (built-ins, provider bundles, components path)."""
        from lfx.interface.components import component_cache, get_and_cache_all_types_dict
        from lfx.services.deps import get_settings_service

        settings = get_settings_service()
        if settings is None:
            raise RuntimeError("lfx has no settings service")
        paths = settings.settings.components_path
        if str(COMPONENTS_DIR) not in paths:
            paths.append(str(COMPONENTS_DIR))
        await get_and_cache_all_types_dict(settings)  # type: ignore[arg-type]
        with component_cache.state_lock:
            code_by_type = dict(component_cache.type_to_code or {})
        if not code_by_type:
            raise RuntimeError("lfx reported no installed components")
        return cls(MappingProxyType(code_by_type))

    def code_for(self, component_type: str) -> str | None:
        return self.code_by_type.get(component_type)
