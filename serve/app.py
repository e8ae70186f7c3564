"""The Serve application builder.

serve run serve.app:build_app index_root=URI [shard_replicas=N] ...
serve run serve/config.yaml      |      serve deploy serve/config.yaml
"""

# No `from __future__ import annotations`: Serve reads build_app's type hint at run time to
# turn the CLI/YAML args into AppArgs.
import dataclasses
import logging

from pydantic import BaseModel, Field, model_validator
from ray.serve import Application

from visual_search import devices, orphans, storage, versions
from visual_search.searchers import QueryEmbedder, ShardSearcher
from visual_search.serving import Ingress, Settings

log = logging.getLogger("visual_search.app")
# Logical CPUs the shard searchers reserve in all by default: with the ingress and the model
# that is 1.75, so any shard count starts on a 2-CPU node (FAISS uses what is free anyway).
SHARD_CPUS = 0.5


class AppArgs(BaseModel):
    index_root: str = Field(description="index root URI holding CURRENT and versions/")
    s3_endpoint: str | None = None
    weights: str | None = Field(None, description="model weights URI (models other than lite0)")
    device: str | None = None
    shard_replicas: int = Field(1, ge=1)
    ingress_replicas: int = Field(
        1, ge=1, description="HTTP ingress replicas (each embeds queries when embed_in_ingress)"
    )
    follow_current: bool = Field(
        True,
        description="every ingress replica switches to a new CURRENT by itself within about "
        "1 s (so they move together); false: only on POST /admin/reload (one replica)",
    )
    embedder_replicas: int = Field(1, ge=1)
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_inflight: int = Field(64, ge=1, description="requests in flight before 503")
    api_key_env: str = Field(
        "VISUAL_SEARCH_API_KEY",
        description="environment variable holding the X-API-Key of /admin/* (in the replicas)",
    )
    upload_tiff: bool = Field(False, description="accept TIFF query photos (off: 415)")
    admin_open: bool = Field(
        False,
        description="allow /admin/* without a key when none is configured (trusted networks "
        "only); by default they answer 403 until a key is set",
    )
    upload_timeout_s: float = Field(30.0, gt=0, description="slower uploads get a 408")
    shard_timeout_s: float = Field(
        5.0, gt=0, description="a shard slower than this is left out of the answer (partial)"
    )
    mmap: bool = True
    rerank: int = Field(
        10,
        ge=0,
        le=100,
        description="top products of POST /search re-ranked by geometric verification (0: off)",
    )
    backdrop_balance: bool = Field(
        True,
        description="a query photo's near-uniform bright border (a backdrop) scaled to white",
    )
    # Logical CPUs reserved per replica (Ray scheduling only; FAISS and torch use what is free).
    ingress_cpus: float = Field(0.25, ge=0)
    embedder_cpus: float = Field(1.0, ge=0)
    shard_cpus: float | None = Field(
        None, ge=0, description=f"per shard replica (default: {SHARD_CPUS} over all shards)"
    )
    embedder_gpus: float = Field(0, ge=0, description="GPUs per replica that embeds queries")
    embedder_threads: int = Field(0, ge=0, description="torch threads (0: Ray's default)")
    embed_in_ingress: bool | None = Field(
        None,
        description="embed queries in the ingress replica (one hop less, no pixels sent "
        "between replicas: best on CPU), or in a QueryEmbedder deployment that scales apart "
        "(GPU nodes, several replicas); default: the ingress unless embedder_gpus > 0 or "
        "embedder_replicas > 1",
    )

    @model_validator(mode="after")
    def _replicas(self):
        if self.embed_in_ingress and self.embedder_replicas > 1:
            raise ValueError(
                "embed_in_ingress runs the model in each ingress replica (ingress_replicas): "
                "embedder_replicas > 1 needs embed_in_ingress false"
            )
        if self.ingress_replicas > 1 and not self.follow_current:
            # /admin/reload switches only the replica that receives it.
            raise ValueError("ingress_replicas > 1 needs follow_current, or they drift apart")
        return self

    @property
    def embeds_in_ingress(self) -> bool:
        if self.embed_in_ingress is not None:
            return self.embed_in_ingress
        return self.embedder_gpus == 0 and self.embedder_replicas == 1


def settings(args: AppArgs) -> Settings:
    """The ingress's Settings: AppArgs fields of the same names."""
    return Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})


def _check_fits(cpus: float) -> None:
    """Say so when the app asks more logical CPUs than the cluster has: Serve would wait for
    them without a word (an autoscaling cluster may still add nodes)."""
    import ray

    have = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else None
    if have is not None and cpus > have:
        log.warning(
            "the app reserves %.2f logical CPUs but the cluster has %.2f: replicas will wait "
            "for nodes; lower shard_cpus / embedder_cpus / ingress_cpus or add nodes",
            cpus,
            have,
        )


def shard_cpus(args: AppArgs, shards: int) -> float:
    """num_cpus of one shard replica: AppArgs.shard_cpus, else SHARD_CPUS split over the shards."""
    return args.shard_cpus if args.shard_cpus is not None else min(0.25, SHARD_CPUS / shards)


def build_app(args: AppArgs) -> Application:
    """Ingress (with the model inside, or -> QueryEmbedder) + one ShardSearcher deployment per
    shard of the CURRENT version."""
    import ray

    if not ray.is_initialized():
        # `serve run serve.app:build_app` builds the app before it starts (or joins) Ray: the
        # last moment to free the ports a hard-killed run's haproxy holds before Serve binds.
        orphans.reap_orphan_haproxy()
    if args.s3_endpoint:
        storage.configure(args.s3_endpoint)
    index_root = storage.normalize(args.index_root)
    manifest = versions.open_version(index_root).manifest
    n = len(manifest.shards)
    per_shard = shard_cpus(args, n)
    shards = [
        ShardSearcher.options(
            name=f"ShardSearcher-{i}",
            num_replicas=args.shard_replicas,
            max_ongoing_requests=2 * args.max_inflight,
            ray_actor_options={"num_cpus": per_shard},
        ).bind(index_root, i, args.s3_endpoint, args.mmap)
        for i in range(n)
    ]
    embedding = {"weights": args.weights, "device": args.device, "threads": args.embedder_threads}
    # The replica that embeds keeps freed tensors in one glibc arena from its start (as the
    # embedding actors do): its forward pass runs on a thread other than the main one, where
    # every activation block was mapped and unmapped per query (embed stage 25.6 -> 19.4 ms:
    # bench/serve.py --images 200 --filler 20000 --seconds 8 --concurrency 1 --rerank 0).
    model = {
        "num_cpus": args.embedder_cpus,
        "num_gpus": args.embedder_gpus,
        "runtime_env": {"env_vars": devices.KEEP_FREED_ENV},
    }
    if args.embeds_in_ingress:
        embedder, local = None, embedding
        ingress = {**model, "num_cpus": args.ingress_cpus + args.embedder_cpus}
    else:
        embedder = QueryEmbedder.options(
            num_replicas=args.embedder_replicas,
            # Serve's default (5) would cap the @serve.batch batches at 5 queries.
            max_ongoing_requests=2 * args.max_inflight,
            ray_actor_options=model,
        ).bind(manifest.model, **embedding)
        local, ingress = None, {"num_cpus": args.ingress_cpus}
    models = 0 if embedder is None else args.embedder_replicas * args.embedder_cpus
    ingresses = args.ingress_replicas * ingress["num_cpus"]
    _check_fits(ingresses + n * args.shard_replicas * per_shard + models)
    config = settings(args)
    return Ingress.options(
        num_replicas=args.ingress_replicas,
        # Uploads being read and searches in flight, plus health checks.
        max_ongoing_requests=config.max_reading + config.max_inflight + 16,
        max_queued_requests=4 * args.max_inflight,
        ray_actor_options=ingress,
    ).bind(embedder, shards, index_root, args.s3_endpoint, config, local)
