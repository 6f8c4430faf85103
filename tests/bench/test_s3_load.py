"""`lora-serve bench s3-load` against moto's S3 server: a random adapter uploaded, registered cold then warm."""

from __future__ import annotations

from pathlib import Path

from lora_serve.bench import s3_load
from tests.lora.s3_helpers import LocalS3


def test_cold_then_warm(s3: LocalS3, tiny_llama_dir: Path) -> None:
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/bench/r4"
    s3_load.upload_random_adapter(url, tiny_llama_dir, rank=4, seed=0)
    assert [key for key, _ in s3.keys(bucket)] == ["bench/r4/adapter_config.json", "bench/r4/adapter_model.safetensors"]
    rows = s3_load.run(tiny_llama_dir, url, repeats=1)
    assert [(r["phase"], r["downloads"]) for r in rows] == [("cold", 1), ("warm", 0)]
    assert sorted(s3.log.get_objects(bucket)) == ["bench/r4/adapter_config.json", "bench/r4/adapter_model.safetensors"]
    assert "# cold: median" in s3_load.report(rows)
