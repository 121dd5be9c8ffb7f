"""On-demand benchmarks (not tests): `python -m bench.agent [--quick]` measures the on-device agent against
onnxruntime-genai run directly, and writes `bench/results/agent-<time>.json` and `.png`."""
