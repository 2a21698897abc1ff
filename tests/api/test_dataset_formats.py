"""Parquet and save_to_disk uploads, column maps, exports, and ``import_hub_dataset`` — on datasets
made here (never the hub)."""

import io
import json
import tarfile
import zipfile

import pytest

from tests.api.conftest import auth
from tests.api.test_datasets import count_rows, pref

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def parquet_bytes(records, row_group_size=None, **kwargs) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buf, row_group_size=row_group_size, **kwargs)
    return buf.getvalue()


def upload(client, key, content: bytes, filename="data.parquet", kind="preference", **fields):
    return client.post("/v1/datasets", data={"name": "hf", "kind": kind, **fields},
                       files={"file": (filename, content, "application/octet-stream")}, headers=auth(key))


def all_records(client, key, dataset_id):
    r = client.get(f"/v1/datasets/{dataset_id}/export?format=jsonl", headers=auth(key))
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


def test_parquet_upload_row_groups_nulls_and_exports(client, keys):
    # A tie (null ids) and no severity are kept as null, as the schema means them; a column null in one
    # row that the schema does not know (source) is an absent field there.
    records = [pref(i, response_0_severity_level=i % 3, source=f"s{i}") for i in range(7)]
    records += [pref(7, better_response_id=None, safer_response_id=None, response_0_severity_level=None,
                     source=None)]
    content = parquet_bytes(records, row_group_size=3)  # three row groups, the name says nothing
    r = upload(client, keys["annotator"], content, filename="blob.bin")
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["num_records"] == 8 and ds["stats"]["harm_categories"] == {"violence": 8}
    expected = [dict(r) for r in records]
    del expected[7]["source"]
    assert all_records(client, keys["viewer"], ds["id"]) == expected  # viewers export, like records

    r = client.get(f"/v1/datasets/{ds['id']}/export?format=parquet", headers=auth(keys["viewer"]))
    assert r.status_code == 200 and r.content.startswith(b"PAR1")
    assert r.headers["content-type"] == "application/vnd.apache.parquet"
    table = pq.read_table(io.BytesIO(r.content))
    assert table.num_rows == 8 and table.column("prompt").to_pylist() == [x["prompt"] for x in records]
    # Parquet out, Parquet in: the same records.
    again = upload(client, keys["annotator"], r.content)
    assert again.status_code == 201, again.text
    assert all_records(client, keys["viewer"], again.json()["id"]) == expected


def test_export_streams_many_chunks_and_refuses_unknown(client, keys, monkeypatch):
    from api.routers import datasets

    monkeypatch.setattr(datasets, "EXPORT_CHUNK", 4)  # 10 records: three reads, three row groups
    records = [{"prompt": f"p {i}"} if i % 2 else {"prompt": f"p {i}", "red_team": True} for i in range(10)]
    ds = client.post("/v1/datasets", json={"name": "p", "kind": "prompt", "records": records},
                     headers=auth(keys["admin"])).json()
    assert all_records(client, keys["viewer"], ds["id"]) == records
    r = client.get(f"/v1/datasets/{ds['id']}/export?format=parquet", headers=auth(keys["viewer"]))
    parquet = pq.ParquetFile(io.BytesIO(r.content))
    assert parquet.metadata.num_row_groups == 3
    assert parquet.read().column("red_team").to_pylist() == [r.get("red_team") for r in records]
    assert client.get(f"/v1/datasets/{ds['id']}/export?format=csv", headers=auth(keys["viewer"])).status_code == 422
    assert client.get("/v1/datasets/ds_nope/export", headers=auth(keys["viewer"])).status_code == 404


def test_parquet_bad_rows_named_by_row_and_nothing_stored(client, keys):
    records = [pref(0), pref(1, better_response_id=2), pref(2), pref(3, prompt="")]
    r = upload(client, keys["admin"], parquet_bytes(records, row_group_size=2))
    assert r.status_code == 422
    details = {(d["line"], d["field"]) for d in r.json()["error"]["details"]}
    assert details == {(2, "better_response_id"), (4, "prompt")}
    assert count_rows() == (0, 0)
    nan = upload(client, keys["admin"], parquet_bytes([{"prompt": "p", "score": float("nan")}]), kind="prompt")
    assert nan.status_code == 422 and nan.json()["error"]["param"] == "score"
    binary = upload(client, keys["admin"], parquet_bytes([{"prompt": "p", "blob": b"\x00\x01"}]), kind="prompt")
    assert binary.status_code == 422 and binary.json()["error"]["param"] == "blob"
    assert "binary" in binary.json()["error"]["message"]
    broken = upload(client, keys["admin"], b"PAR1" + b"\x00" * 100)
    assert broken.status_code == 422 and broken.json()["error"]["param"] == "file"
    assert count_rows() == (0, 0)


def test_column_map_for_parquet_jsonl_and_json(client, keys):
    rows = [{"question": f"q {i}", "answer": f"a {i}"} for i in range(3)]
    column_map = json.dumps({"question": "prompt", "answer": "response"})
    r = upload(client, keys["admin"], parquet_bytes(rows), kind="sft", column_map=column_map)
    assert r.status_code == 201, r.text
    assert all_records(client, keys["admin"], r.json()["id"])[0] == {"prompt": "q 0", "response": "a 0"}
    jsonl = "\n".join(json.dumps(x) for x in rows).encode()
    r = upload(client, keys["admin"], jsonl, filename="d.jsonl", kind="sft", column_map=column_map)
    assert r.status_code == 201, r.text
    r = client.post("/v1/datasets", json={"name": "j", "kind": "sft", "records": rows,
                                          "column_map": json.loads(column_map)}, headers=auth(keys["admin"]))
    assert r.status_code == 201, r.text
    assert all_records(client, keys["admin"], r.json()["id"])[2] == {"prompt": "q 2", "response": "a 2"}
    # Without the map the same file is invalid; a map naming a column the file lacks, or not JSON, is refused.
    assert upload(client, keys["admin"], parquet_bytes(rows), kind="sft").status_code == 422
    for bad in ('{"nope": "prompt"}', "{not json", '["prompt"]', '{"question": "answer"}'):
        r = upload(client, keys["admin"], parquet_bytes(rows), kind="sft", column_map=bad)
        assert r.status_code == 422 and r.json()["error"]["param"] == "column_map", (bad, r.text)
    assert count_rows()[0] == 3


def test_decoded_size_is_bounded_like_the_upload(client, keys, monkeypatch):
    from api.settings import get_settings

    monkeypatch.setenv("BEAVER_MAX_UPLOAD_MB", "0.05")  # 50 KiB
    get_settings.cache_clear()
    # ~2 MB of text compresses to a few KiB: a small file may not unpack past the limit.
    bomb = parquet_bytes([{"prompt": "a" * 200_000} for _ in range(10)], compression="zstd")
    assert len(bomb) < 50_000
    r = upload(client, keys["admin"], bomb, kind="prompt")
    assert r.status_code == 413 and "BEAVER_MAX_UPLOAD_MB" in r.json()["error"]["message"]
    # A gzip tar holding 2 MB of zeros (in a file no state.json names): refused by its members' declared
    # sizes, before it is walked through.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("ds/junk.bin")
        info.size = 2_000_000
        tf.addfile(info, io.BytesIO(bytes(info.size)))
        state = json.dumps({"_data_files": []}).encode()
        info = tarfile.TarInfo("ds/state.json")
        info.size = len(state)
        tf.addfile(info, io.BytesIO(state))
    assert len(buf.getvalue()) < 50_000
    r = upload(client, keys["admin"], buf.getvalue(), kind="prompt")
    assert r.status_code == 413 and "archive" in r.json()["error"]["message"]
    assert count_rows() == (0, 0)


# --- save_to_disk folders ---------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = [pref(i) for i in range(6)]
    test = [pref(100 + i) for i in range(2)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                               "test": datasets.Dataset.from_list(test)})
    dd.save_to_disk(str(tmp_path / "pku"), num_shards={"train": 3, "test": 1})  # train: several Arrow files
    return tmp_path / "pku", train, test


def tar_of(folder, arcname, mode="w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        tf.add(folder, arcname=arcname)
    return buf.getvalue()


def test_save_to_disk_archives(client, keys, saved):
    folder, train, test = saved
    assert len(list((folder / "train").glob("*.arrow"))) > 1
    content = tar_of(folder, "pku")
    r = upload(client, keys["admin"], content, filename="pku.tar.gz")
    assert r.status_code == 422 and r.json()["error"]["param"] == "split"
    assert "test" in r.json()["error"]["message"] and "train" in r.json()["error"]["message"]
    r = upload(client, keys["admin"], content, filename="pku.tar.gz", split="train")
    assert r.status_code == 201, r.text
    assert all_records(client, keys["admin"], r.json()["id"]) == train  # shards in state.json's order

    buf = io.BytesIO()  # a zip of one split's folder, plain tar of it
    with zipfile.ZipFile(buf, "w") as zf:
        for path in (folder / "test").iterdir():
            zf.write(path, f"./test/{path.name}")
    r = upload(client, keys["admin"], buf.getvalue(), filename="x")
    assert r.status_code == 201, r.text
    assert all_records(client, keys["admin"], r.json()["id"]) == test
    r = upload(client, keys["admin"], tar_of(folder / "test", ".", mode="w"), filename="x")
    assert r.status_code == 201, r.text
    r = upload(client, keys["admin"], content, split="validation")
    assert r.status_code == 422 and "validation" in r.json()["error"]["message"]


def test_archive_paths_are_names_never_paths(client, keys, saved, tmp_path):
    """A state.json naming a file outside its folder, and members with ``..`` or absolute names, are
    refused or ignored: nothing is unpacked anywhere."""
    folder, _, _ = saved
    evil_state = json.dumps({"_data_files": [{"filename": "../test/" + next((folder / "test").glob("*.arrow")).name}]})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for path in (folder / "test").iterdir():
            tf.add(path, f"test/{path.name}")
        for name, data in (("train/state.json", evil_state.encode()), ("../escape.txt", b"x"),
                           ("/tmp/abs.txt", b"y")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    r = upload(client, keys["admin"], buf.getvalue(), split="train")
    assert r.status_code == 422 and "not a plain file name" in r.json()["error"]["message"]
    assert not (tmp_path.parent / "escape.txt").exists()
    no_state = io.BytesIO()
    with tarfile.open(fileobj=no_state, mode="w") as tf:
        info = tarfile.TarInfo("readme.txt")
        tf.addfile(info, io.BytesIO(b""))
    r = upload(client, keys["admin"], no_state.getvalue())
    assert r.status_code == 422 and "state.json" in r.json()["error"]["message"]
    assert count_rows() == (0, 0)


# --- import from Hugging Face (local data only) -------------------------------------------------------------


def test_import_hub_dataset_from_local_folders(live_server, keys, saved, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    from api.hub import HubImportError, import_hub_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    url = f"http://127.0.0.1:{live_server}"
    folder, train, _ = saved
    ds = import_hub_dataset(str(folder), split="train", kind="preference", url=url, key=keys["annotator"])
    assert ds["num_records"] == 6 and ds["name"] == "pku:train"

    # A dataset repository's layout on disk (what load_dataset reads from a clone or the cache):
    # Parquet files under data/, named differently than Beaver's fields.
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    rows = [{"question": f"q {i}", "answer": f"a {i}"} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), repo / "data" / "train-00000-of-00001.parquet")
    ds = import_hub_dataset(str(repo), split="train", kind="sft", url=url, key=keys["annotator"],
                            column_map={"question": "prompt", "answer": "response"}, name="qa")
    assert ds["num_records"] == 4 and ds["kind"] == "sft"
    import httpx

    exported = httpx.get(f"{url}/v1/datasets/{ds['id']}/export", headers=auth(keys["viewer"])).text
    assert [json.loads(line) for line in exported.splitlines()][3] == {"prompt": "q 3", "response": "a 3"}

    with pytest.raises(HubImportError, match="refused.*422"):  # the map's absence: invalid records, named
        import_hub_dataset(str(repo), split="train", kind="sft", url=url, key=keys["annotator"])
    with pytest.raises(HubImportError, match="refused.*403"):
        import_hub_dataset(str(repo), split="train", kind="sft", url=url, key=keys["viewer"],
                           column_map={"question": "prompt", "answer": "response"})
    with pytest.raises(HubImportError, match="cannot load"):  # offline, and not in the cache
        import_hub_dataset("no-such-org/no-such-dataset", split="train", kind="sft", url=url, key=keys["admin"])
