"""HTTP routes, one router per area: OpenAI API, operations (health/ready/metrics), admin."""
