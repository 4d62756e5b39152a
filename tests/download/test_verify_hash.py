"""verify_hash (img2dataset's): the bytes as fetched must have the hash the input's hash column
gives, compared case-insensitively; a mismatch is failed_to_download / hash_mismatch, a row
without a hash is fetched unchecked."""
import hashlib

import pytest

from pipeline.core import schema
from pipeline.download.image import ImageDownloadConfig, ImageDownloadStage
from pipeline.fetch import FetchConfig
from pipeline.media.resize import ResizeConfig
from pipeline.testing.serve import LocalServer
from tests.helpers.jobs import jpeg


def batch_of(urls, hashes):
    n = len(urls)
    batch = {c: [None] * n for c in schema.STATUS_COLUMNS}
    batch.update({schema.KEY: [f"{i:09d}" for i in range(n)], schema.URL: urls, schema.STATUS: [schema.PENDING] * n,
                  schema.FILES: [{} for _ in range(n)], "published": hashes})
    return batch


@pytest.mark.parametrize("algo", ["sha256", "md5"])
def test_a_wrong_hash_is_hash_mismatch_and_right_or_missing_ones_pass(algo):
    data = {"a.jpg": jpeg(1), "b.jpg": jpeg(2)}
    with LocalServer(data) as srv:
        stage = ImageDownloadStage(ImageDownloadConfig(
            fetch=FetchConfig(allow_private_addresses=True, timeout=5), resize=ResizeConfig(image_size=32),
            verify_hash=algo, hash_col="published"))
        right = hashlib.new(algo, data["a.jpg"]).hexdigest().upper()  # case does not matter
        wrong = hashlib.new(algo, b"something else").hexdigest()
        batch = stage.process(batch_of([srv.url("a.jpg"), srv.url("b.jpg"), srv.url("b.jpg")], [right, wrong, None]))
    assert batch[schema.STATUS] == [schema.SUCCESS, schema.FAILED_TO_DOWNLOAD, schema.SUCCESS]
    assert batch[schema.ERROR_KIND][1] == "hash_mismatch" and wrong in batch[schema.ERROR_MESSAGE][1]
    assert batch[schema.FILES][1] == {} and batch[schema.FILES][0]
