"""A catalogued dataset's metadata on object storage (moto's S3 on 127.0.0.1): a folder URL or a
glob, read by the card's reader with the credentials of ``input.storage_options`` alone."""
from __future__ import annotations

import pytest

from catalogs import SAMPLE_DIR
from pipeline.job.build import input_shards
from pipeline.job.spec import load_job

AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")


def batches(catalog, files, **input_opts):
    spec = load_job(data={"input": {"catalog": catalog, "files": files, **input_opts},
                          "output": {"dir": "out/x", "samples_per_shard": 2}})
    return [s.batch for s in input_shards(spec)]


@pytest.mark.parametrize("card", ["laion-400m", "cc3m"])
def test_a_card_reads_its_files_from_s3_like_a_local_copy(card, s3, monkeypatch, tmp_path):
    local = SAMPLE_DIR / card
    reference = batches(card, [str(local)])
    assert reference and sum(len(b["url"]) for b in reference) >= 2
    for path in local.iterdir():
        s3.client().put_object(Bucket="mmcurate-test", Key=f"{card}/{path.name}", Body=path.read_bytes())
    s3.client().put_object(Bucket="mmcurate-test", Key=f"{card}/_SUCCESS", Body=b"")
    assert batches(card, [s3.url(card) + "/"]) == reference  # the AWS environment
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    options = {"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"}
    assert batches(card, [s3.url(card)], storage_options=options) == reference
    assert batches(card, [s3.url(f"{card}/*")], storage_options=options) == reference
