"""MQTT 5.0 with paho-mqtt: properties, subscription identifiers, shared subscriptions,
No Local, Retain Handling, session expiry with a queued message."""
from common import *
from paho.mqtt.subscribeoptions import SubscribeOptions

sub = Client("paho5-sub", mqtt.MQTTv5)
props = Properties(PacketTypes.SUBSCRIBE)
props.SubscriptionIdentifier = 42
sub.subscribe("p5/#", options=SubscribeOptions(qos=1), properties=props)

pub = Client("paho5-pub", mqtt.MQTTv5)
pp = Properties(PacketTypes.PUBLISH)
pp.UserProperty = [("a", "1"), ("b", "2")]
pp.ContentType = "text/plain"
pp.ResponseTopic = "p5/replies"
pp.CorrelationData = b"corr-7"
pp.MessageExpiryInterval = 120
pub.publish("p5/x", "hello", qos=1, properties=pp)
m = sub.next()
mp = m.properties
if m.payload != b"hello":
    fail(f"payload {m.payload!r}")
if mp.UserProperty != [("a", "1"), ("b", "2")]:
    fail(f"user properties {mp.UserProperty}")
if mp.ContentType != "text/plain" or mp.ResponseTopic != "p5/replies" or mp.CorrelationData != b"corr-7":
    fail("request/response properties lost")
if 42 not in mp.SubscriptionIdentifier:
    fail(f"subscription identifier {mp.SubscriptionIdentifier}")
if not (0 < mp.MessageExpiryInterval <= 120):
    fail(f"message expiry {mp.MessageExpiryInterval}")

# No Local: our own message does not come back.
me = Client("paho5-me", mqtt.MQTTv5)
me.subscribe("p5nl/t", options=SubscribeOptions(qos=1, noLocal=True))
me.publish("p5nl/t", "mine", qos=1)
me.nothing()

# Retain Handling 2: no retained message at subscribe.
pub.publish("p5r/t", "retained", qos=1, retain=True)
rh = Client("paho5-rh", mqtt.MQTTv5)
rh.subscribe("p5r/t", options=SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND))
rh.nothing()
rh.subscribe("p5r/#", options=SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE))
if rh.next().payload != b"retained":
    fail("retained message expected with Retain Handling 0")

# Shared subscription: two members split the messages.
w1 = Client("paho5-w1", mqtt.MQTTv5)
w2 = Client("paho5-w2", mqtt.MQTTv5)
for w in (w1, w2):
    w.subscribe("$share/pool/p5jobs", options=SubscribeOptions(qos=1))
for i in range(4):
    pub.publish("p5jobs", f"job{i}", qos=1)
got = [w1.next().payload for _ in range(2)] + [w2.next().payload for _ in range(2)]
if sorted(got) != [b"job0", b"job1", b"job2", b"job3"]:
    fail(f"shared subscription delivered {got}")

# Session expiry: the session and its queue outlive the connection.
s = Client("paho5-sess", mqtt.MQTTv5, clean=False, session_expiry=300)
s.subscribe("p5s/t", options=SubscribeOptions(qos=1))
s.close()
pub.publish("p5s/t", "queued", qos=1)
s = Client("paho5-sess", mqtt.MQTTv5, clean=False, session_expiry=300)
if not s.flags.session_present:
    fail("session present expected")
if s.next().payload != b"queued":
    fail("queued message missing")
print("ok")
