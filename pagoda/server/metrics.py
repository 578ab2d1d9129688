"""Prometheus metrics with vLLM's names under the ``pagoda:`` prefix, in a registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagoda.api.messages import CoreStats
from pagoda.api.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0, 160.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
_N_BUCKETS = (1, 2, 5, 10, 20)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        r = self.registry
        self.running = Gauge("pagoda:num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("pagoda:num_requests_waiting", "Sequences waiting for admission", registry=r)
        self.kv_usage = Gauge("pagoda:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full)", registry=r)
        self.prefix_queries = Counter("pagoda:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("pagoda:prefix_cache_hits", "Prompt tokens served from the prefix cache",
                                   registry=r)
        self.preemptions = Counter("pagoda:num_preemptions", "Preemptions (recompute)", registry=r)
        self.prompt_tokens = Counter("pagoda:prompt_tokens", "Prompt tokens computed (cache hits excluded)",
                                     registry=r)
        self.generation_tokens = Counter("pagoda:generation_tokens", "Generated tokens", registry=r)
        self.spec_drafts = Counter("pagoda:spec_decode_num_drafts",
                                   "Speculative decoding: requests' steps that verified draft tokens", registry=r)
        self.spec_draft_tokens = Counter("pagoda:spec_decode_num_draft_tokens", "Draft tokens verified", registry=r)
        self.spec_accepted_tokens = Counter("pagoda:spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                            registry=r)
        self.spec_acceptance = Gauge("pagoda:spec_decode_draft_acceptance_rate",
                                     "Accepted / verified draft tokens since start", registry=r)
        self.spec_mean_length = Gauge("pagoda:spec_decode_mean_acceptance_length",
                                      "Tokens a verifying step gained per request on average (accepted drafts + 1)",
                                      registry=r)
        self.success = Counter("pagoda:request_success", "Finished requests by reason", ["finished_reason"],
                               registry=r)
        self.ttft = Histogram("pagoda:time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pagoda:inter_token_latency_seconds", "Time between consecutive output tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("pagoda:e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("pagoda:request_queue_time_seconds", "Arrival to first scheduling",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.iteration_tokens = Histogram("pagoda:iteration_tokens_total", "Tokens computed per engine step",
                                          buckets=_TOKEN_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram("pagoda:request_prompt_tokens", "Prompt tokens per finished request",
                                               buckets=_TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("pagoda:request_generation_tokens",
                                                   "Generated tokens per finished request (all choices)",
                                                   buckets=_TOKEN_BUCKETS, registry=r)
        self.params_n = Histogram("pagoda:request_params_n", "The n of each request", buckets=_N_BUCKETS, registry=r)
        self.params_max_tokens = Histogram("pagoda:request_params_max_tokens",
                                           "The max_tokens of each request (the context left when unset)",
                                           buckets=_TOKEN_BUCKETS, registry=r)
        self.inference_time = Histogram("pagoda:request_inference_time_seconds", "First scheduling to last token",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram("pagoda:request_prefill_time_seconds", "First scheduling to first token",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.decode_time = Histogram("pagoda:request_decode_time_seconds", "First token to last token",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.cache_config = Gauge("pagoda:cache_config_info", "The KV cache's configuration",
                                  ["block_size", "num_gpu_blocks", "enable_prefix_caching", "cache_dtype"], registry=r)
        self.restarts = Counter("pagoda:engine_restarts", "Times the engine core was restarted after dying",
                                registry=r)
        self.info = Gauge("pagoda:model_info", "The served model", list(labels), registry=r)
        self.info.labels(**labels).set(1)
        self._last = CoreStats()

    def update_stats(self, stats: CoreStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        last = self._last
        computed = stats.prompt_tokens + stats.generation_tokens - last.prompt_tokens - last.generation_tokens
        if stats.num_steps > last.num_steps and computed > 0:
            self.iteration_tokens.observe(computed / (stats.num_steps - last.num_steps))
        # The core reports running totals; counters take the increments.
        for counter, now, before in (
            (self.prefix_queries, stats.prefix_cache_queries, last.prefix_cache_queries),
            (self.prefix_hits, stats.prefix_cache_hits, last.prefix_cache_hits),
            (self.preemptions, stats.num_preemptions, last.num_preemptions),
            (self.prompt_tokens, stats.prompt_tokens, last.prompt_tokens),
            (self.generation_tokens, stats.generation_tokens, last.generation_tokens),
            (self.spec_drafts, stats.spec_decode_num_drafts, last.spec_decode_num_drafts),
            (self.spec_draft_tokens, stats.spec_decode_num_draft_tokens, last.spec_decode_num_draft_tokens),
            (self.spec_accepted_tokens, stats.spec_decode_num_accepted_tokens, last.spec_decode_num_accepted_tokens),
        ):
            if now > before:
                counter.inc(now - before)
        if stats.spec_decode_num_drafts:
            self.spec_acceptance.set(stats.spec_decode_num_accepted_tokens / stats.spec_decode_num_draft_tokens)
            self.spec_mean_length.set(1 + stats.spec_decode_num_accepted_tokens / stats.spec_decode_num_drafts)
        self._last = stats

    def observe_params(self, n: int, max_tokens: int) -> None:
        self.params_n.observe(n)
        self.params_max_tokens.observe(max_tokens)

    def set_cache_config(self, block_size: int, num_blocks: int, prefix_caching: bool, dtype: str) -> None:
        self.cache_config.labels(block_size=str(block_size), num_gpu_blocks=str(num_blocks),
                                 enable_prefix_caching=str(prefix_caching), cache_dtype=dtype).set(1)

    def engine_restarted(self) -> None:
        self.restarts.inc()
        self._last = CoreStats()  # the new core counts from zero

    def observe_output(self, out: RequestOutput) -> None:
        """Each output brings its own latency observations, so nothing here is kept per request."""
        times = out.metrics
        if times is None:
            return
        if times.is_first_token and times.first_token is not None:
            self.ttft.observe(max(0.0, times.first_token - times.arrival))
            if times.first_scheduled is not None:
                self.queue_time.observe(max(0.0, times.first_scheduled - times.arrival))
        for gap in times.inter_token_latencies:
            self.itl.observe(gap)
        for o in out.outputs:  # the server's outputs (DELTA, FINAL_ONLY) carry each choice's end once
            if o.finish_reason is not None:
                self.success.labels(finished_reason=o.finish_reason).inc()
        if out.finished:
            self.request_prompt_tokens.observe(len(out.prompt_token_ids))
            self.request_generation_tokens.observe(times.num_generation_tokens)
            if times.last_token is not None:
                self.e2e.observe(max(0.0, times.last_token - times.arrival))
                if times.first_scheduled is not None:
                    self.inference_time.observe(max(0.0, times.last_token - times.first_scheduled))
                if times.first_token is not None:
                    self.decode_time.observe(max(0.0, times.last_token - times.first_token))
            if times.first_token is not None and times.first_scheduled is not None:
                self.prefill_time.observe(max(0.0, times.first_token - times.first_scheduled))

    def render(self) -> bytes:
        return generate_latest(self.registry)
