//! The names strum derives are the names serde puts on the wire, for every variant.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location
use orch_shared::api::{JobStatus, TaskStatus};
use orch_shared::event::EventKind;
use orch_shared::job::Backend;
use orch_shared::role::Role;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::str::FromStr;
use strum::{IntoEnumIterator, VariantNames};

fn wire_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value).unwrap() {
        serde_json::Value::String(s) => s,
        other => panic!("not a string: {other}"),
    }
}

fn same_names<T>(as_str: fn(&T) -> &'static str)
where
    T: IntoEnumIterator + VariantNames + Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let all: Vec<T> = T::iter().collect();
    assert_eq!(all.len(), T::VARIANTS.len());
    for (value, name) in all.iter().zip(T::VARIANTS) {
        assert_eq!(wire_name(value), *name);
        assert_eq!(as_str(value), *name);
        let back: T = serde_json::from_value(serde_json::Value::String(name.to_string())).unwrap();
        assert_eq!(&back, value);
    }
}

#[test]
fn status_backend_and_role_names_are_the_wire_names() {
    same_names::<TaskStatus>(TaskStatus::as_str);
    same_names::<JobStatus>(JobStatus::as_str);
    same_names::<Backend>(Backend::as_str);
    same_names::<Role>(Role::as_str);
    assert_eq!(Role::ALL.to_vec(), Role::iter().collect::<Vec<_>>());
}

#[test]
fn statuses_and_backends_parse_from_their_names() {
    for s in TaskStatus::iter() {
        assert_eq!(TaskStatus::from_str(s.as_str()).unwrap(), s);
    }
    for s in JobStatus::iter() {
        assert_eq!(JobStatus::from_str(s.as_str()).unwrap(), s);
    }
    for b in Backend::iter() {
        assert_eq!(Backend::from_str(b.as_str()).unwrap(), b);
    }
    assert!(TaskStatus::from_str("done").is_err());
}

#[test]
fn every_event_kind_name_is_a_serde_tag() {
    for name in EventKind::VARIANTS {
        // A known tag without its fields fails on a missing field, never on the tag.
        let json = format!("{{\"type\":\"{name}\"}}");
        if let Err(e) = serde_json::from_str::<EventKind>(&json) {
            assert!(!e.to_string().contains("unknown variant"), "{name}: {e}");
        }
    }
    let e = serde_json::from_str::<EventKind>("{\"type\":\"no_such_kind\"}").unwrap_err();
    assert!(e.to_string().contains("unknown variant"), "{e}");
    let waiting = EventKind::JobWaiting {
        reason: String::new(),
    };
    assert_eq!(waiting.name(), "job_waiting");
    assert_eq!(EventKind::Heartbeat.name(), "heartbeat");
}
