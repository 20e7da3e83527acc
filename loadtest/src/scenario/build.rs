//! The scenarios: who connects, subscribes and publishes, and which sink expects which stream.

use std::time::Duration;

use mqfleet_codec::{QoS, SubscriptionOptions};

use super::{DeviceSpec, Plan, SinkSpec, Storm};

/// Names shared by the builders.
#[derive(Debug, Clone)]
pub struct Names {
    /// Client id template; `%i` is the client's index, `%r` the run id.
    pub client_id: String,
    pub username: Option<String>,
    pub run_id: String,
    /// Subscriptions ask for this QoS (the highest in the mix).
    pub sub_qos: QoS,
    /// Every client keeps a persistent session.
    pub persistent: bool,
}

impl Names {
    pub fn fill(&self, template: &str, i: usize) -> String {
        template.replace("%i", &i.to_string()).replace("%r", &self.run_id)
    }

    fn device(&self, i: usize, role: &str) -> DeviceSpec {
        DeviceSpec {
            index: i,
            client_id: self.fill(&self.client_id, i).replace("%s", role),
            username: self.username.as_ref().map(|u| self.fill(u, i)),
            persistent: self.persistent,
            ..Default::default()
        }
    }

    fn sub(&self, filter: String) -> Vec<(String, SubscriptionOptions)> {
        vec![(filter, SubscriptionOptions::qos(self.sub_qos))]
    }
}

/// Connect storm: `n` devices connect (paced by the ramp) and hold for `hold`.
pub fn conn(names: &Names, n: usize, hold: Duration, name: &str) -> Plan {
    let devices = (0..n).map(|i| DeviceSpec { first_phase: true, ramped: true, ..names.device(i, "dev") }).collect();
    Plan {
        name: name.into(),
        devices,
        sinks: vec![],
        streams: 0,
        copies_per_message: 1,
        storm: None,
        hold: hold.max(Duration::from_millis(1)),
    }
}

/// `n` devices publish to `topic(i)`; `backends` subscribers on `filter` (all of them a
/// shared group when `shared` is set).
pub fn telemetry(names: &Names, n: usize, topic: &str, backends: usize, filter: &str, shared: Option<&str>) -> Plan {
    let mut devices: Vec<DeviceSpec> =
        (0..n).map(|i| DeviceSpec { ramped: true, publish: vec![(i as u32, names.fill(topic, i))], ..names.device(i, "dev") }).collect();
    let full_filter = match shared {
        Some(g) => format!("$share/{g}/{filter}"),
        None => filter.to_string(),
    };
    for b in 0..backends.max(1) {
        let i = n + b;
        devices.push(DeviceSpec { first_phase: true, subscribe: names.sub(full_filter.clone()), ..names.device(i, "backend") });
    }
    let all: Vec<u32> = (0..n as u32).collect();
    let sinks = match shared {
        Some(g) => vec![SinkSpec { name: format!("$share/{g}"), members: (n..n + backends.max(1)).collect(), expects: all }],
        None => (n..n + backends.max(1))
            .map(|i| SinkSpec { name: format!("backend-{}", i - n), members: vec![i], expects: all.clone() })
            .collect(),
    };
    let copies = if shared.is_some() { 1 } else { backends.max(1) as u64 };
    Plan { name: "telemetry".into(), devices, sinks, streams: n, copies_per_message: copies, storm: None, hold: Duration::ZERO }
}

/// `n` devices subscribe to their own `topic(i)`; `publishers` backend clients publish a
/// command stream to each.
pub fn command(names: &Names, n: usize, topic: &str, publishers: usize, persistent: bool, name: &str) -> Plan {
    let mut devices: Vec<DeviceSpec> = (0..n)
        .map(|i| DeviceSpec {
            first_phase: true,
            ramped: true,
            persistent: persistent || names.persistent,
            subscribe: names.sub(names.fill(topic, i)),
            ..names.device(i, "dev")
        })
        .collect();
    let p = publishers.max(1);
    for b in 0..p {
        let streams = (0..n).filter(|i| i % p == b).map(|i| (i as u32, names.fill(topic, i))).collect();
        devices.push(DeviceSpec { publish: streams, ..names.device(n + b, "backend") });
    }
    let sinks = (0..n).map(|i| SinkSpec { name: format!("device-{i}"), members: vec![i], expects: vec![i as u32] }).collect();
    Plan { name: name.into(), devices, sinks, streams: n, copies_per_message: 1, storm: None, hold: Duration::ZERO }
}

/// One publisher, `n` subscribers of `topic`.
pub fn broadcast(names: &Names, n: usize, topic: &str) -> Plan {
    let topic = names.fill(topic, 0);
    let mut devices: Vec<DeviceSpec> = (0..n)
        .map(|i| DeviceSpec { first_phase: true, ramped: true, subscribe: names.sub(topic.clone()), ..names.device(i, "dev") })
        .collect();
    devices.push(DeviceSpec { publish: vec![(0, topic)], ..names.device(n, "broadcaster") });
    let sinks = (0..n).map(|i| SinkSpec { name: format!("device-{i}"), members: vec![i], expects: vec![0] }).collect();
    Plan { name: "broadcast".into(), devices, sinks, streams: 1, copies_per_message: n as u64, storm: None, hold: Duration::ZERO }
}

/// `n` publisher/subscriber pairs, each on its own topic (the 1:1 benchmark).
pub fn pairs(names: &Names, n: usize, topic: &str) -> Plan {
    let mut devices: Vec<DeviceSpec> =
        (0..n).map(|i| DeviceSpec { first_phase: true, subscribe: names.sub(names.fill(topic, i)), ..names.device(i, "sub") }).collect();
    for i in 0..n {
        devices.push(DeviceSpec { publish: vec![(i as u32, names.fill(topic, i))], ..names.device(n + i, "pub") });
    }
    let sinks = (0..n).map(|i| SinkSpec { name: format!("subscriber-{i}"), members: vec![i], expects: vec![i as u32] }).collect();
    Plan { name: "pairs".into(), devices, sinks, streams: n, copies_per_message: 1, storm: None, hold: Duration::ZERO }
}

/// MQTT 5 request/response: `n` requesters publish to `requests/%i` with Response Topic
/// `responses/%i` and Correlation Data; `responders` (a shared group) echo each request.
pub fn reqresp(names: &Names, n: usize, responders: usize) -> Plan {
    let mut devices: Vec<DeviceSpec> = (0..n)
        .map(|i| DeviceSpec {
            ramped: true,
            subscribe: names.sub(names.fill("responses/%r/%i", i)),
            publish: vec![(i as u32, names.fill("requests/%r/%i", i))],
            response_topic: Some(names.fill("responses/%r/%i", i)),
            ..names.device(i, "requester")
        })
        .collect();
    for r in 0..responders.max(1) {
        devices.push(DeviceSpec {
            first_phase: true,
            responder: true,
            subscribe: names.sub(names.fill("$share/responders/requests/%r/+", 0)),
            ..names.device(n + r, "responder")
        });
    }
    let sinks = (0..n).map(|i| SinkSpec { name: format!("requester-{i}"), members: vec![i], expects: vec![i as u32] }).collect();
    Plan { name: "reqresp".into(), devices, sinks, streams: n, copies_per_message: 1, storm: None, hold: Duration::ZERO }
}

/// Persistent devices receive commands while `percent` % of them drop off abruptly every
/// `every` and come back: nothing acknowledged may be lost.
pub fn reconnect(names: &Names, n: usize, topic: &str, publishers: usize, percent: f64, every: Duration) -> Plan {
    let mut plan = command(names, n, topic, publishers, true, "reconnect");
    plan.storm = Some(Storm { percent, every });
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names { client_id: "lt-%r-%s-%i".into(), username: None, run_id: "r1".into(), sub_qos: QoS::AtLeastOnce, persistent: false }
    }

    #[test]
    fn persistent_names_make_every_client_persistent() {
        let persistent = Names { persistent: true, ..names() };
        assert!(pairs(&persistent, 3, "t/%i").devices.iter().all(|d| d.persistent));
        assert!(pairs(&names(), 3, "t/%i").devices.iter().all(|d| !d.persistent));
        assert!(command(&names(), 3, "t/%i", 1, true, "c").devices.iter().filter(|d| !d.subscribe.is_empty()).all(|d| d.persistent));
    }

    #[test]
    fn telemetry_with_shared_backends_is_one_sink() {
        let p = telemetry(&names(), 3, "devices/%i/telemetry", 2, "devices/+/telemetry", Some("g"));
        assert_eq!(p.devices.len(), 5);
        assert_eq!(p.devices[1].publish, vec![(1, "devices/1/telemetry".to_string())]);
        assert_eq!(p.sinks.len(), 1);
        assert_eq!(p.sinks[0].members, vec![3, 4]);
        assert_eq!(p.devices[3].subscribe[0].0, "$share/g/devices/+/telemetry");
        assert_eq!(p.devices[3].client_id, "lt-r1-backend-3");
    }

    #[test]
    fn command_spreads_streams_over_publishers() {
        let p = command(&names(), 4, "d/%i/cmd", 2, false, "command");
        assert_eq!(p.devices[4].publish.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(p.devices[5].publish.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(p.sinks[3].expects, vec![3]);
    }
}
