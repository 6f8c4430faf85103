"""`lora-serve bench s3-load`: registering an adapter from s3://, cold (downloaded) and warm (the ETag cache).

    pip install "lora-serve[s3]" "moto[server]"; moto_server -p 5000 &      # or MinIO, or S3 itself
    export AWS_ENDPOINT_URL=http://127.0.0.1:5000 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_DEFAULT_REGION=us-east-1
    lora-serve bench s3-load --url s3://bench/smol-r16 --write-rank 16      # ~20 MB for SmolLM2-135M, all seven projections

Each repeat times AdapterCatalog.register_from, the work POST /v1/load_lora_adapter does on its worker
thread (list the prefix, download, validate, register), first into an empty adapter_cache_dir, then again
after an unregister, when the copy is found by its ETags (downloads: S3Source.num_downloads; the tests count the
store's GetObjects themselves, tests/api/test_adapters_s3.py).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from ..config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from ..engine.async_engine import AsyncEngine
from ..lora.lora_model import CONFIG_FILE, WEIGHTS_FILE
from ..lora.s3 import S3Location
from ..model.arch import ModelArch
from .random_adapters import write_random_adapter
from .table import markdown_table


def upload_random_adapter(url: str, model_path: Path, rank: int, seed: int) -> int:
    """Write a random adapter of `rank` on every projection and put it at `url` (the bucket is created
    if need be); its size in bytes."""
    import boto3

    loc = S3Location.parse(url)
    client = boto3.session.Session().client("s3")
    if loc.bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=loc.bucket)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_adapter(Path(tmp) / "adapter", ModelArch.from_dir(model_path), rank, seed)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            client.upload_file(str(folder / name), loc.bucket, loc.child(name).prefix)
        return sum((folder / name).stat().st_size for name in (CONFIG_FILE, WEIGHTS_FILE))


def run(model_path: Path, url: str, repeats: int) -> list[dict]:
    """One row per repeat and phase: seconds to register, and the downloads it made. The engine is the
    server's (AsyncEngine: its thread owns torch's CPU threads), and each registration runs where the load
    API runs it (AsyncEngine.run_blocking)."""
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for repeat in range(repeats):
            lora = LoRAConfig(adapter_dir=Path(cache) / "adapters", adapter_cache_dir=Path(cache) / f"s3-{repeat}", allowed_lora_dir=[url])
            config = EngineConfig(
                model=ModelConfig(model=str(model_path)),
                cache=CacheConfig(kv_cache_memory_gb=0.05),
                scheduler=SchedulerConfig(max_model_len=256),  # nothing is generated: the KV cache stays small
                lora=lora,
            )
            engine = AsyncEngine.from_config(config)
            catalog = engine.adapters
            try:
                for phase in ("cold", "warm"):
                    downloads = catalog.sources.s3.num_downloads
                    start = time.perf_counter()
                    record = asyncio.run(engine.run_blocking(catalog.register_from, "bench-s3", url, "load-api"))
                    seconds = time.perf_counter() - start
                    catalog.unregister("bench-s3")
                    rows.append(
                        {
                            "repeat": repeat,
                            "phase": phase,
                            "MB": round(record.num_bytes / 1e6, 1),
                            "seconds": round(seconds, 3),
                            "downloads": catalog.sources.s3.num_downloads - downloads,
                        }
                    )
            finally:
                engine.shutdown()
    return rows


def report(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = [markdown_table(header, [[str(r[k]) for k in header] for r in rows])]
    for phase in ("cold", "warm"):
        times = [r["seconds"] for r in rows if r["phase"] == phase]
        lines.append(f"# {phase}: median {statistics.median(times):.3f} s over {len(times)}")
    return "\n".join(lines)
