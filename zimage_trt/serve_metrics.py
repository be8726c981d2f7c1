"""The server's Prometheus metrics, in a registry of its own (two servers in one process never share counts)."""

from __future__ import annotations

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
SWITCH_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 20)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        self.latency = Histogram("zimage_request_latency_seconds", "Request latency, arrival to answer", ["status"],
                                 buckets=BUCKETS, registry=r)
        self.stage = Histogram("zimage_stage_latency_seconds", "Device time per stage of a generation", ["stage"],
                               buckets=BUCKETS, registry=r)
        self.queue_depth = Gauge("zimage_queue_depth", "Requests waiting for the GPU", registry=r)
        self.rejected = Counter("zimage_rejected_requests_total", "Requests answered without an image", ["reason"],
                                registry=r)
        self.auth_failures = Counter("zimage_auth_failures_total", "Requests refused for their API key (401)",
                                     ["reason"], registry=r)
        self.connections_closed = Counter(
            "zimage_connections_closed_total", "Connections the server closed on a client: header_timeout, "
            "over_capacity, unread_body (answered before the client finished sending)", ["reason"], registry=r)
        self.images = Counter("zimage_images_total", "Images generated for requests (warm-up excluded)", registry=r)
        self.skipped = Counter("zimage_skipped_jobs_total", "Queued requests dropped before the GPU saw them",
                               ["reason"], registry=r)
        self.lora_switch = Histogram(
            "zimage_lora_switch_seconds", "Time to change the LoRA in the transformer's weights (one weight update)",
            buckets=SWITCH_BUCKETS, registry=r)
        self.graph_failures = Gauge("zimage_cuda_graph_failures",
                                    "CUDA graph captures refused or failed (the loop then runs eagerly)", registry=r)
