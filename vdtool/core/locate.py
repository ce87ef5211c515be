"""Finding a parent image named only by UUID (VDI differencing images).

Placeholder until the VDI backend lands: no format records parents by UUID
alone yet, so nothing is found."""

from __future__ import annotations

from typing import Optional


def find_by_uuid(child_path: str, ref, search_dirs=()) -> Optional[str]:
    return None
