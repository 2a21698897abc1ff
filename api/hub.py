"""``beaver datasets import``: a Hugging Face dataset into Beaver, on the user's machine.

The dataset is loaded with ``datasets`` where the user is — from the local Hugging Face cache, or the
hub unless ``HF_HUB_OFFLINE=1`` — or from a folder ``save_to_disk`` wrote, written as Parquet to a
temporary file, and uploaded through the API like any Parquet file: the server validates and stores
it all or nothing, and renames columns by ``column_map`` (the server sees no hub, no cache).
Needs the ``hf`` extra (``pip install 'beaver[hf]'``: datasets, pyarrow).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

NAME_MAX = 200  # api.routers.datasets.NAME_MAX


class HubImportError(RuntimeError):
    """The dataset could not be loaded or uploaded; the message says why, in the user's terms."""


def load_hub_dataset(hub_id: str, split: str, config: str | None = None):
    """One split of a hub dataset (``PKU-Alignment/PKU-SafeRLHF``), a local dataset folder
    (``load_dataset`` reads its Parquet / JSON / CSV files) or a ``save_to_disk`` folder."""
    try:
        import datasets
    except ImportError:
        raise HubImportError("importing from Hugging Face needs the 'datasets' package: "
                             "pip install 'beaver[hf]'") from None
    folder = Path(hub_id)
    try:
        if folder.is_dir() and ((folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(folder))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise HubImportError(f"{hub_id} has no split {split!r}; it has {', '.join(loaded)}")
                loaded = loaded[split]
            return loaded
        return datasets.load_dataset(hub_id, config, split=split)
    except HubImportError:
        raise
    except Exception as e:  # noqa: BLE001 — datasets' own errors say what was missing (offline, no such split, …)
        raise HubImportError(f"cannot load {hub_id!r} split {split!r}: {str(e).strip()[:500] or type(e).__name__}") \
            from None


def import_hub_dataset(hub_id: str, split: str, kind: str, url: str, key: str | None, name: str | None = None,
                       column_map: dict[str, str] | None = None, config: str | None = None,
                       timeout: float = 600.0) -> dict:
    """Load ``hub_id``'s ``split`` and upload it to the Beaver server at ``url`` as a dataset of ``kind``;
    returns the dataset object. ``column_map``: a column of the dataset → the record field it is."""
    import json

    import httpx

    dataset = load_hub_dataset(hub_id, split, config)
    name = name or f"{hub_id.rstrip('/').split('/')[-1] if Path(hub_id).is_dir() else hub_id}:{split}"[:NAME_MAX]
    with tempfile.TemporaryDirectory(prefix="beaver-import-") as tmp:
        path = Path(tmp) / "data.parquet"
        dataset.to_parquet(str(path))
        data = {"name": name, "kind": kind}
        if column_map:
            data["column_map"] = json.dumps(column_map)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with path.open("rb") as f:
            try:
                r = httpx.post(url.rstrip("/") + "/v1/datasets", data=data, headers=headers, timeout=timeout,
                               files={"file": (f"{name.replace('/', '_')}.parquet", f,
                                               "application/vnd.apache.parquet")})
            except httpx.HTTPError as e:
                raise HubImportError(f"cannot reach {url}: {e}") from None
    if r.status_code != 201:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:500]
        raise HubImportError(f"the server refused the dataset (HTTP {r.status_code}): {message}")
    return r.json()
