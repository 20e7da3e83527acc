"""paho-mqtt with credentials: a good password gets CONNACK 0, a bad one the refusal code of
its version (3.1.1: 4, 5.0: 134 Bad User Name or Password). Prints "<version> <case> <code>"."""
import queue

import paho.mqtt.client as mqtt

from common import HOST, PORT, PATIENCE, fail


def connack_code(protocol, username, password):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-auth-{username}-{password}", protocol=protocol)
    c.username_pw_set(username, password)
    got = queue.Queue()
    c.on_connect = lambda c, u, flags, rc, props: got.put(rc)
    c.connect(HOST, PORT, keepalive=30)
    c.loop_start()
    try:
        rc = got.get(timeout=PATIENCE)
    except queue.Empty:
        fail(f"no CONNACK for {username}")
    c.disconnect()
    c.loop_stop()
    if protocol == mqtt.MQTTv311 and rc.value != 0:
        # paho reports 3.1.1 return codes translated to 5.0 reason codes; translate back.
        return {0x86: 4, 0x87: 5}.get(rc.value, rc.value)
    return rc.value


for name, protocol in (("v311", mqtt.MQTTv311), ("v5", mqtt.MQTTv5)):
    print(name, "good", connack_code(protocol, "alice", "wonderland"))
    print(name, "bad", connack_code(protocol, "alice", "not-the-password"))
