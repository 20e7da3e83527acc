"""paho-mqtt over WebSocket (ws:// or wss://), 3.1.1 and 5.0: subscribe, publish QoS 1, receive.

    websocket.py HOST PORT ws|wss [CA_FILE]
"""
import queue
import ssl
import sys

import paho.mqtt.client as mqtt

HOST, PORT, SCHEME = sys.argv[1], int(sys.argv[2]), sys.argv[3]
CA = sys.argv[4] if len(sys.argv) > 4 else None
PATIENCE = 10.0


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def client(client_id, protocol):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, transport="websockets")
    c.ws_set_options(path="/mqtt")
    if SCHEME == "wss":
        c.tls_set(ca_certs=CA, cert_reqs=ssl.CERT_REQUIRED)
    connected = queue.Queue()
    messages = queue.Queue()
    c.on_connect = lambda cl, u, flags, rc, props: connected.put(rc)
    c.on_message = lambda cl, u, m: messages.put(m)
    c.connect("localhost" if SCHEME == "wss" else HOST, PORT, keepalive=30)
    c.loop_start()
    rc = connected.get(timeout=PATIENCE)
    if rc != 0:
        fail(f"{client_id}: CONNACK {rc}")
    return c, messages


for name, protocol in [("v311", mqtt.MQTTv311), ("v5", mqtt.MQTTv5)]:
    sub, messages = client(f"ws-sub-{name}", protocol)
    sub.subscribe(f"ws/{name}", qos=1)
    pub, _ = client(f"ws-pub-{name}", protocol)
    import time
    time.sleep(0.3)
    info = pub.publish(f"ws/{name}", b"over websocket " + name.encode(), qos=1)
    info.wait_for_publish(timeout=PATIENCE)
    if not info.is_published():
        fail(f"{name}: PUBACK missing")
    try:
        m = messages.get(timeout=PATIENCE)
    except queue.Empty:
        fail(f"{name}: nothing delivered over WebSocket")
    if m.payload != b"over websocket " + name.encode():
        fail(f"{name}: got {m.payload!r}")
    for c in (sub, pub):
        c.disconnect()
        c.loop_stop()
print("ok")
