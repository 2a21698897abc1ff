"""Dataset upload: Beaver's bulk path (validate all, one transaction, chunked multi-row inserts)
against a naive baseline (one ORM object added per record), side by side on the same database; and
the same records uploaded as Parquet beside JSONL (issue 21: Parquet no slower).

    python bench/dataset_upload.py [--records 100000] [--database-url URL]

Prints records/s of each; the JSONL/naive line ends with the ratio Beaver/naive like ``12.3x``, the
last line with Parquet's time over JSONL's (≤ 1: Parquet no slower).
Writes bench/results/dataset_upload.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def records(n: int) -> list[dict]:
    return [{"prompt": f"how do i make thing {i} ?", "response_0": "sure . step 1 : mix .",
             "response_1": "sorry , i can not help .", "is_response_0_safe": i % 3 != 0, "is_response_1_safe": True,
             "better_response_id": 0, "safer_response_id": 1} for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="beaver-bench-")
    os.environ["BEAVER_HOME"] = home
    if args.database_url:
        os.environ["BEAVER_DATABASE_URL"] = args.database_url
    from fastapi.testclient import TestClient
    from sqlmodel import Session

    from api.app import create_app
    from api.db import get_engine, upgrade
    from api.deps import create_key
    from api.tables import Dataset, DatasetRecord, new_id

    upgrade()
    with Session(get_engine()) as session:
        key = create_key(session, "bench", "admin")[1]
    data = records(args.records)
    body = "\n".join(json.dumps(r) for r in data).encode()
    client = TestClient(create_app())

    t = time.perf_counter()
    r = client.post("/v1/datasets", data={"name": "bench", "kind": "preference"},
                    files={"file": ("bench.jsonl", body)}, headers={"Authorization": f"Bearer {key}"})
    beaver_s = time.perf_counter() - t
    assert r.status_code == 201, r.text

    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(data), buf)  # one row group per 1M rows by default, as datasets writes
    t = time.perf_counter()
    r = client.post("/v1/datasets", data={"name": "bench-parquet", "kind": "preference"},
                    files={"file": ("bench.parquet", buf.getvalue())}, headers={"Authorization": f"Bearer {key}"})
    parquet_s = time.perf_counter() - t
    assert r.status_code == 201, r.text

    t = time.perf_counter()  # naive: what an ORM-first handler does, one object per record
    with Session(get_engine()) as session:
        ds = Dataset(id=new_id("ds"), name="naive", kind="preference", num_records=len(data))
        session.add(ds)
        for i, rec in enumerate(data):
            session.add(DatasetRecord(dataset_id=ds.id, idx=i, data=rec))
        session.commit()
    naive_s = time.perf_counter() - t

    result = {"records": args.records, "database": get_engine().url.get_backend_name(),
              "beaver_seconds": beaver_s, "naive_seconds": naive_s, "parquet_seconds": parquet_s,
              "jsonl_bytes": len(body), "parquet_bytes": len(buf.getvalue()),
              "parquet_over_jsonl": parquet_s / beaver_s,
              "beaver_records_per_s": args.records / beaver_s, "naive_records_per_s": args.records / naive_s}
    out = Path(__file__).parent / "results" / "dataset_upload.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"beaver (HTTP upload + validation + bulk insert): {beaver_s:.2f} s, {result['beaver_records_per_s']:,.0f} records/s")
    print(f"naive (ORM add per record, no HTTP, no validation): {naive_s:.2f} s, {result['naive_records_per_s']:,.0f} records/s")
    print(f"dataset upload of {args.records} records, beaver/naive: {naive_s / beaver_s:.2f}x")
    print(f"parquet (HTTP upload + decoding + validation + bulk insert, {len(buf.getvalue()):,} bytes against "
          f"{len(body):,} of JSONL): {parquet_s:.2f} s, {args.records / parquet_s:,.0f} records/s")
    print(f"dataset upload of {args.records} records, parquet/jsonl time: {parquet_s / beaver_s:.2f}x")


if __name__ == "__main__":
    main()
