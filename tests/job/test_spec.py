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


@pytest.mark.parametrize("download, message", [
    ("{max_retry_wait: -1}", "download.max_retry_wait: must be >= 0, got -1"),
    ("{sample_deadline: 0}", "download.sample_deadline: must be > 0 or null, got 0"),
    ("{per_address_limit: 0}", "download.per_address_limit: must be > 0 or null, got 0"),
    ("{max_bytes_in_flight: 1000}", "download.max_bytes_in_flight: must be >= max_bytes (50000000) so that any "
                                    "body fits, got 1000"),
    ("{max_bytes_in_flight: lots}", "download.max_bytes_in_flight: expected an integer"),
])
def test_download_waits_and_budgets_are_validated(tmp_path, download, message):
    with pytest.raises(ConfigError) as e:
        load_job(write(tmp_path, f"input: {{files: [a.csv]}}\ndownload: {download}\n"))
    assert message in str(e.value)


def test_download_waits_and_budgets_reach_the_fetcher(tmp_path):
    from pipeline.job.build import fetch_config

    spec = load_job(write(tmp_path, "input: {files: [a.csv]}\n"))
    d = spec.download
    assert (d.max_retry_wait, d.sample_deadline, d.per_address_limit, d.max_bytes_in_flight) == (60.0, 120.0, None, 1 << 30)
    spec = load_job(write(tmp_path, "input: {files: [a.csv]}\ndownload: {max_retry_wait: 5, sample_deadline: null, "
                                    "per_address_limit: 8, max_bytes_in_flight: null}\n"))
    fetch = fetch_config(spec.download)
    assert (fetch.max_retry_wait, fetch.sample_deadline, fetch.per_address_limit, fetch.max_bytes_in_flight) == (
        5, None, 8, None)
