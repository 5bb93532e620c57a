-- wrk script for scripts/bench: asks for the Docker schema-2 manifest and prints one
-- machine-readable line at the end (requests/s, p99 latency in µs, failures).
wrk.method = "GET"
wrk.headers["Accept"] = "application/vnd.docker.distribution.manifest.v2+json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH rps=%.1f p99_us=%d p50_us=%d requests=%d errors=%d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(99), latency:percentile(50), summary.requests,
    e.connect + e.read + e.write + e.status + e.timeout))
end
