import os

for _var in ("ORT_DISABLE_TELEMETRY", "OLIVE_DISABLE_TELEMETRY", "HF_HUB_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.fixtures_models"]
