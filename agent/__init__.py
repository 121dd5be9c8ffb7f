"""The on-device agent: receives signed bundles over MQTT, verifies and installs them, serves local inference.

Light by design: it imports onnxruntime-genai, paho-mqtt, httpx and fastapi, never torch or transformers.
"""

__version__ = "0.1.0"
