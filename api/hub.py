"""``beaver datasets import``: a Hugging Face dataset into Beaver, on the user's machine.

The dataset is loaded with ``datasets`` where the user is — from the local Hugging Face cache, or the
hub unless ``HF_HUB_OFFLINE=1`` — or from a folder ``save_to_disk`` wrote, written as Parquet to a
temporary file, and uploaded through the API like any Parquet file: the server validates and stores
it all or nothing, and renames columns by ``column_map`` (the server sees no hub, no cache).
Needs the ``hf`` extra (``pip install 'beaver[hf]'``: datasets, pyarrow).
"""

from __future__ import annotations

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
    returns the dataset object. ``column_map``: a column of the dataset → the record field it is.
    (``api.client.Client.import_hub_dataset`` with every failure a ``HubImportError``.)"""
    from api.client import BeaverError, Client

    with Client(url, key, timeout=timeout) as client:
        try:
            return client.import_hub_dataset(hub_id, split, kind, name, column_map, config)
        except BeaverError as e:
            if not e.status:
                raise HubImportError(e.message) from None
            raise HubImportError(f"the server refused the dataset (HTTP {e.status}): {e.message}") from None
