"""The KV-tier benchmark (issue 13): simulated engines sharing a Redis KV tier behind the
gateway, with and without the tier and tier-aware routing. Run ``python -m benchmarks.kvtier``
(``make bench-kvtier``); see docs/kvtier.md."""
