"""MQTT 3.1.1 with paho-mqtt: QoS 0/1/2, retained messages, persistent sessions, wills."""
from common import *

sub = Client("paho-sub", mqtt.MQTTv311)
codes = sub.subscribe("paho/+", qos=2)
pub = Client("paho-pub", mqtt.MQTTv311)
for qos in (0, 1, 2):
    pub.publish("paho/q", f"qos{qos}", qos=qos)
    m = sub.next()
    if m.payload != f"qos{qos}".encode() or m.qos != qos:
        fail(f"got {m.payload!r} at QoS {m.qos}, expected qos{qos}")

pub.publish("paho/retained", "kept", qos=1, retain=True)
late = Client("paho-late", mqtt.MQTTv311)
late.subscribe("paho/retained", qos=1)
m = late.next()
if not m.retain or m.payload != b"kept":
    fail(f"retained: {m.payload!r} retain={m.retain}")

# A persistent session queues while offline.
p = Client("paho-persistent", mqtt.MQTTv311, clean=False)
p.subscribe("paho/offline", qos=1)
p.close()
pub.publish("paho/offline", "while-away", qos=1)
p = Client("paho-persistent", mqtt.MQTTv311, clean=False)
if not p.flags.session_present:
    fail("session present expected")
if p.next().payload != b"while-away":
    fail("queued message missing")
p.close()

# Will on network loss.
watcher = Client("paho-watcher", mqtt.MQTTv311)
watcher.subscribe("paho/will", qos=1)
doomed = Client("paho-doomed", mqtt.MQTTv311, will=("paho/will", "doomed left", 1, False))
doomed.c.socket().close()  # no DISCONNECT: network loss
if watcher.next().payload != b"doomed left":
    fail("will not published")
print("ok")
