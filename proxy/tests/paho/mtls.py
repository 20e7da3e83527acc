"""paho-mqtt over TLS with a client certificate (5.0): the server names the client by its
certificate and says so in CONNACK's Assigned Client Identifier; the client then publishes to
and receives from its own subtree. Prints "assigned <id>" and "received <payload>".

    mtls.py HOST PORT CA_FILE CERT_FILE KEY_FILE
"""
import queue
import ssl
import sys

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes  # noqa: F401  (properties arrive typed)

HOST, PORT, CA, CERT, KEY = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
PATIENCE = 10.0


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="chosen-by-paho", protocol=mqtt.MQTTv5)
c.tls_set(ca_certs=CA, certfile=CERT, keyfile=KEY, cert_reqs=ssl.CERT_REQUIRED)
connected, messages = queue.Queue(), queue.Queue()
c.on_connect = lambda cl, u, flags, rc, props: connected.put((rc, props))
c.on_message = lambda cl, u, m: messages.put(m)
c.connect("localhost", PORT, keepalive=30)
c.loop_start()
rc, props = connected.get(timeout=PATIENCE)
if rc != 0:
    fail(f"CONNACK {rc}")
assigned = getattr(props, "AssignedClientIdentifier", None)
print("assigned", assigned)
c.subscribe(f"devices/{assigned}/echo", qos=1)
c.publish(f"devices/{assigned}/echo", b"over mtls", qos=1).wait_for_publish(timeout=PATIENCE)
try:
    m = messages.get(timeout=PATIENCE)
except queue.Empty:
    fail("no message")
print("received", m.payload.decode())
c.disconnect()
c.loop_stop()
