"""One MQTT client factory for the agent and the fleet (paho-mqtt 2.x; imports paho and protocol only).

Workflow: build a frozen `ClientOptions` (broker URL, client id, credentials, TLS files, timings), then
`make_client(opts)` gives a paho client set up for a persistent session (MQTT 3.1.1 clean_session=False, or MQTT 5
clean_start=False with a session expiry), TLS (the given CA file or the system store, and an optional client
certificate), username/password, reconnect back-off and an outgoing queue limit, and optionally manual acks
(`manual_ack=True`: paho sends a QoS 1 message's PUBACK only when the caller calls `client.ack(mid, qos)`, which is
safe from any thread while `loop_start` runs: it only appends to paho's outgoing deque and wakes the loop) with an
MQTT 5 Receive Maximum (`receive_maximum`: how many unacknowledged messages the broker may have out to this client;
on MQTT 3.1.1 the broker's own setting, mosquitto's `max_inflight_messages`, decides); the caller adds its callbacks
(and a last will) and calls `connect(client, opts)` (connect_async + loop_start; paho reconnects by itself).
In the callbacks, `Watch.connack_ok` and `Watch.suback_ok` turn a refused CONNECT (bad credentials, not
authorised) and a refused subscription (reason code >= 0x80) into one clear error line each, logged once until the
next success, instead of a retry loop that logs every second or a subscription that silently never delivers.
"""

from .client import ClientOptions, Watch, connect, make_client

__all__ = ["ClientOptions", "Watch", "connect", "make_client"]
