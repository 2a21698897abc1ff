"""Outbound endpoints: the OpenAI-compatible servers an admin allowed jobs to call (BEAVER_ENDPOINTS).

A job names an endpoint (an evaluate job's ``judge.endpoint``); the URL and the key stay the admin's.
Every role may list the names and models, since a trainer must name one in a job and the names are
no secret (an unknown name's 422 lists them too); only admins see where each one points and whether
it has a key — never the key itself.
"""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import Reader
from api.errors import responses
from api.settings import get_settings

router = APIRouter(prefix="/v1/endpoints", tags=["endpoints"], responses=responses(401, 403))


@router.get("")
def list_endpoints(key: Reader) -> dict:
    """The endpoints jobs may call, by name; admins also see each one's URL and whether it has a key."""
    data = []
    for name, endpoint in sorted(get_settings().endpoint_map.items()):
        item = {"object": "endpoint", "name": name, "model": endpoint.model}
        if key.role == "admin":
            item.update(url=endpoint.url, has_api_key=bool(endpoint.api_key or endpoint.api_key_file))
        data.append(item)
    return {"object": "list", "data": data, "has_more": False}
