import pytest

from pipeline.core.config import ConfigError
from pipeline.job.spec import load_job


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_defaults_and_override(tmp_path):
    spec = load_job(write(tmp_path, "input: {files: [a.parquet]}\n"), ["download.image_size=512",
                                                                       "execution.engine=local"])
    assert spec.download.image_size == 512
    assert spec.download.resize_mode == "center_crop"
    assert spec.execution.engine == "local"
    assert spec.output.samples_per_shard == 10_000


@pytest.mark.parametrize("text, message", [
    ("input: {files: [a.csv]}\ndownload: {imag_size: 3}\n", "download.imag_size: unknown key (did you mean 'image_size'?)"),
    ("input: {files: [a.csv]}\ndownload: {image_size: big}\n", "download.image_size: expected an integer, got 'big'"),
    ("input: {files: [a.csv]}\ndownload: {resize_mode: stretch}\n", "download.resize_mode: expected 'no' | 'border'"),
    ("input: {files: [a.csv]}\nbogus: 1\n", "bogus: unknown key"),
    ("download: {}\n", "input: required key is missing"),
    ("input: {files: []}\n", "input.files: at least one input file is required"),
    ("input: {files: [a.csv]}\ndownload: {encode_quality: 101}\n", "download.encode_quality: must be in 0..100"),
    ("input: {files: [a.csv]}\nexecution: {engine: spark}\n", "execution.engine: expected 'ray' | 'local', got 'spark'"),
    ("input: {files: [a.csv]}\ndownload: {respect_optouts: 'no'}\n", "download.respect_optouts: expected true or false"),
])
def test_errors_name_the_key_and_value(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_job(write(tmp_path, text))
    assert message in str(e.value)


def test_bad_override_is_reported(tmp_path):
    path = write(tmp_path, "input: {files: [a.csv]}\n")
    with pytest.raises(ConfigError, match="download.timeout: expected a number, got 'soon'"):
        load_job(path, ["download.timeout=soon"])
    with pytest.raises(ConfigError, match="expected KEY.SUB=VALUE"):
        load_job(path, ["download.timeout"])
