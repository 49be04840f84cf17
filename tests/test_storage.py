"""The storage layer on a local folder and on a real S3 API (moto on loopback): the same calls,
the same results; writes over 5 MiB (multipart); pandas and DuckDB read the shards from S3."""
from __future__ import annotations

import os

import pyarrow as pa
import pytest

from pipeline import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "wd")
    return request.getfixturevalue("s3_workdir")


def _table(n: int = 100) -> pa.Table:
    return pa.table({"id": [f"r{i:05d}" for i in range(n)], "x": list(range(n))})


def test_bytes_json_exists_list_delete(root):
    loc = storage.join(root, "a", "b.json")
    assert not storage.exists(loc) and not storage.is_dir(storage.join(root, "a"))
    storage.write_json(loc, {"k": 1})
    storage.write_bytes(storage.join(root, "a", "c", "d.bin"), b"xyz")
    assert storage.read_json(loc) == {"k": 1}
    assert storage.is_file(loc) and storage.is_dir(storage.join(root, "a"))
    assert storage.size(storage.join(root, "a", "c", "d.bin")) == 3
    assert storage.list_files(storage.join(root, "a")) == {"b.json": storage.size(loc), "c/d.bin": 3}
    assert storage.list_dir(storage.join(root, "a")) == {"b.json": "file", "c": "dir"}
    assert storage.list_files(storage.join(root, "missing")) == {}
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing.json"))
    storage.delete(loc)
    assert not storage.exists(loc)
    storage.delete_tree(storage.join(root, "a"))
    assert storage.list_files(root) == {}


def test_create_exclusive_has_one_winner(root):
    loc = storage.join(root, "claims", "x.json")
    assert storage.create_exclusive(loc, b"first")
    assert not storage.create_exclusive(loc, b"second")
    assert storage.read_bytes(loc) == b"first"


def test_parquet_round_trip_and_sha256(root):
    import hashlib

    loc = storage.join(root, "shards", "00000.parquet")
    n = storage.write_parquet(_table(), loc, compression="zstd")
    assert storage.size(loc) == n
    assert storage.read_parquet(loc).equals(_table())
    assert storage.read_parquet(loc, columns=["x"]).column_names == ["x"]
    assert storage.parquet_file(loc).metadata.num_rows == 100
    assert storage.sha256(loc) == hashlib.sha256(storage.read_bytes(loc)).hexdigest()
    assert list(storage.list_files(storage.join(root, "shards"))) == ["00000.parquet"], "no temp files left"


def test_write_over_5_mib_is_a_complete_multipart_object(root):
    import numpy as np

    data = np.random.default_rng(0).bytes(7 * 1024 * 1024 + 123)
    loc = storage.join(root, "big.bin")
    storage.write_bytes(loc, data)
    assert storage.size(loc) == len(data) and storage.read_bytes(loc) == data
    big = pa.table({"blob": pa.array([data[i:i + 1 << 20] for i in range(0, len(data), 1 << 20)], pa.binary())})
    ploc = storage.join(root, "big.parquet")
    storage.write_parquet(big, ploc, compression="none")
    assert storage.size(ploc) > 5 * 1024 * 1024
    assert storage.read_parquet(ploc).equals(big)


def test_small_s3_writes_are_one_put_and_large_ones_multipart(s3_server, s3_workdir):
    """Markers, manifests, claims and small shards are one PUT each, not a three-request multipart
    upload (create, part, complete): an S3 multipart object's ETag ends in -<parts>."""
    import boto3
    import numpy as np

    storage.write_json(storage.join(s3_workdir, "m.json"), {"k": 1})
    storage.write_parquet(_table(), storage.join(s3_workdir, "s.parquet"))
    storage.write_bytes(storage.join(s3_workdir, "big.bin"), np.random.default_rng(0).bytes(12 * 1024 * 1024))
    bucket, prefix = s3_workdir[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    etag = {name: s3.head_object(Bucket=bucket, Key=f"{prefix}/{name}")["ETag"].strip('"')
            for name in ("m.json", "s.parquet", "big.bin")}
    assert "-" not in etag["m.json"] and "-" not in etag["s.parquet"], etag
    assert "-" in etag["big.bin"], etag  # over the 10 MiB part size: still streamed in parts
    assert storage.read_json(storage.join(s3_workdir, "m.json")) == {"k": 1}


def test_upload_and_download_tree(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("bb")
    storage.upload_tree(src, storage.join(root, "files"))
    assert storage.list_files(storage.join(root, "files")) == {"a.txt": 1, "sub/b.txt": 2}
    assert storage.download_tree(storage.join(root, "files"), tmp_path / "dst") == 2
    assert (tmp_path / "dst" / "sub" / "b.txt").read_text() == "bb"


def test_s3_uri_honours_aws_endpoint_url(s3_server, s3_workdir):
    fs, path = storage.resolve(s3_workdir)
    assert type(fs).__name__ == "S3FileSystem"
    assert path.startswith("kdpipe-test/")
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server


def _two_shards(workdir: str) -> str:
    for i in range(2):
        storage.write_parquet(_table(10).slice(5 * i, 5), storage.join(workdir, "shards", f"0000{i}.parquet"))
    return storage.join(workdir, "shards")


def test_pandas_reads_shards_from_s3(s3_workdir):
    """The incantation documented in README ("Reading artifacts from S3")."""
    import pandas as pd
    import pyarrow.fs as pafs

    shards = _two_shards(s3_workdir)
    # pyarrow's filesystem picks up the standard AWS_* variables: no storage_options needed.
    fs, path = pafs.FileSystem.from_uri(shards)
    df = pd.read_parquet(path, filesystem=fs)
    assert sorted(df["id"]) == [f"r{i:05d}" for i in range(10)]


def test_duckdb_reads_shards_from_s3_through_arrow(s3_workdir):
    import duckdb
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    shards = _two_shards(s3_workdir)
    fs, path = pafs.FileSystem.from_uri(shards)
    con = duckdb.connect()
    con.register("labels", ds.dataset(path, filesystem=fs, format="parquet"))
    assert con.execute("select count(*), sum(x) from labels").fetchone() == (10, 45)


def test_duckdb_reads_shards_from_s3_with_httpfs(s3_workdir):
    import duckdb

    shards = _two_shards(s3_workdir)
    endpoint = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://")
    con = duckdb.connect()
    try:
        con.execute("LOAD httpfs;")
    except duckdb.Error as e:
        pytest.skip(f"DuckDB's httpfs extension is not installed here (`INSTALL httpfs` needs network): {e}")
    con.execute(f"CREATE SECRET (TYPE s3, KEY_ID 'testing', SECRET 'testing', REGION 'us-east-1', "
                f"ENDPOINT '{endpoint}', URL_STYLE 'path', USE_SSL false)")
    rows = con.execute(f"select count(*), sum(x) from read_parquet('{shards}/*.parquet')").fetchone()
    assert rows == (10, 45)
