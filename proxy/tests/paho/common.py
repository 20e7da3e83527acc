"""Helpers for the paho-mqtt scenarios: connect, wait for messages, fail loudly."""
import queue
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

HOST, PORT = sys.argv[1], int(sys.argv[2])
PATIENCE = 10.0


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


class Client:
    """A paho client whose received messages land in a queue."""

    def __init__(self, client_id, protocol, clean=True, session_expiry=None, will=None):
        kwargs = {"client_id": client_id, "protocol": protocol}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = clean
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        self.messages = queue.Queue()
        self.acks = queue.Queue()
        self.connack = queue.Queue()
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_subscribe = lambda c, u, mid, codes, props: self.acks.put(("sub", mid, codes))
        self.c.on_connect = lambda c, u, flags, rc, props: self.connack.put((flags, rc, props))
        self.c.on_publish = lambda c, u, mid, rc, props: self.acks.put(("pub", mid, rc))
        if will:
            self.c.will_set(*will)
        props = None
        if protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            if session_expiry is not None:
                props.SessionExpiryInterval = session_expiry
        if protocol == mqtt.MQTTv5:
            self.c.connect(HOST, PORT, keepalive=30, clean_start=clean, properties=props)
        else:
            self.c.connect(HOST, PORT, keepalive=30)
        self.c.loop_start()
        self.flags, self.rc, self.props = self.connack.get(timeout=PATIENCE)
        if self.rc != 0:
            fail(f"{client_id}: CONNACK {self.rc}")

    def subscribe(self, *args, **kwargs):
        _, mid = self.c.subscribe(*args, **kwargs)
        kind, got, codes = self.acks.get(timeout=PATIENCE)
        return codes

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(timeout=PATIENCE)
        if not info.is_published():
            fail(f"publish to {topic} not acknowledged")

    def next(self):
        try:
            return self.messages.get(timeout=PATIENCE)
        except queue.Empty:
            fail("no message arrived in time")

    def nothing(self, wait=0.5):
        try:
            m = self.messages.get(timeout=wait)
            fail(f"unexpected message on {m.topic}: {m.payload!r}")
        except queue.Empty:
            pass

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()
