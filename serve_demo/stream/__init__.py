"""Live streams through the served detector: sources in their own threads (newest frame first),
tracks and counters, and the sinks people watch (MP4, JSON lines, MJPEG, Prometheus).

``serve_demo stream SOURCE ... --out DIR`` (:mod:`.cli`); the moving-shapes clip with known truth
that ``make stream`` and the tests play is :mod:`.clip`.
"""
